"""A micro-batched program: the same numbers as its eager twin, and a memory plan that stays
that of one piece as the batch grows (the point of streaming the 2q*b rows)."""
from __future__ import annotations

import torch

from export.exporter import ExportShapes, export_step
from runtime_driver.compare import TEACHER_FORCED_REL_TOL, compare_engines
from export.manifest import read_manifest

LOSS_TOL = 1e-5  # XNNPACK vs eager float32 rounding on per-copy mean losses


def test_micro_batched_program_matches_eager(tiny_program, tiny_model_dir, tiny_data_dir):
    program = tiny_program("llama", q=2, batch=4, micro_batch=3)  # 16 rows in 6 pieces, parts of copies
    assert read_manifest(program)["shapes"]["micro_batch"] == 3
    result = compare_engines(tiny_model_dir("llama"), program, tiny_data_dir, steps=3, lr=0.05, eps=1e-2)
    assert result["max_loss_diff"] < LOSS_TOL
    assert result["teacher_forced_max_rel_diff"] < TEACHER_FORCED_REL_TOL
    assert result["free_running"]["adapter_norm_et"] > 0


def _activation_arena_bytes(step, batch: int) -> int:
    """Size of train_step's memory-planned activation arena (buffer 1; 0 is reserved)."""
    program, _, _ = export_step(step, ExportShapes(batch, 16, 1), progress=lambda _: None, methods=("train_step",))
    (plan,) = program.executorch_program.execution_plan
    return max(plan.non_const_buffer_sizes)


def test_memory_plan_is_flat_in_the_batch(tiny_step):
    """q=2: b=4 is 16 rows in one pass; b=16 is 64 rows, as one pass or as 4 pieces of 16.
    Streamed, the pieces must reuse one arena: if the partitioner merged the pieces' layers
    into shared delegate calls (or built every piece's attention mask up front), the pieces'
    activations would be alive at once."""
    one_piece = _activation_arena_bytes(tiny_step(q=2, micro_batch=None), batch=4)
    whole = _activation_arena_bytes(tiny_step(q=2, micro_batch=None), batch=16)
    streamed = _activation_arena_bytes(tiny_step(q=2, micro_batch=16), batch=16)
    assert whole > 3 * one_piece  # the arena grows with the rows of one pass...
    assert streamed < 1.1 * one_piece, (one_piece, streamed, whole)  # ...and stays flat when streamed
