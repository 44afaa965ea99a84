"""Micro-batched forwards: the 2q*b rows of train_step (and eval_logits' rows) streamed in
pieces give the same numbers as one pass, whatever the piece size."""
from __future__ import annotations

import pytest
import torch

from prge.pieces import Pieces, piece_layout


@pytest.mark.parametrize("copies,batch,max_rows", [(4, 2, None), (4, 2, 8), (4, 2, 3), (4, 2, 2), (4, 5, 2), (6, 3, 7), (2, 1, 1), (8, 64, 64), (8, 7, 64)])
def test_pieces_are_equal_and_cover_every_row_once_in_copy_major_order(copies, batch, max_rows):
    layout = piece_layout(copies, batch, max_rows)
    assert layout.count * layout.rows == copies * batch  # equal pieces, every row once
    assert layout.rows <= (max_rows or copies * batch)
    # A piece is whole copies or an equal part of one copy, and copy_ids names them.
    assert layout.rows % batch == 0 or batch % layout.rows == 0
    copy_of_row = [row // batch for row in range(copies * batch)]
    for p, ids in enumerate(layout.copy_ids().tolist()):
        assert sorted(set(copy_of_row[p * layout.rows:(p + 1) * layout.rows])) == ids


def test_one_piece_without_a_limit_or_when_everything_fits():
    assert piece_layout(8, 4, None) == Pieces(1, 32, 4)
    assert piece_layout(8, 4, 32) == Pieces(1, 32, 4)
    assert piece_layout(8, 4, 31) == Pieces(2, 16, 4)  # the most whole copies that divide 2q
    assert piece_layout(8, 5, 4) == Pieces(40, 1, 5)  # 5 rows split evenly: 1 row a piece


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_limit_is_refused(tiny_step, bad):
    with pytest.raises(ValueError, match="micro-batch"):
        tiny_step(q=2, micro_batch=bad)


def _step_inputs(batch, seed: int, g: list[float]):
    ids, mask, labels = batch
    i64 = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    f32 = lambda v: torch.tensor([v], dtype=torch.float32)  # noqa: E731
    return ids, mask, labels, i64(seed), i64(seed + 1), torch.tensor(g, dtype=torch.float32), f32(0.05), f32(1e-2)


# 2q*b = 16 rows: 3 -> pieces of 2 rows (parts of copies), 4 = one copy per piece, 8 = two.
@pytest.mark.parametrize("micro_batch", [3, 4, 8])
def test_micro_batched_step_equals_one_pass(tiny_step, tiny_batch, randomize_adapter, micro_batch):
    whole, streamed = tiny_step(q=2, micro_batch=None), tiny_step(q=2, micro_batch=micro_batch)
    for step in (whole, streamed):
        randomize_adapter(step, seed=4)
    batch = tiny_batch(b=4, seed=2)
    with torch.no_grad():
        for i, g in enumerate(([0.0, 0.0], [0.7, -1.3], [2.0, 0.5])):
            expected = whole.train_step(*_step_inputs(batch, 10 + i, g))
            losses = streamed.train_step(*_step_inputs(batch, 10 + i, g))
            # Same rows, same copies; only the GEMM row blocking differs.
            torch.testing.assert_close(losses, expected, rtol=0, atol=2e-6)
            assert torch.equal(streamed.get_adapter(), whole.get_adapter())  # the update is not in the forward
        ids, mask, _ = tiny_batch(b=11, seed=3)
        torch.testing.assert_close(streamed.eval_logits(ids, mask), whole.eval_logits(ids, mask), rtol=0, atol=2e-6)
    # The copies really differ per piece: a streamed step over distinct perturbations is not constant.
    assert float(losses.max() - losses.min()) > 1e-5
