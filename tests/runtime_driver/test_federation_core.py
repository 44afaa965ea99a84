"""The federation's core without a transport: server-assigned seeds never collide, a reply is
accepted only as assigned, a client's k local steps are fully described by their (seed, g, lr)
(the replay of them is its trained adapter, bit for bit), a round's average equals FedAvg of
the clients' adapters, and the round log alone rebuilds the global adapter after a restart."""
from __future__ import annotations

import json
import math

import pytest
import torch

from export.contract.manifest import read_manifest
from models.tasks.batches import TokenizedSplit
from runtime_driver.engines import ExecuTorchPRGE
from runtime_driver.federation.client import ClientBehind, ClientState, LocalTraining, answer, local_updates
from runtime_driver.federation.ledger import RoundLog, RoundRecord, apply_round, combined
from runtime_driver.federation.protocol import (Assignment, FederationConfig, RejectedReply, Update, assigned_seeds,
                                                decode_rounds, encode_rounds, parse_reply, reply_record)
from runtime_driver.federation.server import Coordinator
from runtime_driver.run import program_task

Q = 2


def test_assigned_seeds_never_collide_and_depend_on_the_run_seed():
    seeds = [s for r in range(40) for c in range(32) for s in assigned_seeds(7, r, c, 32, 10)]
    assert len(seeds) == len(set(seeds)) == 40 * 32 * 10
    assert all(0 <= s < 2 ** 31 for s in seeds)
    assert assigned_seeds(7, 3, 5, 32, 10) == assigned_seeds(7, 3, 5, 32, 10)
    assert set(assigned_seeds(8, 0, 0, 32, 10)).isdisjoint(assigned_seeds(7, 0, 0, 32, 10))
    with pytest.raises(ValueError, match="client slot 32 outside 0..31"):
        assigned_seeds(7, 0, 32, 32, 10)


ASSIGNMENT = Assignment(round=3, seeds=(11, 12), lr=0.01, eps=0.01)
GOOD = reply_record(3, [Update(11, (0.5, -1.0), 0.01), Update(12, (2.0, 0.25), 0.01)])


def test_a_reply_as_assigned_is_accepted():
    assert parse_reply(json.loads(json.dumps(GOOD)), ASSIGNMENT, Q) == \
        [Update(11, (0.5, -1.0), 0.01), Update(12, (2.0, 0.25), 0.01)]
    assert Assignment.from_record(ASSIGNMENT.to_record()) == ASSIGNMENT


BAD_REPLIES = {
    "not a record": ([1, 2], "malformed reply: a list"),
    "another round": ({**GOOD, "round": 2}, "reply for round 2, this is round 3"),
    "missing g": ({k: v for k, v in GOOD.items() if k != "g"}, "'g' must be a list of 4 floats, got NoneType"),
    "short g": ({**GOOD, "g": [0.5, -1.0, 2.0]}, "'g' must be a list of 4 floats, got 3 values"),
    "text in g": ({**GOOD, "g": [0.5, "x", 2.0, 0.25]}, "'g' holds a non-number"),
    "float seed": ({**GOOD, "seeds": [11.0, 12]}, "'seeds' holds a non-integer"),
    "unassigned seed": ({**GOOD, "seeds": [11, 99]}, "a seed it was not assigned: 99"),
    "other lr": ({**GOOD, "lr": [0.01, 0.5]}, "an lr other than the assigned 0.01"),
    "nan g": ({**GOOD, "g": [0.5, math.nan, 2.0, 0.25]}, "a non-finite g"),
    "inf g": ({**GOOD, "g": [0.5, -math.inf, 2.0, 0.25]}, "a non-finite g"),
    "huge g": ({**GOOD, "g": [0.5, 1e6, 2.0, 0.25]}, "a g of 1e+06, beyond the bound 1000"),
}


@pytest.mark.parametrize("case", list(BAD_REPLIES))
def test_a_bad_reply_is_rejected_with_its_reason(case):
    record, reason = BAD_REPLIES[case]
    with pytest.raises(RejectedReply, match=reason.replace("(", r"\(").replace("+", r"\+")):
        parse_reply(record, ASSIGNMENT, Q)


