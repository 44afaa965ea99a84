"""The estimators (prge/estimators.py): Rademacher directions, normalized g, and on a quadratic
whose gradient is known, that every estimator's expected update points down the gradient (and
that the plain ones are unbiased)."""
from __future__ import annotations

import math

import pytest
import torch

from prge.estimators import ESTIMATORS, loss_spread, projected_grads, updated_adapter
from prge.noise import PRNG_VERSIONS, directions, rademacher, uniform_bits


def _seed(s: int) -> torch.Tensor:
    return torch.tensor([s], dtype=torch.int64)


# ---- Rademacher directions ----------------------------------------------------------------
def test_rademacher_is_the_top_bit_of_the_shared_hash():
    assert PRNG_VERSIONS["rademacher"] == "lowbias32x2-sign-v1", "generator changed: update this reference"
    bits = uniform_bits(_seed(77), 3, 1001)
    signs = rademacher(_seed(77), 3, 1001)
    assert signs.dtype == torch.float64
    assert torch.equal(signs, torch.where(bits >= 2**31, 1.0, -1.0).to(torch.float64))


def test_rademacher_signs_are_balanced_and_streams_independent():
    z = rademacher(_seed(5), 8, 20_000)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert z.mean(dim=1).abs().max() < 0.03  # 20k fair signs: std of the mean 0.007
    gram = (z @ z.t()) / z.shape[1]
    assert (gram - torch.eye(8, dtype=torch.float64)).abs().max() < 0.03
    # a stream is the same whichever block of streams it is drawn in
    assert torch.equal(rademacher(_seed(5), 2, 20_000, first_stream=3), z[3:5])


def test_directions_dispatch_and_refuse_unknown_kinds():
    assert torch.equal(directions("rademacher", _seed(1), 2, 10), rademacher(_seed(1), 2, 10))
    with pytest.raises(ValueError, match="unknown noise"):
        directions("uniform", _seed(1), 2, 10)


# ---- projected gradients -----------------------------------------------------------------
def test_plain_g_is_the_finite_difference():
    losses = [0.9, 0.5, 0.7, 0.6]  # q = 2: (+0, +1, -0, -1)
    assert projected_grads(losses, 0.01) == [(0.9 - 0.7) / 0.02, (0.5 - 0.6) / 0.02]


def test_normalized_g_divides_by_the_spread_and_is_bounded():
    rng = torch.Generator().manual_seed(0)
    for q in (1, 2, 4, 8):
        for _ in range(200):
            losses = (torch.rand(2 * q, generator=rng, dtype=torch.float64) * 3).tolist()
            g = projected_grads(losses, 0.01, normalize=True)
            sigma = float(torch.tensor(losses, dtype=torch.float64).std(unbiased=False))
            assert g == pytest.approx([(losses[i] - losses[i + q]) / (2 * sigma) for i in range(q)], rel=1e-12)
            assert max(abs(x) for x in g) <= math.sqrt(q) + 1e-12
    # q = 1: the sign of the slope
    assert projected_grads([0.3, 0.2], 0.01, normalize=True) == [1.0]
    assert projected_grads([0.2, 0.3], 0.01, normalize=True) == [-1.0]


def test_normalized_g_ignores_the_scale_and_level_of_the_loss():
    losses = [0.91, 0.52, 0.73, 0.64, 0.48, 0.80]
    g = projected_grads(losses, 0.01, normalize=True)
    moved = projected_grads([5.0 + 4.0 * x for x in losses], 0.01, normalize=True)
    assert moved == pytest.approx(g, rel=1e-9)
    assert loss_spread([2.0, 2.0, 2.0]) == 0.0


# ---- expected update on a quadratic ---------------------------------------------------------
def _quadratic(dim: int):
    gen = torch.Generator().manual_seed(3)
    curvature = torch.rand(dim, generator=gen, dtype=torch.float64) + 0.5
    center = torch.randn(dim, generator=gen, dtype=torch.float64)
    point = torch.randn(dim, generator=gen, dtype=torch.float64)

    def loss(b: torch.Tensor) -> torch.Tensor:  # rows of b, one loss each
        return 0.5 * ((b - center) ** 2 * curvature).sum(-1)

    return loss, point, curvature * (point - center)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_expected_update_points_down_the_gradient(name):
    """The mean step over many seeds, -(B' - B) / lr = mean over seeds of (1/q) sum g_i z_i, is
    the true gradient for the plain estimators (unbiased: a quadratic has no finite-difference
    error) and a positive multiple of it, to sampling noise, for the normalized ones."""
    estimator = ESTIMATORS[name]
    loss, point, grad = _quadratic(dim=32)
    q, eps, seeds = 4, 1e-3, 3000
    total = torch.zeros_like(point)
    for s in range(seeds):
        z = directions(estimator.noise, _seed(s), q, point.numel())
        losses = loss(torch.cat([point + eps * z, point - eps * z])).tolist()
        g = torch.tensor(projected_grads(losses, eps, estimator.normalize), dtype=torch.float32)
        # the update itself, as train_step applies it (lr 1, from B = point)
        stepped = updated_adapter(point.to(torch.float32), _seed(s), g, torch.tensor([1.0]), estimator.noise)
        total += point.to(torch.float32).to(torch.float64) - stepped
    mean_step = total / seeds
    cosine = float(mean_step @ grad / (mean_step.norm() * grad.norm()))
    assert cosine > 0.97, cosine
    if not estimator.normalize:
        # unbiased: the mean is the gradient, to the Monte-Carlo error of 3000 x 4 directions
        assert float((mean_step - grad).norm() / grad.norm()) < 0.12


# ---- in the step -----------------------------------------------------------------------------
def test_a_rademacher_step_perturbs_by_exactly_eps_and_updates_with_its_signs(tiny_step, randomize_adapter):
    q, eps = 2, 1e-2
    step = tiny_step(q=q, estimator="fzoo")
    flat = randomize_adapter(step, seed=9)
    z = rademacher(_seed(21), q, step.adapter_numel)
    assert torch.equal(step.noise(_seed(21)), z)
    with torch.no_grad():
        step.train_step(*_tiny_rows(step), _seed(0), _seed(21), torch.zeros(q), torch.tensor([0.0]), torch.tensor([eps]))
    copies = torch.cat([layer.lora_B_copies.reshape(2 * q, -1) for layer in step.adapter_layers], dim=1)
    eps32 = float(torch.tensor(eps, dtype=torch.float32))  # the program receives eps as float32
    expected = torch.cat([flat.double() + eps32 * z, flat.double() - eps32 * z]).float()
    # each adapter's copies are slices of the flat vector in slot order
    assert torch.equal(copies, expected)
    g, lr = torch.tensor([0.5, -2.0]), torch.tensor([0.1])
    with torch.no_grad():
        step.apply_update(_seed(21), g, lr)
    lr32 = float(lr)
    reference = (flat.double() - lr32 * ((0.5 * z[0] + -2.0 * z[1]) * 0.5)).float()
    assert torch.equal(step.get_adapter(), reference)


def _tiny_rows(step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    vocab = step.body.backbone.config.vocab_size
    return torch.randint(3, vocab, (2, 8), generator=gen), torch.ones(2, 8, dtype=torch.int64), torch.tensor([0, 1])
