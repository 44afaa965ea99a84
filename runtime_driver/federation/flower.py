"""Federated P-RGE on Flower's Message API (flwr 1.42): a ServerApp that drives the rounds
through the Coordinator (server.py) and a ClientApp that answers them (client.py). Only the
records of protocol.py travel: assignments and catch-up updates down, (seed, g, lr) up.

The FedAvg baseline (method "fedavg") runs Flower's own FedAvg strategy on the same local
training: each client runs the same k P-RGE steps with the same seeds, but receives and returns
the whole adapter, which the strategy averages (weighted by the clients' shard sizes).

Settings come from the run config (`[tool.flwr.app.config]` of flower-app/pyproject.toml,
overridden by `flwr run --run-config`, which `prge federate` writes); a node's partition-id
(`--node-config`) is its client slot, and it may name its own `program` and `data` there (a
phone's own task folder) instead of a shard of the run's task.
"""
from __future__ import annotations

import json
import os
import signal
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from models.files import write_json_atomic
from models.tasks.folder import resolve_data_dir
from runtime_driver.checkpoint import write_flat_adapter
from runtime_driver.engines import ExecuTorchPRGE
from runtime_driver.failpoints import armed, reached
from runtime_driver.federation.client import ClientState, LocalTraining, answer, local_updates
from runtime_driver.federation.ledger import RoundLog, RoundRecord, apply_round, traffic
from runtime_driver.federation.protocol import Assignment, assigned_seeds
from runtime_driver.federation.server import Coordinator
from runtime_driver.federation.settings import FederationSettings, forward_rows
from runtime_driver.federation.shards import client_shard
from runtime_driver.run import program_task, save_adapter, split_evaluator

server_app = ServerApp()
client_app = ClientApp()


@lru_cache(maxsize=2)
def _open(program: str, data: str):
    """The engine and task; kept for the process's next message (the simulation engine reuses
    its worker processes; the deployment engine starts one per message). Every use sets the
    engine's adapter first."""
    engine = ExecuTorchPRGE(program)
    return engine, program_task(engine.program_dir, engine.manifest, resolve_data_dir(data or None, progress=lambda _: None))


@lru_cache(maxsize=2)
def _train_split(program: str, data: str):
    """The task's tokenized training rows (one worker serves many clients: tokenized once)."""
    engine, task = _open(program, data)
    return task.split("train", engine.seq_len)


# ---- client ----------------------------------------------------------------------------------
_STATE, _ADAPTER = "prge", "prge-adapter"  # the node's state between rounds (never sent)