@pytest.fixture(scope="module")
def federation(tiny_program, tiny_data_dir):
    """An ExecuTorch engine on the tiny program and three clients' shards of the train split."""
    program = tiny_program("llama")
    engine = ExecuTorchPRGE(program)
    train = program_task(program, read_manifest(program), tiny_data_dir).split("train", engine.seq_len)
    shards = [TokenizedSplit(train.input_ids[c::3], train.attention_mask[c::3], train.labels[c::3], 0) for c in range(3)]
    return engine, shards


def _round(engine, shards, adapter, round_index, lr=0.05):
    how = LocalTraining(batch_size=2, data_seed=0, num_labels=2)
    replies = {}
    for c, shard in enumerate(shards):
        assignment = Assignment(round_index, assigned_seeds(0, round_index, c, len(shards), 3), lr, 0.01)
        replies[c] = parse_reply(reply_record(round_index, local_updates(engine, shard, adapter, assignment, how)),
                                 assignment, engine.num_queries)
    return replies


def test_a_clients_scalars_rebuild_its_trained_adapter_bit_for_bit(federation):
    engine, shards = federation
    start = torch.randn(engine.get_adapter().numel(), generator=torch.Generator().manual_seed(0)) * 1e-3
    assignment = Assignment(0, assigned_seeds(0, 0, 1, 3, 3), 0.05, 0.01)
    updates = local_updates(engine, shards[1], start, assignment, LocalTraining(batch_size=2, data_seed=0, num_labels=2))
    last = updates[-1]
    engine.apply_update(last.seed, list(last.g), last.lr)  # the local run's pending last update
    trained = engine.get_adapter()
    assert not torch.equal(trained, start)
    assert torch.equal(apply_round(start, updates, engine.estimator.noise), trained)


def test_a_mean_round_is_fedavg_of_the_clients_adapters_and_a_sum_round_adds_their_changes(federation):
    engine, shards = federation
    noise = engine.estimator.noise
    start = torch.zeros(engine.get_adapter().numel())
    replies = _round(engine, shards, start, 0)
    local = torch.stack([apply_round(start, replies[c], noise) for c in sorted(replies)])
    clients, updates = combined(replies, "mean")
    assert clients == [0, 1, 2] and len(updates) == 9 and all(u.lr == pytest.approx(0.05 / 3) for u in updates)
    torch.testing.assert_close(apply_round(start, updates, noise), local.mean(0), atol=1e-7, rtol=0)
    clients, updates = combined(replies, "sum")
    assert [u.seed for u in updates] == [u.seed for c in clients for u in replies[c]] and all(u.lr == 0.05 for u in updates)
    torch.testing.assert_close(apply_round(start, updates, noise), (local - start).sum(0) + start, atol=1e-7, rtol=1e-6)
    with pytest.raises(ValueError, match="aggregate 'median'"):
        FederationConfig(num_clients=3, rounds=1, local_steps=3, lr=0.05, eps=0.01, aggregate="median")


@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_catch_up_rounds_travel_as_slots_and_float32_g_and_replay_to_the_same_adapter(federation, aggregate):
    """Seeds and lr are rebuilt from the settings, g crosses as float32: the rounds a client
    decodes apply to the server's adapter bit for bit (updates apply g and lr as float32)."""
    engine, shards = federation
    noise = engine.estimator.noise
    cfg = FederationConfig(num_clients=3, rounds=3, local_steps=3, lr=0.05, eps=0.01, seed=0, aggregate=aggregate)
    start = torch.zeros(engine.get_adapter().numel())
    round0 = combined(_round(engine, shards, start, 0), aggregate)
    after0 = apply_round(start, round0[1], noise)
    replies1 = _round(engine, shards, after0, 1)
    round1 = combined({c: replies1[c] for c in (0, 2)}, aggregate)  # client 1 dropped in round 1
    message = {"since": 0, **encode_rounds([round0, round1])}
    decoded = decode_rounds(message, cfg, engine.num_queries)
    for (clients, sent), got in zip([round0, round1], decoded):
        assert [(u.seed, u.lr) for u in got] == [(u.seed, u.lr) for u in sent]
        assert all(torch.equal(torch.tensor(a.g, dtype=torch.float32), torch.tensor(b.g, dtype=torch.float32))
                   for a, b in zip(got, sent))
    server = apply_round(after0, round1[1], noise)
    assert torch.equal(apply_round(apply_round(start, decoded[0], noise), decoded[1], noise), server)
    # 2 rounds, 5 client-rounds of 3 steps x q=2: one float32 per g, two bytes per client.
    assert len(message["catch_up_g"]) == 5 * 3 * 2 * 4 and len(message["catch_up_clients"]) == 5 * 2
    with pytest.raises(ValueError, match="malformed catch-up"):
        decode_rounds({**message, "catch_up_g": message["catch_up_g"][:-4]}, cfg, engine.num_queries)


