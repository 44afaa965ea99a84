"""MP-LoRA-FA: a LoRA layer with frozen A whose trainable B can be evaluated at 2q perturbed copies.

    y = base(x) + (alpha / r) * B (A x)

A is a fixed random projection (LoRA-FA freezes it), B starts at zero and is the only thing
training changes. In perturbed mode the batch holds 2q chunks (copy-major: rows
[c*b, (c+1)*b) belong to copy c) and chunk c is multiplied by its own copy of B, so the whole
+/- estimate for q directions is one batched forward instead of 2q forwards. A micro-batched
forward substitutes the copies of its piece for lora_B_copies (torch.func.functional_call):
the rows it is given are then split evenly over those copies.

All state lives in buffers, never parameters, because the exported program mutates it in
place and the runtime has no notion of trainable parameters.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from prge.noise import gaussian


def frozen_a(a_seed: int, stream: int, rank: int, in_features: int) -> Tensor:
    """LoRA-FA's frozen A, [rank, in_features], entries N(0, 1/in_features).

    Regenerated from (a_seed, stream) by the same counter generator as the perturbations, so
    it is identical on every machine and never needs to be shipped: a PEFT adapter can be
    written from B and the adapter layout alone.
    """
    a = gaussian(torch.tensor(a_seed), 1, rank * in_features, first_stream=stream)[0]
    return (a / math.sqrt(in_features)).to(torch.float32).reshape(rank, in_features)


class LoRAFALinear(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        num_copies: int,
        a_seed: int,
        a_stream: int,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.scaling = alpha / rank
        self.num_copies = num_copies
        self.a_seed = a_seed
        self.a_stream = a_stream
        self.register_buffer("lora_A", frozen_a(a_seed, a_stream, rank, in_features))
        self.register_buffer("lora_B", torch.zeros(out_features, rank))
        self.register_buffer("lora_B_copies", torch.zeros(num_copies, out_features, rank))
        # Chosen before tracing (static control flow): train_step runs perturbed, eval clean.
        self.perturbed = False

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        ax = nn.functional.linear(x, self.lora_A)
        if self.perturbed:
            copies = self.lora_B_copies
            chunks = ax.reshape(copies.shape[0], -1, self.rank)
            delta = torch.bmm(chunks, copies.transpose(1, 2)).reshape(y.shape)
        else:
            delta = nn.functional.linear(ax, self.lora_B)
        return y + self.scaling * delta


def adapters_of(model: nn.Module) -> list[tuple[str, LoRAFALinear]]:
    """The LoRA-FA layers of a model in a fixed order (module registration order)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRAFALinear)]


@contextmanager
def perturbed_mode(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Run (or trace) the model with every adapter using its perturbed copies."""
    layers = [m for _, m in adapters_of(model)]
    previous = [m.perturbed for m in layers]
    for m in layers:
        m.perturbed = on
    try:
        yield
    finally:
        for m, p in zip(layers, previous):
            m.perturbed = p
