"""The server's side of a round, whatever carries the messages (Flower, or a test calling it
directly): what to send each client, and what a round's replies make of the global adapter.

Each message holds the client's assignment and the logged updates of every round the client
has not applied yet (as far as the server knows: the rounds since its last accepted reply), so
a client that dropped or joined late catches up by replay. A reply either counts (parsed as
assigned), or is rejected with its reason, or says the client is behind (it lost its state):
the server then resends from where the client is, next round.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from torch import Tensor

from runtime_driver.federation.ledger import RoundLog, RoundRecord, apply_round, combined
from runtime_driver.federation.protocol import (Assignment, FederationConfig, RejectedReply, Update, assigned_seeds,
                                                encode_rounds, parse_reply, record_bytes)


class Coordinator:
    def __init__(self, cfg: FederationConfig, log: RoundLog, num_queries: int, numel: int, noise: str,
                 clients_kept_state: bool = True) -> None:
        self.cfg, self.log, self.num_queries, self.noise = cfg, log, num_queries, noise
        self.adapter: Tensor = log.global_adapter(numel, noise)  # a restarted server resumes from its log
        # Rounds each client has applied, as far as the server knows (a client accepted in round
        # r had applied every round before r; a client behind said how many it has). Each round
        # logs it, so a restarted server whose clients kept their state sends exactly what an
        # uninterrupted one would. Clients that did not (a restart through Flower is a new Flower
        # run, and a node's state lives for one run) are sent every round from 0 instead: none
        # answers "behind", so the resumed round counts every client as it would have uninterrupted.
        kept = clients_kept_state and log.rounds
        self.known: dict[int, int] = {int(c): n for c, n in log.rounds[-1].known.items()} if kept else {}
        self._started = time.perf_counter()
        self._sent: dict[int, int] = {}  # client -> payload bytes of this round's message

    @property
    def round(self) -> int:
        return self.log.next_round

    @property
    def finished(self) -> bool:
        return self.round >= self.cfg.rounds

    def assignment(self, client: int) -> Assignment:
        r = self.round
        return Assignment(r, assigned_seeds(self.cfg.seed, r, client, self.cfg.num_clients, self.cfg.local_steps),
                          self.cfg.lr, self.cfg.eps)

    def message(self, client: int) -> dict[str, Any]:
        """This round's message to a client: its assignment and the rounds it has to catch up on."""
        if not self._sent:
            self._started = time.perf_counter()  # the round's wall time starts with its first message
        since = self.known.get(client, 0)
        message = {**self.assignment(client).to_record(), "client": client, "since": since,
                   **encode_rounds([(record.clients, record.updates) for record in self.log.rounds[since:]])}
        self._sent[client] = record_bytes(message)
        return message

    def finish_round(self, replies: Mapping[int, Mapping[str, Any] | str],
                     evaluate: Callable[[Tensor], dict[str, float]] | None = None) -> RoundRecord:
        """Apply the round and append it to the log. replies[client] is the client's reply
        record, or a string saying why there is none (it dropped, the transport failed).
        evaluate(adapter): metrics of the new global adapter to log with the round."""
        accepted: dict[int, list[Update]] = {}
        rejected: dict[str, str] = {}
        bytes_up: dict[str, int] = {}
        for client, reply in sorted(replies.items()):
            if isinstance(reply, str):
                rejected[str(client)] = reply
                continue
            bytes_up[str(client)] = record_bytes(reply)
            if isinstance(reply.get("behind"), int):
                self.known[client] = reply["behind"]
                rejected[str(client)] = f"behind: it has applied {reply['behind']} rounds (resent next round)"
                continue
            try:
                accepted[client] = parse_reply(reply, self.assignment(client), self.num_queries, self.cfg.max_abs_g)
                self.known[client] = self.round
            except RejectedReply as e:
                rejected[str(client)] = str(e)
        clients, updates = combined(accepted, self.cfg.aggregate)
        self.adapter = apply_round(self.adapter, updates, self.noise)
        record = RoundRecord(self.round, clients, updates, rejected,
                             bytes_down={str(c): n for c, n in sorted(self._sent.items())}, bytes_up=bytes_up,
                             wall_s=round(time.perf_counter() - self._started, 4),
                             known={str(c): n for c, n in sorted(self.known.items())})
        if evaluate is not None:
            record.metrics = evaluate(self.adapter)
        self.log.append(record)
        self._sent = {}
        return record