def test_the_round_log_rebuilds_the_global_adapter_after_a_restart(federation, tmp_path):
    engine, shards = federation
    noise, numel = engine.estimator.noise, engine.get_adapter().numel()
    log = RoundLog(tmp_path / "rounds.jsonl")
    adapter = torch.zeros(numel)
    for r in range(3):
        clients, updates = combined(_round(engine, shards, adapter, r), "sum")
        adapter = apply_round(adapter, updates, noise)
        log.append(RoundRecord(r, clients, updates, rejected={"3": "a non-finite g"}))
    with open(tmp_path / "rounds.jsonl", "a") as f:
        f.write('{"round": 3, "clients": [0, 1')  # a server killed while writing round 3
    restarted = RoundLog(tmp_path / "rounds.jsonl")
    assert restarted.next_round == 3 and restarted.rounds[0].rejected == {"3": "a non-finite g"}
    assert torch.equal(restarted.global_adapter(numel, noise), adapter)
    # A client that missed rounds 1 and 2 catches up on exactly the server's adapter.
    late = ClientState(restarted.global_adapter(numel, noise, upto=1), rounds_applied=1)
    late.catch_up([r.updates for r in restarted.rounds[1:]], first_round=1, noise=noise)
    assert late.rounds_applied == 3 and torch.equal(late.adapter, adapter)
    late.catch_up([r.updates for r in restarted.rounds[1:]], first_round=1, noise=noise)  # resent: no change
    assert late.rounds_applied == 3 and torch.equal(late.adapter, adapter)
    fresh = ClientState(torch.zeros(numel))  # lost its state: asks for everything
    with pytest.raises(ClientBehind, match="has applied 0 rounds; send the rounds from 0"):
        fresh.catch_up([r.updates for r in restarted.rounds[2:]], first_round=2, noise=noise)
    with pytest.raises(ValueError, match="round 5 appended after 2"):
        restarted.append(RoundRecord(5, [], []))


def _tamper(reply: dict, key: str, value) -> dict:
    changed = dict(reply)
    changed[key] = value
    return changed


def _federate(engine, shards, log_path, rounds: int, restart_after: int | None = None, clients_kept_state: bool = True):
    """Five rounds of three clients through the Coordinator, with every fault a federation
    meets: a drop (client 2, round 1), a non-finite g (client 1, round 2), an unassigned seed
    (client 0, round 2), a client that lost its state (client 1, round 3: behind, resent in
    round 4), and optionally a server restart from its log (its clients restarted too, without
    their state, unless clients_kept_state). Returns (coordinator, client states)."""
    numel, noise = engine.get_adapter().numel(), engine.estimator.noise
    cfg = FederationConfig(num_clients=3, rounds=rounds, local_steps=2, lr=0.05, eps=0.01, seed=0)
    coordinator = Coordinator(cfg, RoundLog(log_path), engine.num_queries, numel, noise)
    states = {c: ClientState(torch.zeros(numel)) for c in range(3)}
    while not coordinator.finished:
        r = coordinator.round
        if restart_after is not None and r == restart_after:
            coordinator = Coordinator(cfg, RoundLog(log_path), engine.num_queries, numel, noise, clients_kept_state)
            if not clients_kept_state:
                states = {c: ClientState(torch.zeros(numel)) for c in range(3)}
        if r == 3:
            states[1] = ClientState(torch.zeros(numel))  # client 1 restarted without its state
        replies = {}
        for c in range(3):
            message = coordinator.message(c)
            if (c, r) == (2, 1):
                replies[c] = "no reply (dropped)"
                continue
            reply = answer(states[c], message, cfg, engine, shards[c], LocalTraining(batch_size=2, data_seed=c, num_labels=2))
            if (c, r) == (1, 2):
                reply = _tamper(reply, "g", [math.nan] + reply["g"][1:])
            if (c, r) == (0, 2):
                reply = _tamper(reply, "seeds", [reply["seeds"][0] + 1] + reply["seeds"][1:])
            replies[c] = reply
        coordinator.finish_round(replies)
    return coordinator, states