@client_app.query()
def identify(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"node": ConfigRecord({"slot": int(context.node_config["partition-id"])})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    s = FederationSettings.from_run_config(context.run_config)
    slot = int(context.node_config["partition-id"])
    own = {k: str(context.node_config[k]) for k in ("program", "data") if k in context.node_config}
    program, data = own.get("program", s.program), own.get("data", s.data)
    engine, task = _open(program, data)
    rows = _train_split(program, data)
    # A node with its own data trains on all of it; otherwise on its slot's shard of the run's task.
    shard = rows if "data" in own else client_shard(rows, slot, s.clients, s.non_iid, s.seed)
    how = LocalTraining(batch_size=engine.batch_size, data_seed=s.seed * s.clients + slot,  # one order per (run, client)
                        num_labels=1 if task.is_completion else len(task.spec.labels))
    if "arrays" in msg.content:  # the FedAvg baseline: Flower's strategy sends the adapter
        return _train_fedavg(msg, s, slot, engine, shard, how)
    message = dict(msg.content["assignment"])
    if armed("federated-node", int(message["round"])):  # crash tests: the whole client (its SuperNode) dies mid-round
        _kill_with_ancestor("flower-supernode")
    reached("federated-client", int(message["round"]))  # crash tests: a client's ClientApp dies mid-round
    if _STATE in context.state:
        state = ClientState(context.state[_ADAPTER].to_torch_state_dict()["adapter"],
                            int(context.state[_STATE]["rounds_applied"]))
    else:
        state = ClientState(torch.zeros(sum(x.numel for x in engine.slots)))
    reply = answer(state, message, s.coordinator(), engine, shard, how)
    context.state[_STATE] = ConfigRecord({"rounds_applied": state.rounds_applied})
    context.state[_ADAPTER] = ArrayRecord({"adapter": state.adapter})
    return Message(RecordDict({"reply": ConfigRecord(reply)}), reply_to=msg)


def _kill_with_ancestor(command: str) -> None:
    """SIGKILL the Flower process this app runs under (flwr 1.42: SuperNode -> flower-superexec ->
    flwr-clientapp, SuperLink -> flower-superexec -> flwr-serverapp), found up the process tree
    by its command (Linux /proc), then this process: a phone's app, or the server, dies whole.
    The crash tests only."""
    pid = os.getppid()
    for _ in range(4):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if command.encode() in f.read():
                os.kill(pid, signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the command name: state, then ppid
    raise RuntimeError(f"no {command} above this process")


def _train_fedavg(msg: Message, s: FederationSettings, slot: int, engine, shard, how: LocalTraining) -> Message:
    """k local P-RGE steps from the received adapter, with the seeds the federated run would
    assign this client in this round; the reply is the trained adapter itself."""
    adapter = msg.content["arrays"].to_torch_state_dict()["adapter"]
    r = int(msg.content["config"]["server-round"]) - 1  # Flower counts rounds from 1
    assignment = Assignment(r, assigned_seeds(s.seed, r, slot, s.clients, s.local_steps), s.lr, s.eps)
    trained = apply_round(adapter, local_updates(engine, shard, adapter, assignment, how), engine.estimator.noise)
    metrics = MetricRecord({"num-examples": len(shard), "slot": slot})
    return Message(RecordDict({"arrays": ArrayRecord({"adapter": trained}), "metrics": metrics}), reply_to=msg)


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


def _partition_ids(grid: Grid, nodes: list[int], timeout: float) -> dict[int, int | str]:
    """node id -> the partition-id it says it has, or why it said none."""
    asked = {n: Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes}
    return {node: reply if isinstance(reply, str) else int(reply.content["node"]["slot"])
            for node, reply in _exchange(grid, asked, timeout).items()}


def _slots(grid: Grid, nodes: list[int], clients: int, timeout: float) -> dict[int, int]:
    """node id -> client slot (its partition-id), each slot once."""
    slots = {}
    for node, slot in _partition_ids(grid, nodes, timeout).items():
        if isinstance(slot, str):
            raise RuntimeError(f"node {node} did not say its partition-id: {slot}")
        if not 0 <= slot < clients or slot in slots.values():
            raise RuntimeError(f"node {node} has partition-id {slot}: expected each of 0..{clients - 1} once")
        slots[node] = slot
    return slots


def _readmit(grid: Grid, slot_of: dict[int, int], clients: int, timeout: float) -> dict[int, int]:
    """A client whose SuperNode restarted (a phone's app relaunched) connects under a new node
    id. Before each round, each node the server has not seen is asked its partition-id and takes
    over that slot from the node it replaces; the coordinator then catches it up like any client
    that fell behind (its state went with the old process: it reports 0 rounds applied). A node
    with no valid partition-id is left out, and said so."""
    new = sorted(set(grid.get_node_ids()) - set(slot_of))
    if not new:
        return slot_of
    slot_of = dict(slot_of)
    for node, slot in _partition_ids(grid, new, timeout).items():
        if isinstance(slot, str) or not 0 <= slot < clients:
            print(json.dumps({"node": node, "left out": f"no valid partition-id ({slot})"}), flush=True)
            continue
        replaced = [old for old, s in slot_of.items() if s == slot]
        for old in replaced:
            del slot_of[old]
        slot_of[node] = slot
        print(json.dumps({"node": node, "readmitted as client": slot, "replaces node": replaced}), flush=True)
    return slot_of


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    s = FederationSettings.from_run_config(context.run_config)
    out = Path(s.out)
    engine, task = _open(s.program, s.data)
    numel = sum(x.numel for x in engine.slots)
    log = RoundLog(out / "rounds.jsonl")
    evaluate_split = split_evaluator(engine, task)
    validation = task.split("validation", engine.seq_len, limit=s.eval_examples)

    def evaluate(adapter: torch.Tensor) -> dict[str, float]:
        engine.set_adapter(adapter)
        return evaluate_split(validation)

    nodes = _nodes(grid, s.clients, s.timeout)
    if s.method == "fedavg":
        adapter = _run_fedavg(grid, s, log, torch.zeros(numel), evaluate)
    else:
        # A server that resumes is a new Flower run: its clients' node state (the rounds they
        # had applied) did not survive it, so they are sent every round from 0.
        coordinator = Coordinator(s.coordinator(), log, engine.num_queries, numel, engine.estimator.noise,
                                  clients_kept_state=False)
        adapter = _run_prge(grid, s, coordinator, _slots(grid, nodes, s.clients, s.timeout), evaluate)
    steps = sum(len(r.clients) for r in log.rounds) * s.local_steps
    summary: dict[str, Any] = {"method": s.method, "aggregate": s.aggregate if s.method == "prge" else "fedavg",
                               "rounds": s.rounds, "clients": s.clients, "local_steps": s.local_steps,
                               "forward_rows": forward_rows(steps, engine.num_queries, engine.batch_size),
                               "bytes_per_client_round": traffic(log.rounds)}
    test = task.split("test", engine.seq_len, limit=s.test_examples)
    if len(test):
        engine.set_adapter(adapter)
        summary["test"] = evaluate_split(test, final=True)
    write_flat_adapter(out / "adapter.safetensors", adapter)  # what `prge replay`-style audits compare
    save_adapter(out, engine, adapter)  # PEFT: out/adapter/
    write_json_atomic(out / "summary.json", summary)


def _due(s: FederationSettings, r: int) -> bool:
    return (s.eval_every > 0 and (r + 1) % s.eval_every == 0) or r + 1 == s.rounds


def _report(record: RoundRecord) -> None:
    print(json.dumps({"round": record.round, "clients": record.clients, "rejected": record.rejected, **record.metrics}),
          flush=True)


def _run_prge(grid: Grid, s: FederationSettings, coordinator: Coordinator, slot_of: dict[int, int], evaluate) -> torch.Tensor:
    while not coordinator.finished:
        r = coordinator.round
        slot_of = _readmit(grid, slot_of, s.clients, s.timeout)
        messages = {node: Message(RecordDict({"assignment": ConfigRecord(coordinator.message(slot))}), dst_node_id=node,
                                  message_type=MessageType.TRAIN, group_id=str(r)) for node, slot in slot_of.items()}
        replies = {slot_of[node]: reply if isinstance(reply, str) else dict(reply.content["reply"])
                   for node, reply in _exchange(grid, messages, s.timeout).items()}
        _report(coordinator.finish_round(replies, evaluate if _due(s, r) else None))
        if armed("federated-server", r):  # crash tests: the server (SuperLink and ServerApp) dies after logging round r
            _kill_with_ancestor("flower-superlink")
    return coordinator.adapter


class _RoundsOfFedAvg(FedAvg):
    """Flower's FedAvg, noting who replied each round (for the round log)."""

    def __init__(self, clients: int) -> None:
        super().__init__(min_train_nodes=clients, min_available_nodes=clients, fraction_evaluate=0.0)
        self.replied: dict[int, dict[int, int]] = {}  # round -> slot -> bytes of the adapter it sent

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.replied[server_round] = {int(m.content["metrics"]["slot"]): _array_bytes(m.content["arrays"])
                                      for m in replies if not m.has_error()}
        return super().aggregate_train(server_round, replies)


def _array_bytes(arrays: ArrayRecord) -> int:
    return sum(len(a.data) for a in arrays.values())


def _run_fedavg(grid: Grid, s: FederationSettings, log: RoundLog, initial: torch.Tensor, evaluate) -> torch.Tensor:
    """The baseline: Flower's FedAvg strategy on the adapter tensors. Its rounds go into the
    same round log (no updates: what travels is the adapter; bytes each way per client)."""
    if log.rounds:
        raise ValueError(f"{log.path}: the FedAvg baseline does not resume; give a new --out")
    strategy = _RoundsOfFedAvg(s.clients)
    started = [time.perf_counter()]

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # Flower's evaluation of the initial adapter: not a round
            return None
        r = server_round - 1
        metrics = evaluate(arrays.to_torch_state_dict()["adapter"]) if _due(s, r) else {}
        down = _array_bytes(arrays)
        replied = strategy.replied.get(server_round, {})
        record = RoundRecord(r, sorted(replied), [], bytes_down={str(c): down for c in range(s.clients)},
                             bytes_up={str(c): n for c, n in sorted(replied.items())},
                             wall_s=round(time.perf_counter() - started[0], 4), metrics=metrics)
        log.append(record)
        _report(record)
        started[0] = time.perf_counter()
        return MetricRecord(metrics) if metrics else None

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord({"adapter": initial}), num_rounds=s.rounds,
                            timeout=s.timeout, evaluate_fn=after_round)
    return result.arrays.to_torch_state_dict()["adapter"].to(torch.float32)
