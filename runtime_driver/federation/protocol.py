"""What travels between a federation's server and its clients: seeds and scalars only.

Round r, for each client it picks, the server sends an assignment: the round, the k step seeds
the client must use (server-assigned, so two clients never draw the same direction), lr and
eps. The client replies with its k local updates: for step i, the seed it was given, its q
projected gradients g and the lr. Both travel as flat records of ints, floats, bytes and lists
of them (a Flower ConfigRecord holds exactly these). A reply is checked before it counts: a
malformed record, another round, a seed it was not assigned, another lr, or a g that is not
finite or beyond the server's bound is rejected with the reason, and the round goes on
without it.

The rounds a client must catch up on travel compactly: per round, which clients were accepted
and their g as float32. Everything else of an update follows from the federation's settings:
its seed is the one assigned to (round, client, step), its lr the assigned lr scaled by the
round's aggregate. float32 loses nothing: an update applies g and lr as float32, as the
program receives them (replay.apply_logged_update).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from prge.estimators import SEED_MODULUS

# The bound on |g| a server accepts by default. A healthy g is a loss difference over 2 eps:
# a few units on the default task (BENCHMARKS.md); a client's own judge already zeros a
# faulty step's g, so a larger one is a broken or hostile client.
DEFAULT_MAX_ABS_G = 1e3


AGGREGATES = ("sum", "mean")


@dataclass(frozen=True)
class FederationConfig:
    """What the server and every client agree on for a whole run."""

    num_clients: int  # client slots 0..n-1, one shard of the data each
    rounds: int
    local_steps: int  # k: P-RGE steps each client runs per round
    lr: float
    eps: float
    seed: int = 0  # the run seed all step seeds derive from
    max_abs_g: float = DEFAULT_MAX_ABS_G  # replies with a larger |g| are rejected
    aggregate: str = "sum"  # how a round combines its clients' updates (lr_scale)

    def __post_init__(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate {self.aggregate!r}: one of {', '.join(AGGREGATES)}")


def lr_scale(aggregate: str, accepted: int) -> float:
    """The factor on lr of a round's updates: "sum" applies every client's updates at their lr
    (as one device running all n * k steps), "mean" at lr / n (FedAvg of the local changes)."""
    return 1.0 / accepted if aggregate == "mean" and accepted else 1.0


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
    double, the length of a bytes value, plus the key names (framing aside)."""
    total = 0
    for key, value in record.items():
        if isinstance(value, bytes):
            total += len(key.encode()) + len(value)
        else:
            total += len(key.encode()) + 8 * (len(value) if isinstance(value, (list, tuple)) else 1)
    return total


CATCH_UP = "catch_up_"  # the prefix of a message's keys that carry the rounds to catch up on


def encode_rounds(rounds: list[tuple[list[int], list[Update]]]) -> dict[str, Any]:
    """Several rounds' (accepted clients, updates) under CATCH_UP keys: the number of clients
    of each round, their slots (uint16) and their g (float32), in the order applied."""
    clients = [c for accepted, _ in rounds for c in accepted]
    g = [x for _, updates in rounds for u in updates for x in u.g]
    return {f"{CATCH_UP}counts": [len(accepted) for accepted, _ in rounds],
            f"{CATCH_UP}clients": np.asarray(clients, dtype="<u2").tobytes(),
            f"{CATCH_UP}g": np.asarray(g, dtype="<f4").tobytes()}


def decode_rounds(message: Mapping[str, Any], cfg: FederationConfig, num_queries: int) -> list[list[Update]]:
    """The updates of the rounds encode_rounds put into a message, from round message["since"]
    on: seeds and lr rebuilt from cfg, g as sent."""
    clients = np.frombuffer(message[f"{CATCH_UP}clients"], dtype="<u2").tolist()
    g = np.frombuffer(message[f"{CATCH_UP}g"], dtype="<f4").tolist()
    per_client = cfg.local_steps * num_queries
    if len(clients) != sum(message[f"{CATCH_UP}counts"]) or len(g) != len(clients) * per_client:
        raise ValueError("malformed catch-up: the counts, clients and g of the rounds do not agree")
    rounds, at, next_g = [], 0, 0
    for offset, count in enumerate(message[f"{CATCH_UP}counts"]):
        r, lr = int(message["since"]) + offset, cfg.lr * lr_scale(cfg.aggregate, count)
        updates = []
        for c in clients[at:at + count]:
            for seed in assigned_seeds(cfg.seed, r, c, cfg.num_clients, cfg.local_steps):
                updates.append(Update(seed, tuple(g[next_g:next_g + num_queries]), lr))
                next_g += num_queries
        rounds.append(updates)
        at += count
    return rounds
