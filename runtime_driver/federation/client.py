"""A client's part of a round: catch up on the rounds it missed, then k local P-RGE steps.

The client keeps only the global adapter and the number of rounds it has applied. Each round
it replays the updates it has not seen (after a drop or a late join it replays every missed
round, so it ends on the server's exact adapter), then trains k steps from that adapter on its
own data with the seeds it was assigned, the update of each step folded into the next call as
in `prge train`. It replies with the k (seed, g, lr); its locally changed adapter is discarded:
the next round's global adapter comes from everyone's updates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from models.tasks.batches import TokenizedSplit, batch_indices
from runtime_driver.engines import Engine
from runtime_driver.federation.ledger import apply_round
from runtime_driver.federation.protocol import Assignment, FederationConfig, Update, decode_rounds, reply_record
from runtime_driver.judge import StepJudge
from runtime_driver.train import PendingUpdate, TrainingDiverged


class ClientBehind(ValueError):
    """The server sent rounds from later than this client has (it lost its state): it must
    be sent every round from `rounds_applied` on."""

    def __init__(self, rounds_applied: int) -> None:
        super().__init__(f"this client has applied {rounds_applied} rounds; send the rounds from {rounds_applied}")
        self.rounds_applied = rounds_applied


@dataclass
class ClientState:
    adapter: Tensor  # the global adapter after `rounds_applied` rounds
    rounds_applied: int = 0

    def catch_up(self, missed: list[list[Update]], first_round: int, noise: str) -> None:
        """Apply the logged rounds first_round, first_round + 1, ... that this client has not
        applied yet (rounds it already has are skipped: a lost reply makes the server resend)."""
        if first_round > self.rounds_applied:
            raise ClientBehind(self.rounds_applied)
        for updates in missed[self.rounds_applied - first_round:]:
            self.adapter = apply_round(self.adapter, updates, noise)
            self.rounds_applied += 1


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains its k steps (the server's settings, the client's data)."""

    batch_size: int
    data_seed: int  # orders this client's rows (each client its own)
    num_labels: int  # the judge's divergence floor (1 for a completion task)
    diverge_factor: float = 10.0
    max_bad_steps: int = 10


def local_updates(engine: Engine, train: TokenizedSplit, adapter: Tensor, assignment: Assignment,
                  how: LocalTraining) -> list[Update]:
    """k P-RGE steps from `adapter` with the assigned seeds; the (seed, g, lr) of each."""
    engine.set_adapter(adapter)
    judge = StepJudge(assignment.eps, engine.estimator.normalize, how.diverge_factor, how.num_labels, how.max_bad_steps)
    pending = PendingUpdate(engine.num_queries)
    k = len(assignment.seeds)
    updates = []
    for i, seed in enumerate(assignment.seeds):
        # The client's own data order: position (round, i), so a redone round sees the same rows.
        ids, mask, labels = train.rows(batch_indices(len(train), how.batch_size, assignment.round * k + i, how.data_seed))
        losses = engine.train_step(ids, mask, labels, pending.seed, seed, pending.g, pending.lr, assignment.eps)
        verdict = judge.judge(losses)
        if judge.must_stop:
            raise TrainingDiverged(f"{judge.bad_in_a_row} local steps in a row had a {verdict.fault}")
        pending.set(seed, verdict.g, assignment.lr)
        updates.append(Update(seed, tuple(verdict.g), assignment.lr))
    return updates


def answer(state: ClientState, message: dict[str, Any], federation: FederationConfig, engine: Engine,
           train: TokenizedSplit, how: LocalTraining) -> dict[str, Any]:
    """A client's reply to the server's message: catch up, train k steps, send the scalars; or,
    if the client has fewer rounds than the server sent from, say so ({"behind": n})."""
    missed = decode_rounds(message, federation, engine.num_queries)
    try:
        state.catch_up(missed, int(message["since"]), engine.estimator.noise)
    except ClientBehind as e:
        return {"behind": e.rounds_applied}
    assignment = Assignment.from_record(message)
    if state.rounds_applied != assignment.round:
        raise ValueError(f"round {assignment.round} assigned, but the rounds sent end at {state.rounds_applied}")
    return reply_record(assignment.round, local_updates(engine, train, state.adapter, assignment, how))
