"""`prge federate` on Flower, tiny model. Deployment engine: a SuperLink and three SuperNodes as
separate processes; the global adapter the server saves is the replay of its round log bit for
bit, a client killed mid-round is left out of that round and catches up in the next, a client
whose SuperNode dies is started again, re-admitted under its new node id and caught up, a server
killed after a round resumes (`--resume`) to the adapter of an uninterrupted run, and every
process is gone afterwards (nothing listens on the ports it used). Simulation engine: virtual
clients on Ray workers, the same guarantees; the FedAvg and centralized baselines."""
from __future__ import annotations

import json
import socket
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from runtime_driver.commands.federate import _check_resume, federate, flower_processes
from runtime_driver.commands.summarize import summarize
from runtime_driver.federation.settings import FederationSettings
from runtime_driver.federation.ledger import RoundLog

pytestmark = pytest.mark.slow


def test_three_clients_on_the_deployment_engine(tiny_program, tiny_data_dir, tmp_path):
    program = tiny_program("llama")
    out = tmp_path / "fed"
    cfg = FederationSettings(program=str(program), data=str(tiny_data_dir), out=str(out), clients=3, rounds=3,
                         local_steps=2, lr=0.05, eps=0.01, timeout=300, eval_every=1, eval_examples=8)
    # Client 2's ClientApp process is killed (SIGKILL) in round 1, mid-round.
    summary = federate(cfg, client_env={2: {"PRGE_FAILPOINT": "federated-client@1"}}, progress=lambda _: None)
    log = RoundLog(out / "rounds.jsonl")
    assert [r.clients for r in log.rounds] == [[0, 1, 2], [0, 1], [0, 1, 2]]
    assert set(log.rounds[1].rejected) == {"2"}
    assert log.rounds[2].bytes_down["2"] > log.rounds[2].bytes_down["0"]  # client 2 is sent rounds 0 and 1
    assert all(n < 1000 for r in log.rounds for n in r.bytes_up.values())
    assert all("loss" in r.metrics for r in log.rounds)
    saved = load_file(str(out / "adapter.safetensors"))["adapter"]
    assert saved.abs().max() > 0
    replayed = RoundLog(out / "rounds.jsonl").global_adapter(saved.numel(), "gaussian")
    assert (saved == replayed).all()
    assert (out / "adapter" / "adapter_model.safetensors").exists() and summary["rounds"] == 3
    assert flower_processes(out / "flower-home") == []
    port = int((out / "flower-home" / "config.toml").read_text().split("127.0.0.1:")[1].split('"')[0])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_client_whose_supernode_dies_is_started_again_readmitted_and_caught_up(tiny_program, tiny_data_dir, tmp_path):
    program = tiny_program("llama")
    out = tmp_path / "fed"
    cfg = FederationSettings(program=str(program), data=str(tiny_data_dir), out=str(out), clients=3, rounds=4,
                             local_steps=2, lr=0.05, eps=0.01, timeout=150, eval_every=0, eval_examples=8)
    # Client 1's SuperNode and its ClientApp are killed (SIGKILL) in round 1, mid-round: the phone's
    # app died, its state with it. prge federate starts the SuperNode again, as a phone's OS would.
    federate(cfg, client_env={1: {"PRGE_FAILPOINT": "federated-node@1"}}, progress=lambda _: None)
    log = RoundLog(out / "rounds.jsonl")
    assert [r.clients for r in log.rounds][:2] == [[0, 1, 2], [0, 2]] and set(log.rounds[1].rejected) == {"1"}
    # Re-admitted under its new node id; it lost the rounds it had applied, so it is caught up
    # from round 0 (a round it answers while still behind is rejected and resent).
    assert log.rounds[-1].clients == [0, 1, 2]
    assert all(reason.startswith("behind") for r in log.rounds[2:] for c, reason in r.rejected.items() if c == "1")
    assert (out / "logs" / "supernode-1-restart-1.log").exists()
    assert '"readmitted as client": 1' in (out / "logs" / "server.log").read_text()
    saved = load_file(str(out / "adapter.safetensors"))["adapter"]
    assert (saved == RoundLog(out / "rounds.jsonl").global_adapter(saved.numel(), "gaussian")).all()
    assert flower_processes(out / "flower-home") == []


