"""Step executors: the one thing that differs between engines.

The training loop only ever calls these five operations, with plain Python numbers for seeds,
gradients, lr and eps. EagerPRGE runs the PRGEStep module in PyTorch; EagerSequential is the
MeZO-style baseline (same estimator, 2q forwards); the ExecuTorch executor runs the exported
program's methods of the same names.
"""
from __future__ import annotations

import torch
from torch import Tensor

from prge.step import PRGEStep


def step_scalars(prev_seed: int, new_seed: int, prev_g: list[float], lr: float, eps: float) -> tuple[Tensor, ...]:
    """The scalar inputs of train_step as the tensors the exported program expects."""
    return (
        torch.tensor([prev_seed], dtype=torch.int64),
        torch.tensor([new_seed], dtype=torch.int64),
        torch.tensor(prev_g, dtype=torch.float32),
        torch.tensor([lr], dtype=torch.float32),
        torch.tensor([eps], dtype=torch.float32),
    )


class EagerPRGE:
    """P-RGE in eager PyTorch: one batched forward over the 2q perturbed copies."""

    engine = "eager"

    def __init__(self, step: PRGEStep) -> None:
        self.step = step
        self.num_queries = step.num_queries
        self.eval_batch_size: int | None = None  # any batch size works

    @torch.no_grad()
    def train_step(self, input_ids, attention_mask, labels, prev_seed, new_seed, prev_g, lr, eps) -> Tensor:
        return self.step.train_step(input_ids, attention_mask, labels, *step_scalars(prev_seed, new_seed, prev_g, lr, eps))

    @torch.no_grad()
    def apply_update(self, prev_seed: int, prev_g: list[float], lr: float) -> None:
        seed, _, g, lr_t, _ = step_scalars(prev_seed, 0, prev_g, lr, 0.0)
        self.step.apply_update(seed, g, lr_t)

    @torch.no_grad()
    def eval_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.step.eval_logits(input_ids, attention_mask)

    def get_adapter(self) -> Tensor:
        return self.step.get_adapter()

    @torch.no_grad()
    def set_adapter(self, flat: Tensor) -> None:
        self.step.set_adapter(flat)


class EagerSequential(EagerPRGE):
    """MeZO-style estimation: the same update from 2q sequential forwards of the plain batch."""

    @torch.no_grad()
    def train_step(self, input_ids, attention_mask, labels, prev_seed, new_seed, prev_g, lr, eps) -> Tensor:
        prev, new, g, lr_t, eps_t = step_scalars(prev_seed, new_seed, prev_g, lr, eps)
        self.step.apply_update(prev, g, lr_t)
        return self.step.sequential_losses(input_ids, attention_mask, labels, new, eps_t)
