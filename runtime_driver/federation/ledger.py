"""The server's round log (run/rounds.jsonl) and the global adapter it determines.

One JSON line per finished round: the updates applied (in order, each lr already scaled for
the average), whose they were, what was rejected and why, bytes sent each way and the wall
time. The global adapter is nothing but the replay of these lines from B = 0, so a server that
restarts reads the log, replays it, and goes on from the next round with the very adapter an
uninterrupted run would have (a torn last line from a kill is dropped: that round is redone).

Combining a round's clients (`--aggregate`): "sum" replays every client's k updates at their
lr, one after another, as if one device had run all n * k steps (the total step count, hence
the progress, of centralized P-RGE at the same forward passes); "mean" replays them with lr / n
(n clients accepted this round), so the round moves B by the mean of the clients' local
changes: FedAvg of the adapters, computed from scalars.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.files import write_file_atomic
from runtime_driver.federation.protocol import Update, lr_scale
from runtime_driver.metrics import read_metrics
from runtime_driver.replay import apply_logged_update


@dataclass
class RoundRecord:
    round: int
    clients: list[int]  # accepted, in the order their updates are applied
    updates: list[Update]  # applied: each client's k updates, lr as applied (scaled by 1 / n for "mean")
    rejected: dict[str, str] = field(default_factory=dict)  # client -> reason (JSON keys are strings)
    bytes_down: dict[str, int] = field(default_factory=dict)  # client -> bytes of its assignment message
    bytes_up: dict[str, int] = field(default_factory=dict)  # client -> bytes of its reply
    wall_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)  # validation of the new global adapter, if evaluated
    known: dict[str, int] = field(default_factory=dict)  # client -> rounds it has applied, as the server knows after this round

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["updates"] = [[u.seed, list(u.g), u.lr] for u in self.updates]
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "RoundRecord":
        updates = [Update(int(s), tuple(float(x) for x in g), float(lr)) for s, g, lr in row["updates"]]
        return cls(int(row["round"]), [int(c) for c in row["clients"]], updates, dict(row.get("rejected", {})),
                   dict(row.get("bytes_down", {})), dict(row.get("bytes_up", {})), float(row.get("wall_s", 0.0)),
                   dict(row.get("metrics", {})), {str(c): int(n) for c, n in row.get("known", {}).items()})


def combined(client_updates: dict[int, list[Update]], aggregate: str) -> tuple[list[int], list[Update]]:
    """(clients in id order, the round's updates in that order): every client's updates at
    their lr ("sum"), or at lr / n ("mean": the mean of the clients' local changes)."""
    clients = sorted(client_updates)
    scale = lr_scale(aggregate, len(clients))
    return clients, [Update(u.seed, u.g, u.lr * scale) for c in clients for u in client_updates[c]]


def apply_round(adapter: Tensor, updates: list[Update], noise: str) -> Tensor:
    """The adapter after a round's updates, exactly as every participant computes it."""
    for u in updates:
        adapter = apply_logged_update(adapter, u.seed, list(u.g), u.lr, noise)
    return adapter


def traffic(rounds: list[RoundRecord]) -> dict[str, float]:
    """Mean payload bytes a client received ("down") and sent ("up") per round it was part of."""
    def mean(values: list[int]) -> float:
        return round(sum(values) / len(values), 1) if values else 0.0
    return {"down": mean([n for r in rounds for n in r.bytes_down.values()]),
            "up": mean([n for r in rounds for n in r.bytes_up.values()])}


class RoundLog:
    """rounds.jsonl: read what a previous server process finished, append each new round."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        rows = read_metrics(self.path)  # drops a torn last line
        self.rounds = [RoundRecord.from_json(r) for r in rows]
        for i, r in enumerate(self.rounds):
            if r.round != i:
                raise ValueError(f"{self.path}: line {i + 1} is round {r.round}, expected {i} (not this federation's log?)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Rewrite without a torn line before appending, so the file stays valid JSONL.
        write_file_atomic(self.path, "".join(json.dumps(r.to_json()) + "\n" for r in self.rounds))

    @property
    def next_round(self) -> int:
        return len(self.rounds)

    def append(self, record: RoundRecord) -> None:
        if record.round != self.next_round:
            raise ValueError(f"round {record.round} appended after {self.next_round - 1}")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record.to_json()) + "\n")
            f.flush()
        self.rounds.append(record)

    def global_adapter(self, numel: int, noise: str, upto: int | None = None) -> Tensor:
        """B after rounds [0, upto) (all by default), replayed from B = 0."""
        adapter = torch.zeros(numel, dtype=torch.float32)
        for record in self.rounds[:upto]:
            adapter = apply_round(adapter, record.updates, noise)
        return adapter