def test_a_server_killed_after_a_round_resumes_to_the_adapter_of_an_uninterrupted_run(tiny_program, tiny_data_dir, tmp_path):
    program = tiny_program("llama")

    def settings(out):
        return FederationSettings(program=str(program), data=str(tiny_data_dir), out=str(out), clients=3, rounds=3,
                                  local_steps=2, lr=0.05, eps=0.01, timeout=300, eval_every=0, eval_examples=8)

    federate(settings(tmp_path / "whole"), progress=lambda _: None)
    out = tmp_path / "restarted"
    # The SuperLink and its ServerApp are killed (SIGKILL) once round 1 is logged: the server died.
    with pytest.raises(RuntimeError, match="did not finish"):
        federate(settings(out), server_env={"PRGE_FAILPOINT": "federated-server@1"}, progress=lambda _: None)
    assert RoundLog(out / "rounds.jsonl").next_round == 2 and flower_processes(out / "flower-home") == []
    # Its folder is not continued by accident, nor under other settings.
    with pytest.raises(ValueError, match="holds an earlier federation .2 rounds logged.: --resume continues it"):
        federate(settings(out), progress=lambda _: None)
    with pytest.raises(ValueError, match="these differ: lr 0.05 .now 0.1."):
        federate(replace(settings(out), lr=0.1), resume=True, progress=lambda _: None)
    assert RoundLog(out / "rounds.jsonl").next_round == 2

    # A new Flower run (new SuperLink, new SuperNodes without their state) goes on from round 2;
    # every client is sent rounds 0-1 (not just round 1: it lost round 0 with its state), so
    # round 2 counts all three as uninterrupted.
    federate(settings(out), resume=True, progress=lambda _: None)
    resumed, whole = RoundLog(out / "rounds.jsonl").rounds, RoundLog(tmp_path / "whole" / "rounds.jsonl").rounds
    assert [r.clients for r in resumed] == [r.clients for r in whole] == [[0, 1, 2]] * 3
    assert [r.updates for r in resumed] == [r.updates for r in whole]
    assert all(resumed[2].bytes_down[c] > whole[2].bytes_down[c] for c in ("0", "1", "2"))
    saved = load_file(str(out / "adapter.safetensors"))["adapter"]
    assert saved.abs().max() > 0 and torch.equal(saved, load_file(str(tmp_path / "whole" / "adapter.safetensors"))["adapter"])
    assert flower_processes(out / "flower-home") == []


def test_resume_takes_the_program_given_by_another_path_as_the_same_program(tmp_path, monkeypatch):
    """--resume compares the settings a run began with; the same folder named relative instead
    of absolute is no change, another folder is."""
    out, program = tmp_path / "run", tmp_path / "program"
    out.mkdir(), program.mkdir(), (tmp_path / "other").mkdir()
    began = {"program": str(program), "out": str(out), "method": "prge", "lr": 0.05, "timeout": 300}
    (out / "federation.json").write_text(json.dumps(began))
    (out / "rounds.jsonl").write_text(json.dumps({"round": 0}) + "\n")
    monkeypatch.chdir(tmp_path)
    _check_resume(out, {**began, "program": "program", "out": "run", "timeout": 60}, resume=True)
    with pytest.raises(ValueError, match="these differ: program '.*program' .now 'other'.$"):
        _check_resume(out, {**began, "program": "other"}, resume=True)


