"""Federated P-RGE on Flower's Message API (flwr 1.42): a ServerApp that drives the rounds
through the Coordinator (server.py) and a ClientApp that answers them (client.py). Only the
records of protocol.py travel: assignments and catch-up updates down, (seed, g, lr) up.

Settings come from the run config (`[tool.flwr.app.config]` of flower-app/pyproject.toml,
overridden by `flwr run --run-config`, which `prge federate` writes); a node's partition-id
(`--node-config`) is its client slot, and it may name its own `program` and `data` there (a
phone's own task folder) instead of a shard of the run's task.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from models.files import write_json_atomic
from models.tasks.folder import resolve_data_dir
from runtime_driver.checkpoint import write_flat_adapter
from runtime_driver.engines import ExecuTorchPRGE
from runtime_driver.failpoints import reached
from runtime_driver.federation.client import ClientState, LocalTraining, answer
from runtime_driver.federation.ledger import RoundLog
from runtime_driver.federation.server import Coordinator
from runtime_driver.federation.settings import FederationSettings
from runtime_driver.federation.shards import client_shard
from runtime_driver.run import program_task, save_adapter, split_evaluator

server_app = ServerApp()
client_app = ClientApp()


def _open(program: str, data: str):
    engine = ExecuTorchPRGE(program)
    return engine, program_task(engine.program_dir, engine.manifest, resolve_data_dir(data or None, progress=lambda _: None))


# ---- client ----------------------------------------------------------------------------------
_STATE, _ADAPTER = "prge", "prge-adapter"  # the node's state between rounds (never sent)


@client_app.query()
def identify(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"node": ConfigRecord({"slot": int(context.node_config["partition-id"])})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    s = FederationSettings.from_run_config(context.run_config)
    message = dict(msg.content["assignment"])
    reached("federated-client", int(message["round"]))  # crash tests: a client that dies mid-round
    slot = int(context.node_config["partition-id"])
    own = {k: str(context.node_config[k]) for k in ("program", "data") if k in context.node_config}
    engine, task = _open(own.get("program", s.program), own.get("data", s.data))
    rows = task.split("train", engine.seq_len)
    # A node with its own data trains on all of it; otherwise on its slot's shard of the run's task.
    shard = rows if "data" in own else client_shard(rows, slot, s.clients, s.non_iid, s.seed)
    if _STATE in context.state:
        state = ClientState(context.state[_ADAPTER].to_torch_state_dict()["adapter"],
                            int(context.state[_STATE]["rounds_applied"]))
    else:
        state = ClientState(torch.zeros(sum(x.numel for x in engine.slots)))
    how = LocalTraining(batch_size=engine.batch_size, data_seed=s.seed * s.clients + slot,  # one order per (run, client)
                        num_labels=1 if task.is_completion else len(task.spec.labels))
    reply = answer(state, message, engine, shard, how)
    context.state[_STATE] = ConfigRecord({"rounds_applied": state.rounds_applied})
    context.state[_ADAPTER] = ArrayRecord({"adapter": state.adapter})
    return Message(RecordDict({"reply": ConfigRecord(reply)}), reply_to=msg)


# ---- server ----------------------------------------------------------------------------------
def _nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(nodes)} of {count} clients connected within {timeout:g} s")
        time.sleep(0.5)


def _exchange(grid: Grid, messages: dict[int, Message], timeout: float) -> dict[int, Message | str]:
    """Send, wait up to timeout, and match each reply to its destination (an error the
    SuperLink makes for a lost node comes from the SuperLink, so match on reply_to)."""
    sent = list(messages.values())
    replies = list(grid.send_and_receive(sent, timeout=timeout))
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    out: dict[int, Message | str] = {node: f"no reply within {timeout:g} s" for node in messages}
    for reply in replies:
        node = node_of.get(reply.metadata.reply_to_message_id)
        if node is not None:
            out[node] = f"client error: {reply.error.reason}" if reply.has_error() else reply
    return out


def _slots(grid: Grid, nodes: list[int], clients: int, timeout: float) -> dict[int, int]:
    """node id -> client slot (its partition-id), each slot once."""
    asked = {n: Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes}
    slots = {}
    for node, reply in _exchange(grid, asked, timeout).items():
        if isinstance(reply, str):
            raise RuntimeError(f"node {node} did not say its partition-id: {reply}")
        slot = int(reply.content["node"]["slot"])
        if not 0 <= slot < clients or slot in slots.values():
            raise RuntimeError(f"node {node} has partition-id {slot}: expected each of 0..{clients - 1} once")
        slots[node] = slot
    return slots


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    s = FederationSettings.from_run_config(context.run_config)
    out = Path(s.out)
    engine, task = _open(s.program, s.data)
    numel = sum(x.numel for x in engine.slots)
    coordinator = Coordinator(s.coordinator(), RoundLog(out / "rounds.jsonl"), engine.num_queries, numel, engine.estimator.noise)
    evaluate_split = split_evaluator(engine, task)
    validation = task.split("validation", engine.seq_len, limit=s.eval_examples)

    def evaluate(adapter: torch.Tensor) -> dict[str, float]:
        engine.set_adapter(adapter)
        return evaluate_split(validation)

    slot_of = _slots(grid, _nodes(grid, s.clients, s.timeout), s.clients, s.timeout)
    while not coordinator.finished:
        r = coordinator.round
        messages = {node: Message(RecordDict({"assignment": ConfigRecord(coordinator.message(slot))}), dst_node_id=node,
                                  message_type=MessageType.TRAIN, group_id=str(r)) for node, slot in slot_of.items()}
        replies = {slot_of[node]: reply if isinstance(reply, str) else dict(reply.content["reply"])
                   for node, reply in _exchange(grid, messages, s.timeout).items()}
        due = (s.eval_every > 0 and (r + 1) % s.eval_every == 0) or r + 1 == s.rounds
        record = coordinator.finish_round(replies, evaluate if due else None)
        print(json.dumps({"round": r, "clients": record.clients, "rejected": record.rejected, **record.metrics}), flush=True)
    summary: dict[str, Any] = {"rounds": s.rounds, "clients": s.clients, "local_steps": s.local_steps}
    test = task.split("test", engine.seq_len, limit=s.test_examples)
    if len(test):
        engine.set_adapter(coordinator.adapter)
        summary["test"] = evaluate_split(test, final=True)
    write_flat_adapter(out / "adapter.safetensors", coordinator.adapter)  # what `prge replay`-style audits compare
    save_adapter(out, engine, coordinator.adapter)  # PEFT: out/adapter/
    write_json_atomic(out / "summary.json", summary)
