"""PRGEStep against plain reference computations: update math, perturbed copies, P-RGE ==
sequential estimation, the sign of the update, the two losses, and per-copy chunking."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from models.sources.tiny import TINY_FAMILIES
from prge.estimators import projected_grads
from prge.lora import perturbed_mode
from prge.noise import gaussian


def _t(x, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(x if isinstance(x, list) else [x], dtype=dtype)


def _seed(s: int) -> torch.Tensor:
    return torch.tensor([s], dtype=torch.int64)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _clean_loss(step, ids, mask, labels) -> float:
    with torch.no_grad():
        return float(step.per_example_loss(ids, mask, labels).mean())


# ---- update and perturbation arithmetic ----------------------------------------------------
@pytest.mark.parametrize("q", [2, 3])
def test_apply_update_matches_per_element_loop(tiny_step, randomize_adapter, q):
    step = tiny_step(q=q)
    randomize_adapter(step, seed=1)
    before = [layer.lora_B.clone() for layer in step.adapter_layers]
    seed, g, lr = _seed(4242), _t([0.7, -1.3, 2.1][:q]), _t(0.01)
    with torch.no_grad():
        step.apply_update(seed, g, lr)

    z = gaussian(seed, q, step.adapter_numel).tolist()
    g64, lr64 = g.tolist(), float(lr)  # float32 values, exactly representable in float64
    moved = 0.0
    for slot, layer, b in zip(step.slots, step.adapter_layers, before):
        ref = torch.empty(slot.numel, dtype=torch.float64)
        flat_b = b.reshape(-1).tolist()
        for k in range(slot.numel):
            mean = sum(g64[i] * z[i][slot.offset + k] for i in range(q)) / q
            ref[k] = flat_b[k] - lr64 * mean
        got = layer.lora_B.reshape(-1)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, atol=1e-7, rtol=0, msg=slot.name)
        moved = max(moved, float((got - b.reshape(-1)).abs().max()))
    assert moved > 1e-3  # the update did something


def test_zero_g_update_is_exact_noop(tiny_step, randomize_adapter):
    step = tiny_step()
    flat = randomize_adapter(step, seed=2)
    with torch.no_grad():
        step.apply_update(_seed(9), torch.zeros(2), _t(0.5))
    assert torch.equal(step.get_adapter(), flat)


def test_train_step_updates_then_writes_copies(tiny_step, randomize_adapter, tiny_batch):
    q = 2
    step = tiny_step(q=q)
    flat0 = randomize_adapter(step, seed=3)
    ids, mask, labels = tiny_batch(2)
    prev_seed, new_seed, prev_g, lr, eps = _seed(11), _seed(12), _t([0.4, -0.9]), _t(0.02), _t(1e-2)
    with torch.no_grad():
        losses = step.train_step(ids, mask, labels, prev_seed, new_seed, prev_g, lr, eps)
    assert losses.shape == (2 * q,) and losses.dtype == torch.float32

    # 1. the pending update was applied to B
    z_prev = gaussian(prev_seed, q, step.adapter_numel)
    expected = (flat0.double() - float(lr) * (prev_g.double() @ z_prev) / q).to(torch.float32)
    torch.testing.assert_close(step.get_adapter(), expected, atol=1e-7, rtol=0)
    # 2. copies are B +/- eps z_new, from the updated B, in float64 then cast
    z = gaussian(new_seed, q, step.adapter_numel)
    for slot, layer in zip(step.slots, step.adapter_layers):
        b = layer.lora_B.double()
        assert layer.lora_B_copies.shape == (2 * q, *slot.shape)
        for i in range(q):
            zi = z[i, slot.offset : slot.offset + slot.numel].reshape(slot.shape)
            plus = (b + float(eps) * zi).to(torch.float32)
            minus = (b - float(eps) * zi).to(torch.float32)
            assert torch.equal(layer.lora_B_copies[i], plus), (slot.name, i)
            assert torch.equal(layer.lora_B_copies[q + i], minus), (slot.name, q + i)


def test_the_step_after_a_step_updates_along_the_directions_it_kept(tiny_step, randomize_adapter, tiny_batch):
    """train_step keeps the directions it drew; the next call's folded update reads them (its
    previous seed is that call's new seed) instead of drawing them again: the same step, bit for
    bit, as a fresh step that draws them, and the same as drawing them by hand."""
    ids, mask, labels = tiny_batch(2)
    g, lr, eps = _t([0.4, -0.9]), _t(0.02), _t(1e-2)
    chained, fresh = tiny_step(), tiny_step()
    flat0 = randomize_adapter(chained, seed=3)
    randomize_adapter(fresh, seed=3)
    with torch.no_grad():
        chained.train_step(ids, mask, labels, _seed(5), _seed(6), torch.zeros(2), lr, eps)  # B unchanged
        assert torch.equal(chained.last_directions, gaussian(_seed(6), 2, chained.adapter_numel))
        kept = chained.train_step(ids, mask, labels, _seed(6), _seed(7), g, lr, eps)
        assert int(fresh.last_directions_key) == 0  # nothing kept: drawn again
        drawn = fresh.train_step(ids, mask, labels, _seed(6), _seed(7), g, lr, eps)
    assert torch.equal(kept, drawn)
    assert torch.equal(chained.get_adapter(), fresh.get_adapter())
    assert not torch.equal(chained.get_adapter(), flat0)
    # A kept seed is only ever read for that seed: an update along another seed draws its own.
    with torch.no_grad():
        chained.apply_update(_seed(6), g, lr)
        fresh.apply_update(_seed(6), g, lr)  # fresh kept 7, not 6
    assert torch.equal(chained.get_adapter(), fresh.get_adapter())


# ---- P-RGE (one batched forward) == sequential (2q forwards) --------------------------------
def _prge_vs_sequential(tiny_step, randomize_adapter, tiny_batch, family: str, loss: str) -> None:
    q, eps_value, lr_value = 2, 1e-2, 0.05
    eps, lr, seed = _t(eps_value), _t(lr_value), _seed(777)
    batched, sequential = tiny_step(family, q=q, loss=loss), tiny_step(family, q=q, loss=loss)
    flat0 = randomize_adapter(batched, seed=5)
    assert torch.equal(randomize_adapter(sequential, seed=5), flat0)
    ids, mask, labels = tiny_batch(3, family=family)

    with torch.no_grad():
        losses_p = batched.train_step(ids, mask, labels, _seed(0), seed, torch.zeros(q), _t(0.0), eps)
        assert torch.equal(batched.get_adapter(), flat0)  # zero pending update
        losses_s = sequential.sequential_losses(ids, mask, labels, seed, eps)
        assert torch.equal(sequential.get_adapter(), flat0)  # B restored exactly

    assert torch.isfinite(losses_p).all()
    loss_gap = float((losses_p - losses_s).abs().max())
    assert loss_gap < 1e-5, f"{family}/{loss}: losses differ by {loss_gap:.2e}"
    # The perturbation is visible in the losses (else the comparison is vacuous).
    assert float((losses_s[:q] - losses_s[q:]).abs().max()) > 10 * max(loss_gap, 1e-7)

    g_p = torch.tensor(projected_grads(losses_p.tolist(), eps_value), dtype=torch.float64)
    g_s = torch.tensor(projected_grads(losses_s.tolist(), eps_value), dtype=torch.float64)
    # g_i = (L+ - L-) / (2 eps): an error d in each loss moves g by at most d / eps.
    g_gap = float((g_p - g_s).abs().max())
    assert g_gap <= loss_gap / eps_value + 1e-9

    with torch.no_grad():
        batched.apply_update(seed, g_p.float(), lr)
        sequential.apply_update(seed, g_s.float(), lr)
    z = gaussian(seed, q, batched.adapter_numel)
    # |delta B| <= lr * max|delta g| * max_k mean_i |z_ik|, plus float32 rounding of B.
    bound = lr_value * (g_gap + 1e-6) * float(z.abs().mean(0).max()) + 1e-7
    update_gap = float((batched.get_adapter() - sequential.get_adapter()).abs().max())
    assert update_gap <= bound
    assert float((batched.get_adapter() - flat0).abs().max()) > 100 * bound


@pytest.mark.parametrize("loss", ["classification", "lm"])
def test_prge_equals_sequential_llama(tiny_step, randomize_adapter, tiny_batch, loss):
    _prge_vs_sequential(tiny_step, randomize_adapter, tiny_batch, "llama", loss)


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "llama"])
def test_prge_equals_sequential_every_family(tiny_step, randomize_adapter, tiny_batch, family):
    _prge_vs_sequential(tiny_step, randomize_adapter, tiny_batch, family, "classification")


# ---- the sign of the update ----------------------------------------------------------------
def _flat_grad(step, ids, mask, labels) -> torch.Tensor:
    for layer in step.adapter_layers:
        layer.lora_B.requires_grad_(True)
    try:
        step.per_example_loss(ids, mask, labels).mean().backward()
        return torch.cat([layer.lora_B.grad.reshape(-1) for layer in step.adapter_layers]).double()
    finally:
        for layer in step.adapter_layers:
            layer.lora_B.requires_grad_(False)
            layer.lora_B.grad = None


def test_projected_grads_are_directional_derivatives(tiny_step, randomize_adapter, tiny_batch):
    q, eps = 4, 1e-3
    step = tiny_step(q=q)
    randomize_adapter(step, seed=6)
    ids, mask, labels = tiny_batch(8)
    grad = _flat_grad(step, ids, mask, labels)
    with torch.no_grad():
        losses = step.train_step(ids, mask, labels, _seed(0), _seed(31), torch.zeros(q), _t(0.0), _t(eps))
    g = torch.tensor(projected_grads(losses.tolist(), eps), dtype=torch.float64)
    directional = step.noise(_seed(31)) @ grad  # z_i . grad L
    # central differences: O(eps^2) truncation + float32 loss rounding / eps
    torch.testing.assert_close(g, directional, atol=2e-3, rtol=1e-2)


def test_update_descends_on_average(tiny_step, randomize_adapter, tiny_batch):
    q, eps, lr = 4, 1e-3, 0.01
    step = tiny_step(q=q)
    flat0 = randomize_adapter(step, seed=7)
    ids, mask, labels = tiny_batch(8)
    grad_sq = float(_flat_grad(step, ids, mask, labels).square().sum())
    before = _clean_loss(step, ids, mask, labels)
    changes = {lr: [], -lr: []}
    for s in range(24):
        seed = _seed(1000 + s)
        step.set_adapter(flat0)
        with torch.no_grad():
            losses = step.train_step(ids, mask, labels, _seed(0), seed, torch.zeros(q), _t(0.0), _t(eps))
        g = torch.tensor(projected_grads(losses.tolist(), eps), dtype=torch.float32)
        for signed_lr in changes:
            step.set_adapter(flat0)
            with torch.no_grad():
                step.apply_update(seed, g, _t(signed_lr))
            changes[signed_lr].append(_clean_loss(step, ids, mask, labels) - before)
    descent = sum(changes[lr]) / len(changes[lr])
    ascent = sum(changes[-lr]) / len(changes[-lr])
    assert descent < 0 < ascent, (descent, ascent)
    # E[change] ~ -lr |grad L|^2 to first order (E[z z^T] = I): the sign and the scale agree.
    assert 0.5 < -descent / (lr * grad_sq) < 1.5, (descent, lr * grad_sq)


# ---- the losses against the Hugging Face model ---------------------------------------------
@pytest.mark.parametrize("loss", ["classification", "lm"])
def test_losses_match_hf_model(tiny_model_dir, tiny_step, tiny_batch, loss):
    step = tiny_step(q=1, loss=loss)  # B = 0: adapters are no-ops
    ids, mask, labels = tiny_batch(4)
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all(), "expected a left-padded batch"
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), attn_implementation="eager").eval()
    label_ids = step.label_token_ids
    with torch.no_grad():
        ours = step.per_example_loss(ids, mask, labels)
        full = hf(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[:, -1, :]
        # each prompt alone, unpadded: what the padded batch must reproduce
        alone = torch.stack([
            hf(input_ids=ids[r : r + 1, mask[r].bool()]).logits[0, -1, :] for r in range(ids.shape[0])
        ])
        eval_logits = step.eval_logits(ids, mask)
    torch.testing.assert_close(full, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(eval_logits, full[:, label_ids], atol=1e-5, rtol=0)
    if loss == "classification":
        ref = torch.nn.functional.cross_entropy(full[:, label_ids], labels, reduction="none")
    else:
        ref = torch.nn.functional.cross_entropy(full, label_ids[labels], reduction="none")
    assert ours.shape == labels.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


# ---- perturbed mode: chunk c sees only copy c ----------------------------------------------
def test_perturbed_chunks_use_their_own_copy(tiny_step, tiny_batch):
    q, b = 2, 2
    step = tiny_step(q=q)
    ids, mask, labels = tiny_batch(2 * q * b, seed=5)  # distinct rows in every chunk
    gen = torch.Generator().manual_seed(8)
    copies = torch.randn(2 * q, step.adapter_numel, generator=gen) * 0.2
    with torch.no_grad():
        for slot, layer in zip(step.slots, step.adapter_layers):
            layer.lora_B_copies.copy_(copies[:, slot.offset : slot.offset + slot.numel].reshape(2 * q, *slot.shape))
        with perturbed_mode(step.body):
            perturbed = step.per_example_loss(ids, mask, labels).reshape(2 * q, b)
        assert not any(layer.perturbed for layer in step.adapter_layers)  # mode restored
        clean = []
        for c in range(2 * q):
            step.set_adapter(copies[c])
            rows = slice(c * b, (c + 1) * b)
            clean.append(step.per_example_loss(ids[rows], mask[rows], labels[rows]))
    clean = torch.stack(clean)
    torch.testing.assert_close(perturbed, clean, atol=1e-5, rtol=0)
    # The copies matter: chunk 0's rows under copy 1 give other losses.
    with torch.no_grad():
        step.set_adapter(copies[1])
        other = step.per_example_loss(ids[:b], mask[:b], labels[:b])
    assert float((other - clean[0]).abs().max()) > 1e-4
