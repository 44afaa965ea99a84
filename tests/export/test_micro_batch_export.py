"""A micro-batched program: the same numbers as its eager twin, and a memory plan that stays
that of one piece as the batch grows (the point of streaming the 2q*b rows)."""
from __future__ import annotations

from export.contract.manifest import read_manifest
from export.contract.methods import ExportShapes
from export.exporter import export_step
from runtime_driver.commands.compare import TEACHER_FORCED_REL_TOL, compare_engines

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
    """q=2, pieces of 16 rows: b=16 is 64 rows (4 pieces), b=32 is 128 rows (8 pieces).
    Streamed, the program is one loop over a piece, so its arena must not grow with the
    number of pieces beyond the batch's own input rows; unstreamed, it grows with the rows.
    (The loop body is planned beside the step's other temporaries, the noise generator's,
    so a streamed arena is somewhat above one unstreamed piece's: 1.07x on this tiny model.)"""
    one_piece = _activation_arena_bytes(tiny_step(q=2, micro_batch=None), batch=4)
    whole = _activation_arena_bytes(tiny_step(q=2, micro_batch=None), batch=16)
    streamed = {b: _activation_arena_bytes(tiny_step(q=2, micro_batch=16), batch=b) for b in (16, 32)}
    assert whole > 3 * one_piece  # the arena grows with the rows of one pass...
    extra_rows = 2 * 2 * (32 - 16)  # 2q copies of 16 more examples
    input_bytes = extra_rows * (2 * 16 + 1) * 8  # ...streamed, only by their int64 ids, mask and labels
    assert streamed[32] - streamed[16] <= input_bytes + 4096, (one_piece, streamed, whole)
    assert streamed[16] < 1.5 * one_piece, (one_piece, streamed, whole)

