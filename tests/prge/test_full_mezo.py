"""Full-parameter MeZO (prge/full_mezo.py) on the tiny model: the perturbation never touches the
stored weights, the batched + and - rows equal forwards of the perturbed weights, chunked noise
equals whole-tensor noise, and the update is the one MeZO defines."""
from __future__ import annotations

import pytest
import torch

import prge.full_mezo as full_mezo
from models.causal_lm import build_full_mezo_step
from prge.full_mezo import perturbed_pair, slot_noise, updated_weight, weight_slots
from prge.noise import gaussian, stream_keys

LABELS = [5, 9]


def _i64(v: int) -> torch.Tensor:
    return torch.tensor([v], dtype=torch.int64)


def _f32(v: float) -> torch.Tensor:
    return torch.tensor([v], dtype=torch.float32)


@pytest.fixture
def step(tiny_model_dir):
    return build_full_mezo_step(tiny_model_dir("llama"), LABELS)


def _batch(rows: int = 4, seq_len: int = 12):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 100, (rows, seq_len), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    return ids, mask, torch.tensor([0, 1, 1, 0][:rows])


def test_every_weight_is_a_slot_once_with_even_offsets(step, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")))
    names = [n for n, _ in hf.named_parameters()]  # tied weights once, as here
    assert [s.name for s in step.slots] == names
    assert step.numel == sum(p.numel() for p in hf.parameters())
    assert all(s.offset % 2 == 0 for s in step.slots)
    assert not list(step.parameters())  # all weights are (mutable) buffers


def test_weight_slots_leave_odd_sized_tensors_a_gap():
    slots = weight_slots([("a", (3,)), ("b", (2, 2))])
    assert [s.offset for s in slots] == [0, 4]


def test_chunked_noise_equals_the_whole_stream(monkeypatch):
    slot = weight_slots([("a", (4,)), ("b", (5, 7))])[1]
    whole = gaussian(_i64(11), 1, slot.offset + slot.numel)[0, slot.offset:]
    monkeypatch.setattr(full_mezo, "CHUNK", 8)  # 35 elements in chunks of 8
    z = torch.cat([slot_noise("gaussian", stream_keys(_i64(11)), slot, a, min(8, slot.numel - a)) for a in range(0, slot.numel, 8)])
    assert torch.equal(z, whole)
    w = torch.randn(slot.shape)
    plus, minus = perturbed_pair(w, slot, stream_keys(_i64(11)), _f32(0.01))
    scaled = torch.tensor(0.01, dtype=torch.float32).to(torch.float64) * whole.reshape(slot.shape)
    assert torch.equal(plus, (w.double() + scaled).float()) and torch.equal(minus, (w.double() - scaled).float())
    new = updated_weight(w, slot, stream_keys(_i64(11)), _f32(2.0), _f32(0.1))
    step_size = torch.tensor(0.1, dtype=torch.float32).double() * 2.0
    assert torch.equal(new, (w.double() - step_size * whole.reshape(slot.shape)).float())


@torch.no_grad()
def test_weights_are_bit_identical_after_steps_with_g_zero(step):
    before = step.get_adapter().clone()
    ids, mask, labels = _batch()
    for t in range(3):
        losses = step.train_step(ids, mask, labels, _i64(t), _i64(t + 1), _f32(0.0), _f32(0.5), _f32(1e-2))
        assert losses.shape == (2,) and not torch.equal(losses[0], losses[1])  # the perturbation did change the loss
    assert torch.equal(step.get_adapter(), before)


@torch.no_grad()
def test_batched_plus_minus_rows_equal_forwards_of_the_perturbed_weights(step):
    ids, mask, labels = _batch()
    base = step.get_adapter().clone()
    losses = step.train_step(ids, mask, labels, _i64(0), _i64(7), _f32(0.0), _f32(0.0), _f32(1e-2))
    pairs = [perturbed_pair(step.weight(k), s, stream_keys(_i64(7)), _f32(1e-2)) for k, s in enumerate(step.slots)]
    for sign in (0, 1):
        step.set_weights(torch.cat([p[sign].reshape(-1) for p in pairs]))
        alone = step.per_example_loss(ids, mask, labels).mean()
        torch.testing.assert_close(losses[sign], alone, rtol=1e-5, atol=1e-6)
    step.set_weights(base)


@torch.no_grad()
def test_update_folded_into_the_next_step_is_w_minus_lr_g_z(step):
    ids, mask, labels = _batch()
    w = [step.weight(k).clone() for k in range(len(step.slots))]
    step.train_step(ids, mask, labels, _i64(4), _i64(5), _f32(1.5), _f32(0.01), _f32(1e-2))
    for k, slot in enumerate(step.slots):
        z = gaussian(_i64(4), 1, slot.offset + slot.numel)[0, slot.offset:].reshape(slot.shape)
        expected = (w[k].double() - (torch.tensor(0.01).double() * torch.tensor(1.5).double()) * z).float()
        assert torch.equal(step.weight(k), expected), slot.name


def test_refuses_a_completion_loss(tiny_model_dir):
    with pytest.raises(ValueError, match="label-word tasks"):
        build_full_mezo_step(tiny_model_dir("llama"), LABELS, loss="completion")
