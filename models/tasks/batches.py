"""Tokenized splits and the deterministic order in which training visits them."""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from models.tasks.prompts import encode_batch
from models.tasks.readers import Example
from models.tasks.spec import TaskSpec


@dataclass
class TokenizedSplit:
    input_ids: Tensor  # [n, seq_len] int64, left-padded
    attention_mask: Tensor  # [n, seq_len] int64
    labels: Tensor  # [n] int64 class indices
    truncated: int  # how many texts were shortened to fit seq_len

    def __len__(self) -> int:
        return self.labels.shape[0]

    def rows(self, indices: list[int] | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.input_ids[idx], self.attention_mask[idx], self.labels[idx]

    def head(self, n: int) -> "TokenizedSplit":
        n = min(n, len(self))
        return TokenizedSplit(self.input_ids[:n], self.attention_mask[:n], self.labels[:n], self.truncated)


def tokenize_examples(tokenizer, task: TaskSpec, examples: list[Example], seq_len: int) -> TokenizedSplit:
    ids, mask, truncated = encode_batch(tokenizer, task, [e.text for e in examples], seq_len)
    labels = torch.tensor([e.label for e in examples], dtype=torch.int64)
    return TokenizedSplit(ids, mask, labels, truncated)


@lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(num_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of a step's minibatch: a pure function of (seed, step), so a resumed run
    sees exactly the data an uninterrupted one would. Epochs are seeded reshuffles."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_examples)
        out.append(_epoch_order(num_examples, seed, epoch)[offset])
    return out