def test_the_fedavg_baseline_equals_mean_aggregated_prge_and_centralized_runs_the_same_forwards(
        tiny_program, tiny_data_dir, tmp_path):
    """Flower's FedAvg of the adapters after the same local steps (equal shards: 64 rows, 2
    clients) is the mean-aggregated P-RGE round up to rounding, at 2,000x the bytes here; the
    centralized baseline trains clients * rounds * local_steps steps on one device."""
    program = tiny_program("llama")
    runs = {}
    for method, aggregate in (("prge", "mean"), ("fedavg", "mean"), ("centralized", "sum")):
        out = tmp_path / method
        cfg = FederationSettings(program=str(program), data=str(tiny_data_dir), out=str(out), method=method,
                                 aggregate=aggregate, clients=2, rounds=2, local_steps=2, lr=0.05, eps=0.01,
                                 timeout=300, eval_examples=8, test_examples=8)
        summary = federate(cfg, engine="simulation", progress=lambda _: None)
        runs[method] = (summary, load_file(str(out / "adapter.safetensors"))["adapter"])
    (prge, prge_adapter), (fedavg, fedavg_adapter), (central, central_adapter) = runs["prge"], runs["fedavg"], runs["centralized"]
    assert prge_adapter.abs().max() > 0
    torch.testing.assert_close(fedavg_adapter, prge_adapter, atol=1e-6, rtol=1e-5)
    assert [r.clients for r in RoundLog(tmp_path / "fedavg" / "rounds.jsonl").rounds] == [[0, 1], [0, 1]]
    assert 0 <= fedavg["bytes_per_client_round"]["up"] - prge_adapter.numel() * 4 < 256  # the float32 adapter (+ .npy header)
    assert fedavg["bytes_per_client_round"]["up"] > 20 * prge["bytes_per_client_round"]["up"]
    assert prge["forward_rows"] == fedavg["forward_rows"] == central["forward_rows"] == 2 * 2 * 2 * (2 * 2 * 2)
    assert central["steps_run"] == 8 and not torch.equal(central_adapter, prge_adapter)
    assert {"accuracy", "loss"} <= set(prge["test"]) and {"accuracy", "loss"} <= set(central["test"])
    # `prge summarize` tabulates the three from their files, and draws their validation curves.
    table = summarize([str(tmp_path / m) for m in ("centralized", "prge", "fedavg")], plot=str(tmp_path / "fed.png"))
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r[1] for r in rows] == ["centralized P-RGE (one device, all rows)", "federated P-RGE (seeds and scalars, mean)",
                                    "FedAvg of the adapter (Flower's strategy)"]
    assert rows[1][7] == f"{prge['bytes_per_client_round']['down']:,.0f}" and rows[2][6] == f"{fedavg['bytes_per_client_round']['up']:,.0f}"
    assert rows[1][8] == f"{prge['test']['accuracy']:.3f}" and (tmp_path / "fed.png").stat().st_size > 0


def test_eight_clients_on_the_simulation_engine(tiny_program, tiny_data_dir, tmp_path):
    """Flower's simulation engine: 8 virtual clients on Ray workers in one `flwr run`; the same
    round log and replay guarantee as the deployment engine, and nothing left running."""
    program = tiny_program("llama")
    out = tmp_path / "sim"
    cfg = FederationSettings(program=str(program), data=str(tiny_data_dir), out=str(out), clients=8, rounds=2,
                             local_steps=1, lr=0.05, eps=0.01, timeout=300, eval_examples=8, non_iid=True)
    summary = federate(cfg, engine="simulation", progress=lambda _: None)
    log = RoundLog(out / "rounds.jsonl")
    assert [r.clients for r in log.rounds] == [list(range(8))] * 2 and not any(r.rejected for r in log.rounds)
    saved = load_file(str(out / "adapter.safetensors"))["adapter"]
    assert saved.abs().max() > 0 and torch.equal(saved, log.global_adapter(saved.numel(), "gaussian"))
    assert summary["forward_rows"] == 2 * 8 * (2 * 2 * 2)
    assert flower_processes(out / "flower-home") == []
