"""`prge federate`: federated P-RGE on Flower's deployment engine, on this machine.

A SuperLink and one SuperNode per client start as separate processes (each SuperNode runs its
ClientApp in a fresh process per round), the ServerApp runs with `flwr run` on the app folder
runtime_driver/federation/flower-app, and every process is stopped at the end, also on an
error or Ctrl-C, so nothing is left listening. Flower's telemetry, update check and run-time
dependency installation are off: nothing but localhost is contacted.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from export.contract.manifest import TRAINING, program_kind, read_manifest
from models.console import say
from models.tasks.folder import resolve_data_dir
from runtime_driver.federation.settings import FederationSettings

APP_DIR = Path(__file__).resolve().parents[1] / "federation" / "flower-app"
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_LOG_LEVEL": "WARNING"}
FEDERATION = "prge-local"  # the SuperLink entry `flwr run` reads from FLWR_HOME/config.toml


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _wait_healthy(port: int, process: subprocess.Popen, log: Path, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the SuperLink exited ({process.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the SuperLink did not answer on port {port} within {seconds:g} s; see {log}")


def flower_processes(home: Path) -> list[int]:
    """Pids of the live processes of the federation whose FLWR_HOME is `home`: every Flower
    process inherits it, including helpers the SuperLink and SuperNodes start detached in
    sessions of their own (Linux /proc; zombies hold nothing and are left to their parents)."""
    marker = f"FLWR_HOME={home.resolve()}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                continue
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(pid))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _stop(processes: list[subprocess.Popen], home: Path) -> None:
    """SIGTERM each started process (newest first), then every other process of the
    federation; SIGKILL what still runs after 20 s."""
    for p in reversed(processes):
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 20
    for p in reversed(processes):
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in flower_processes(home):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        while flower_processes(home) and time.monotonic() < deadline:
            time.sleep(0.2)
        deadline = time.monotonic() + 5


def federate(cfg: FederationSettings, client_env: dict[int, dict[str, str]] | None = None,
             progress: Callable[[str], None] = say) -> dict[str, Any]:
    """Run the federation; returns the server's summary. client_env: extra environment of a
    client's SuperNode (the crash tests arm a failpoint in one client)."""
    if cfg.clients < 1 or cfg.rounds < 1 or cfg.local_steps < 1:
        raise ValueError("--clients, --rounds and --local-steps must be at least 1")
    # Bad input fails here, before any process starts; the task is prepared once, not by every client.
    manifest = read_manifest(cfg.program)
    if program_kind(manifest) != TRAINING:
        raise ValueError(f"{cfg.program}: a generation program; federate a training program (`prge export`)")
    cfg = replace(cfg, data=str(resolve_data_dir(cfg.data or None, progress=progress)))
    run_config = cfg.run_config()
    out = Path(cfg.out)
    logs, home = out / "logs", out / "flower-home"
    logs.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # written again when the last round is done
    home.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    superlink_port, *node_ports = _free_ports(1 + cfg.clients)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
                                      f'address = "127.0.0.1:{superlink_port}"\ninsecure = true\n')
    # Flower starts its helper processes (flower-superexec, flwr-clientapp) by name: the
    # environment prge runs in must come first on PATH.
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home.resolve()),
           "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])}
    processes: list[subprocess.Popen] = []

    def start(name: str, command: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(logs / f"{name}.log", "w") as log:
            p = subprocess.Popen(command, env={**env, **(extra_env or {})}, stdout=log, stderr=subprocess.STDOUT)
        processes.append(p)
        return p

    try:
        superlink = start("superlink", [str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                        "--port", str(superlink_port)])
        _wait_healthy(superlink_port, superlink, logs / "superlink.log")
        for i, port in enumerate(node_ports):
            start(f"supernode-{i}", [str(bin_dir / "flower-supernode"), "--insecure", "--superlink",
                                     f"127.0.0.1:{superlink_port}", "--port", str(port), "--node-config",
                                     f"partition-id={i} num-partitions={cfg.clients}"], (client_env or {}).get(i))
        progress(f"Flower: a SuperLink and {cfg.clients} SuperNodes on 127.0.0.1 (logs in {logs}); "
                 f"{cfg.rounds} rounds of {cfg.local_steps} local steps ...")
        with open(logs / "server.log", "w") as server_log:
            run = subprocess.Popen([str(bin_dir / "flwr"), "run", str(APP_DIR), FEDERATION, "--stream",
                                    "--run-config", run_config], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
            processes.append(run)
            for line in run.stdout:  # the ServerApp's log, streamed: one JSON line a round
                server_log.write(line)
                if line.lstrip().startswith('{"round"'):
                    progress("  " + line.strip())
            code = run.wait()
        summary_path = out / "summary.json"
        if code != 0 or not summary_path.exists():
            raise RuntimeError(f"the federation did not finish (flwr run exited {code}); see {logs / 'server.log'}")
        return json.loads(summary_path.read_text())
    finally:
        _stop(processes, home)
