"""Splitting one task's training rows among simulated clients: IID (a seeded shuffle cut into
equal parts) or non-IID by label (the shuffle sorted by label, then cut, so most clients see
one or two labels: the skew of real phones, where each person's data leans one way)."""
from __future__ import annotations

import random

from models.tasks.batches import TokenizedSplit


def shard_indices(labels: list[int], num_clients: int, non_iid: bool, seed: int) -> list[list[int]]:
    """The train rows of each client: contiguous, near-equal parts of the (sorted) shuffle."""
    n = len(labels)
    if not 1 <= num_clients <= n:
        raise ValueError(f"{num_clients} clients for {n} training rows: need 1 to {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    if non_iid:
        order.sort(key=lambda i: labels[i])  # stable: rows of one label stay shuffled
    return [order[c * n // num_clients:(c + 1) * n // num_clients] for c in range(num_clients)]


def client_shard(train: TokenizedSplit, client: int, num_clients: int, non_iid: bool, seed: int) -> TokenizedSplit:
    if non_iid and train.labels.dim() != 1:
        raise ValueError("non-IID shards split by label: a completion task has none (use IID shards)")
    rows = shard_indices(train.labels.tolist() if train.labels.dim() == 1 else [0] * len(train), num_clients, non_iid,
                         seed)[client]
    ids, mask, labels = train.rows(rows)
    return TokenizedSplit(ids, mask, labels, 0)
