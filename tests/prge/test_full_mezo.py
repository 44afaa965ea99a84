"""Full-parameter MeZO (prge/full_mezo.py) on the tiny model: the perturbation never touches the
stored weights, the batched + and - rows equal forwards of the perturbed weights, chunked noise
cut into draws equals the whole stream, and the update is the one MeZO defines."""
from __future__ import annotations

import pytest
import torch

import prge.full_mezo as full_mezo
from models.causal_lm import build_full_mezo_step
from prge.full_mezo import draw_noise, perturbed_pieces, plan_draws, updated_weights, weight_slots
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


def test_draws_cover_every_tensor_once_and_equal_the_whole_stream(monkeypatch):
    monkeypatch.setattr(full_mezo, "SPAN", 8)  # 4 + 35 + 3 elements in draws of at most 8
    slots = weight_slots([("a", (4,)), ("b", (5, 7)), ("c", (3,))])
    draws = plan_draws(slots)
    assert all(d.count <= 8 and d.first_element % 2 == 0 for d in draws)
    assert len(draws[0].pieces) == 2  # a and the start of b share the first draw
    keys = stream_keys(_i64(11))
    whole = gaussian(_i64(11), 1, slots[-1].offset + slots[-1].numel)[0]
    weights = [torch.randn(s.shape) for s in slots]
    covered = [torch.zeros(s.numel, dtype=torch.int64) for s in slots]
    for draw in draws:
        z = draw_noise("gaussian", keys, draw)
        for piece in draw.pieces:
            covered[piece.slot][piece.start:piece.start + piece.count] += 1
            at = slots[piece.slot].offset + piece.start
            assert torch.equal(z[piece.at:piece.at + piece.count], whole[at:at + piece.count])
    assert all(torch.equal(c, torch.ones_like(c)) for c in covered)

    new = dict(updated_weights(weights, draws, keys, _f32(2.0), _f32(0.1)))
    assert sorted(new) == [0, 1, 2]
    step_size = torch.tensor(0.1, dtype=torch.float32).double() * 2.0
    scale = torch.tensor(0.01, dtype=torch.float32).to(torch.float64)
    pieces: dict[int, list] = {}
    for draw in draws:
        for slot, plus, minus in perturbed_pieces(weights, draw, keys, _f32(0.01)):
            pieces.setdefault(slot, []).append((plus, minus))
    for k, (slot, w) in enumerate(zip(slots, weights)):
        z = whole[slot.offset:slot.offset + slot.numel].reshape(slot.shape)
        assert torch.equal(new[k], (w.double() - step_size * z).float())
        plus = torch.cat([p for p, _ in pieces[k]]).reshape(slot.shape)
        minus = torch.cat([m for _, m in pieces[k]]).reshape(slot.shape)
        assert torch.equal(plus, (w.double() + scale * z).float()) and torch.equal(minus, (w.double() - scale * z).float())


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
    weights = [step.weight(k) for k in range(len(step.slots))]
    pieces = [[] for _ in step.slots]
    for draw in step.draws:
        for slot, plus, minus in perturbed_pieces(weights, draw, stream_keys(_i64(7)), _f32(1e-2)):
            pieces[slot].append((plus, minus))
    for sign in (0, 1):
        step.set_weights(torch.cat([piece[sign] for slot_pieces in pieces for piece in slot_pieces]))
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
