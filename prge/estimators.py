"""Zeroth-order estimators and the update they share.

Every engine and every tool (eager trainer, runtime driver, replay) updates the adapter with
`updated_adapter`, so there is exactly one definition of a P-RGE update.
"""
from __future__ import annotations

import torch
from torch import Tensor

from prge.noise import gaussian

SEED_MODULUS = 1 << 31  # seeds are non-negative int32 so every runtime can hold them


def step_seed(run_seed: int, step: int) -> int:
    """The noise seed of a step: a splitmix64 mix of (run seed, step), reproducible anywhere."""
    x = (run_seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) % SEED_MODULUS


def projected_grads(losses: Tensor, eps: float) -> Tensor:
    """g_i = (L_i+ - L_i-) / (2 eps) from the 2q losses of a step (+ copies first)."""
    q = losses.numel() // 2
    return (losses[:q] - losses[q:]) / (2.0 * eps)


def updated_adapter(adapter: Tensor, seed: Tensor, g: Tensor, lr: Tensor) -> Tensor:
    """B - lr * (1/q) * sum_i g_i z_i, in float64, for a flat float32 adapter.

    z is regenerated from the seed; g has one entry per query. Traced inside train_step and
    called as is by eager code, so both compute the same float64 arithmetic.
    """
    num_queries = g.shape[0]
    z = gaussian(seed, num_queries, adapter.shape[0])
    inv_q = torch.tensor(1.0 / num_queries, dtype=torch.float64)
    terms = g.to(torch.float64).reshape(num_queries, 1) * z
    # Explicit adds in a fixed order, not terms.sum(0): ExecuTorch 1.5.1's portable sum over a
    # float64 dim accumulates in float32 (measured: 9e-6 relative error), which broke replay and
    # eager == runtime parity. Elementwise float64 adds are exact-rounded in every engine.
    total = terms[0]
    for i in range(1, num_queries):
        total = total + terms[i]
    direction = total * inv_q
    return adapter.to(torch.float64) - lr.to(torch.float64).reshape(1) * direction


def perturbed_copies(adapter: Tensor, z: Tensor, eps: Tensor) -> Tensor:
    """The 2q adapters a step evaluates, float32 [2q, N]: B + eps z_i, then B - eps z_i."""
    base = adapter.to(torch.float64).reshape(1, -1)
    scaled = eps.to(torch.float64).reshape(1, 1) * z
    return torch.cat([base + scaled, base - scaled]).to(torch.float32)
