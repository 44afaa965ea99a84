"""Accuracy from label-word logits, through any engine's eval_logits."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from models.tasks.batches import TokenizedSplit

EvalLogits = Callable[[Tensor, Tensor], Tensor]


def evaluate(eval_logits: EvalLogits, split: TokenizedSplit, batch_size: int, fixed_batch: bool) -> dict[str, float]:
    """{"accuracy", "loss"} over the split. fixed_batch: the engine only takes exactly batch_size
    rows (an exported program), so the last batch is padded with copies of its first row."""
    correct, total_loss, n = 0, 0.0, len(split)
    for start in range(0, n, batch_size):
        ids = split.input_ids[start : start + batch_size]
        mask = split.attention_mask[start : start + batch_size]
        labels = split.labels[start : start + batch_size]
        rows = ids.shape[0]
        if fixed_batch and rows < batch_size:
            fill = batch_size - rows
            ids = torch.cat([ids, ids[:1].expand(fill, -1)])
            mask = torch.cat([mask, mask[:1].expand(fill, -1)])
        logits = eval_logits(ids, mask)[:rows].to(torch.float64)
        correct += int((logits.argmax(dim=1) == labels).sum())
        total_loss += float(-torch.log_softmax(logits, dim=1).gather(1, labels.reshape(-1, 1)).sum())
    return {"accuracy": correct / n, "loss": total_loss / n}
