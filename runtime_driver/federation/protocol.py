"""What travels between a federation's server and its clients: seeds and scalars only.

Round r, for each client it picks, the server sends an assignment: the round, the k step seeds
the client must use (server-assigned, so two clients never draw the same direction), lr and
eps. The client replies with its k local updates: for step i, the seed it was given, its q
projected gradients g and the lr. Both travel as flat records of ints, floats and lists of
them (a Flower ConfigRecord holds exactly these). A reply is checked before it counts: a
malformed record, another round, a seed it was not assigned, another lr, or a g that is not
finite or beyond the server's bound is rejected with the reason, and the round goes on
without it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from prge.estimators import SEED_MODULUS

# The bound on |g| a server accepts by default. A healthy g is a loss difference over 2 eps:
# a few units on the default task (BENCHMARKS.md); a client's own judge already zeros a
# faulty step's g, so a larger one is a broken or hostile client.
DEFAULT_MAX_ABS_G = 1e3


class RejectedReply(ValueError):
    """A client's reply that does not count; the message says why."""


@dataclass(frozen=True)
class Update:
    """One local step's update: B <- B - lr * mean_i(g_i z_i(seed))."""

    seed: int
    g: tuple[float, ...]
    lr: float


@dataclass(frozen=True)
class Assignment:
    round: int
    seeds: tuple[int, ...]  # one per local step, in order
    lr: float
    eps: float

    def to_record(self) -> dict[str, Any]:
        return {"round": self.round, "seeds": list(self.seeds), "lr": self.lr, "eps": self.eps}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Assignment":
        return cls(int(record["round"]), tuple(int(s) for s in record["seeds"]), float(record["lr"]), float(record["eps"]))


def _mix31(x: int) -> int:
    """A bijection of [0, 2^31): odd multiplications and xor-shifts modulo 2^31 are each
    invertible, so distinct inputs give distinct seeds (no birthday collisions)."""
    mask = SEED_MODULUS - 1
    for multiplier, shift in ((0x2C1B3C6D, 16), (0x297A2D39, 15), (0x6B43A9B5, 16)):
        x = (x * multiplier) & mask
        x ^= x >> shift
    return x


def assigned_seeds(run_seed: int, round_index: int, client_slot: int, num_clients: int, steps: int) -> tuple[int, ...]:
    """The seeds of a client's k steps in a round: step number (round, slot, i) of the whole
    federation, mixed with the run seed by a bijection, so no two (round, slot, step) of a run
    share a seed (for fewer than 2^31 steps in all)."""
    if not 0 <= client_slot < num_clients:
        raise ValueError(f"client slot {client_slot} outside 0..{num_clients - 1}")
    first = (round_index * num_clients + client_slot) * steps
    offset = _mix31(run_seed % SEED_MODULUS)
    return tuple(_mix31((first + i + 1 + offset) % SEED_MODULUS) for i in range(steps))


def reply_record(round_index: int, updates: list[Update]) -> dict[str, Any]:
    """A client's reply: flat lists (g of all steps one after the other)."""
    return {"round": round_index, "seeds": [u.seed for u in updates], "g": [x for u in updates for x in u.g],
            "lr": [u.lr for u in updates]}


def _numbers(record: Mapping[str, Any], key: str, kind: type, length: int) -> list:
    value = record.get(key)
    if not isinstance(value, (list, tuple)) or len(value) != length:
        got = f"{len(value)} values" if isinstance(value, (list, tuple)) else type(value).__name__
        raise RejectedReply(f"malformed reply: '{key}' must be a list of {length} {kind.__name__}s, got {got}")
    if kind is int and not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise RejectedReply(f"malformed reply: '{key}' holds a non-integer")
    if kind is float and not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise RejectedReply(f"malformed reply: '{key}' holds a non-number")
    return list(value)


def parse_reply(record: Mapping[str, Any], assignment: Assignment, num_queries: int,
                max_abs_g: float = DEFAULT_MAX_ABS_G) -> list[Update]:
    """The updates of a reply to `assignment`, or RejectedReply with the reason."""
    if not isinstance(record, Mapping):
        raise RejectedReply(f"malformed reply: a {type(record).__name__}, not a record")
    k = len(assignment.seeds)
    if record.get("round") != assignment.round:
        raise RejectedReply(f"reply for round {record.get('round')!r}, this is round {assignment.round}")
    seeds = _numbers(record, "seeds", int, k)
    g = _numbers(record, "g", float, k * num_queries)
    lrs = _numbers(record, "lr", float, k)
    if tuple(seeds) != assignment.seeds:
        raise RejectedReply("a seed it was not assigned: " + str(next(s for s, a in zip(seeds, assignment.seeds) if s != a)))
    if any(lr != assignment.lr for lr in lrs):
        raise RejectedReply(f"an lr other than the assigned {assignment.lr}")
    for x in g:
        if not math.isfinite(x):
            raise RejectedReply("a non-finite g")
        if abs(x) > max_abs_g:
            raise RejectedReply(f"a g of {x:.4g}, beyond the bound {max_abs_g:g}")
    return [Update(s, tuple(float(x) for x in g[i * num_queries:(i + 1) * num_queries]), float(lr))
            for i, (s, lr) in enumerate(zip(seeds, lrs))]


def record_bytes(record: Mapping[str, Any]) -> int:
    """The payload of a record as Flower's ConfigRecord carries it: 8 bytes for each int64 or
    double, plus the key names (framing aside)."""
    total = 0
    for key, value in record.items():
        total += len(key.encode()) + 8 * (len(value) if isinstance(value, (list, tuple)) else 1)
    return total


CATCH_UP = "catch_up_"  # the prefix of a message's keys that carry the rounds to catch up on


def encode_rounds(rounds: list[list[Update]]) -> dict[str, list]:
    """Several rounds' updates as flat lists under CATCH_UP keys (a ConfigRecord holds no nesting)."""
    return {f"{CATCH_UP}counts": [len(r) for r in rounds], f"{CATCH_UP}seeds": [u.seed for r in rounds for u in r],
            f"{CATCH_UP}g": [x for r in rounds for u in r for x in u.g], f"{CATCH_UP}lr": [u.lr for r in rounds for u in r]}


def decode_rounds(message: Mapping[str, Any], num_queries: int) -> list[list[Update]]:
    """The rounds encode_rounds put into a message."""
    rounds, at = [], 0
    seeds, g, lrs = message[f"{CATCH_UP}seeds"], message[f"{CATCH_UP}g"], message[f"{CATCH_UP}lr"]
    for count in message[f"{CATCH_UP}counts"]:
        rounds.append([Update(int(seeds[i]), tuple(float(x) for x in g[i * num_queries:(i + 1) * num_queries]),
                              float(lrs[i])) for i in range(at, at + count)])
        at += count
    return rounds
