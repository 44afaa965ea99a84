"""`prge federate` on Flower's deployment engine: a SuperLink and three SuperNodes as separate
processes on a tiny model. The global adapter the server saves is the replay of its round log
bit for bit, a client killed mid-round is left out of that round and catches up in the next,
and every process is gone afterwards (nothing listens on the ports it used)."""
from __future__ import annotations

import socket

import pytest
from safetensors.torch import load_file

from runtime_driver.commands.federate import federate, flower_processes
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