def test_a_federation_survives_its_faults_and_a_server_restart(federation, tmp_path):
    engine, shards = federation
    numel, noise = engine.get_adapter().numel(), engine.estimator.noise
    coordinator, states = _federate(engine, shards, tmp_path / "a" / "rounds.jsonl", rounds=5)
    log = coordinator.log.rounds
    assert [r.clients for r in log] == [[0, 1, 2], [0, 1], [2], [0, 2], [0, 1, 2]]
    assert log[1].rejected == {"2": "no reply (dropped)"}
    assert log[2].rejected["1"] == "a non-finite g" and log[2].rejected["0"].startswith("a seed it was not assigned")
    assert log[3].rejected == {"1": "behind: it has applied 0 rounds (resent next round)"}
    assert log[2].bytes_down["2"] > log[2].bytes_down["0"]  # back from its drop, client 2 is sent rounds 0-1, client 0 round 1
    assert all(0 < n < 1000 for r in log for n in r.bytes_up.values())  # scalars only: 2 steps x (seed, 2 g, lr)
    assert coordinator.adapter.abs().max() > 0
    assert torch.equal(RoundLog(tmp_path / "a" / "rounds.jsonl").global_adapter(numel, noise), coordinator.adapter)
    # Every client that took part in the last round ends on the server's adapter once it applies it.
    for c in (0, 1, 2):
        states[c].catch_up([log[-1].updates], first_round=4, noise=noise)
        assert torch.equal(states[c].adapter, coordinator.adapter)
    # A server killed after round 2 resumes from its log: the same adapter, bit for bit.
    restarted, _ = _federate(engine, shards, tmp_path / "b" / "rounds.jsonl", rounds=5, restart_after=2)
    assert torch.equal(restarted.adapter, coordinator.adapter)
    # One whose clients restarted with it, without their state (a new Flower run), sends every
    # client all rounds so far: the round after the restart is the uninterrupted run's round 2.
    fresh, _ = _federate(engine, shards, tmp_path / "c" / "rounds.jsonl", rounds=5, restart_after=2,
                         clients_kept_state=False)
    after = fresh.log.rounds
    assert [(r.clients, r.updates) for r in after[:3]] == [(r.clients, r.updates) for r in log[:3]]
    assert after[2].bytes_down["0"] > log[2].bytes_down["0"]
    assert torch.equal(RoundLog(tmp_path / "c" / "rounds.jsonl").global_adapter(numel, noise, upto=3),
                       RoundLog(tmp_path / "a" / "rounds.jsonl").global_adapter(numel, noise, upto=3))
    # (Client 1, which loses its state again in round 3, is not behind there: since the restart
    # it has not been accepted, so it is still sent every round.)
    assert after[3].clients == [0, 1, 2]


def test_federate_refuses_bad_input_before_starting_anything(tmp_path, tiny_data_dir, capsys):
    from runtime_driver.commands.cli import main

    assert main(["federate", "--program", str(tmp_path / "nope"), "--data", str(tiny_data_dir),
                 "--out", str(tmp_path / "fed")]) == 2
    assert "manifest.json: not found" in capsys.readouterr().err
    assert main(["federate", "--program", str(tmp_path / "nope"), "--clients", "0", "--out", str(tmp_path / "fed")]) == 2
    assert "--clients, --rounds and --local-steps must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "fed").exists()


def test_shards_cover_the_rows_once_and_non_iid_ones_lean_to_a_label():
    from runtime_driver.federation.shards import shard_indices

    labels = [i % 2 for i in range(40)]
    for non_iid in (False, True):
        shards = shard_indices(labels, 4, non_iid, seed=0)
        assert sorted(i for s in shards for i in s) == list(range(40)) and all(len(s) == 10 for s in shards)
    skewed = shard_indices(labels, 4, True, seed=0)
    assert all(len({labels[i] for i in s}) == 1 for s in skewed)  # each of the 4 sees one label
    with pytest.raises(ValueError, match="5 clients for 4 training rows"):
        shard_indices([0, 1, 0, 1], 5, False, seed=0)
