"""Micro-batching: how a forward over many rows is cut into equal pieces that run one after
another, so activation memory stays at one piece's worth however large the batch.

Zeroth-order training keeps no activations for a backward pass, so the 2q*b rows of a step
need not be in memory at once. Exported, the pieces are one loop (a torch scan); eager runs the
same piece function in a Python loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch._higher_order_ops.scan import scan

# Rows per forward pass by default. 64 rows x 64 tokens already saturates the GEMMs on a
# 2-core CPU (the b=4 columns of BENCHMARKS.md), so streaming larger batches in pieces of 64
# costs no speed while keeping activation memory at 64 rows' worth.
DEFAULT_MICRO_BATCH = 64


@dataclass(frozen=True)
class Pieces:
    """How a forward over a copy-major tiled batch (num_copies x batch rows) is streamed:
    `count` pieces of `rows` rows each, piece p being rows [p*rows, (p+1)*rows). A piece is
    whole copies (rows a multiple of batch) or an equal part of one copy (batch a multiple of
    rows), so each piece needs `copies_per_piece` consecutive perturbed copies."""

    count: int
    rows: int
    batch: int

    @property
    def copies_per_piece(self) -> int:
        return max(1, self.rows // self.batch)

    def copy_ids(self) -> Tensor:
        """[count, copies_per_piece] int64: the copies each piece's rows belong to."""
        first = [(p * self.rows) // self.batch for p in range(self.count)]
        return torch.tensor([[c + j for j in range(self.copies_per_piece)] for c in first], dtype=torch.int64)


def check_micro_batch(max_rows: int | None) -> None:
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"micro-batch must be >= 1 row, got {max_rows}")


def piece_layout(num_copies: int, batch: int, max_rows: int | None) -> Pieces:
    """Equal pieces of at most max_rows rows: the most whole copies that fit, else the largest
    divisor of batch that fits (pieces are equal because they run as one loop body). None, or
    a limit of at least num_copies * batch, is one piece: the whole forward at once."""
    check_micro_batch(max_rows)
    total = num_copies * batch
    if max_rows is None or max_rows >= total:
        return Pieces(1, total, batch)
    if batch <= max_rows:
        rows = batch * max(d for d in range(1, num_copies + 1) if num_copies % d == 0 and d * batch <= max_rows)
    else:
        rows = max(d for d in range(1, max_rows + 1) if batch % d == 0)
    return Pieces(total // rows, rows, batch)


def stream(piece_fn: Callable[..., Tensor], pieces: list[Tensor]) -> Tensor:
    """piece_fn over every piece (dim 0 of each tensor in pieces), outputs stacked on dim 0.

    Exported, this is a torch scan: ExecuTorch emits it as a loop over one copy of the piece's
    graph, so export time, program size and the memory plan do not grow with the number of
    pieces (unrolled, XNNPACK's partitioner costs memory quadratic in the graph size: a
    135M-parameter model with 8 pieces needed more than 24 GB to export). Eager runs the same
    piece_fn in a Python loop: same operations, same numbers.
    """
    count = pieces[0].shape[0]
    if count == 1:
        return piece_fn(*(p[0] for p in pieces)).unsqueeze(0)
    if torch.compiler.is_exporting():
        # scan needs a carry; the pieces are independent, so it is a dummy that is passed on.
        _, out = scan(lambda carry, xs: (carry.clone(), piece_fn(*xs)), torch.zeros(1), pieces)
        return out
    return torch.stack([piece_fn(*(p[i] for p in pieces)) for i in range(count)])
