"""`prge federate`: federated P-RGE on Flower, on this machine, and its two baselines.

Deployment engine: a SuperLink and one SuperNode per client start as separate processes (each
SuperNode runs its ClientApp in a fresh process per round; a SuperNode that dies is started
again, see _NodeKeeper). Simulation engine: `flwr run`
starts a simulation SuperLink that runs N virtual clients on Ray workers. Either way the
ServerApp runs with `flwr run` on the app folder runtime_driver/federation/flower-app, and every
process is stopped at the end, also on an error or Ctrl-C, so nothing is left listening.
Flower's telemetry, update check and run-time dependency installation and Ray's usage report
are off: nothing but localhost is contacted.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from export.contract.manifest import TRAINING, program_kind, read_manifest
from models.console import say
from models.files import cache_dir, write_json_atomic
from models.tasks.folder import resolve_data_dir
from runtime_driver.checkpoint import write_flat_adapter
from runtime_driver.federation.protocol import AGGREGATES
from runtime_driver.federation.settings import METHODS, FederationSettings, forward_rows
from runtime_driver.metrics import read_metrics
from runtime_driver.replay import replay_run
from runtime_driver.run import RunConfig, run_training
from runtime_driver.train import TrainConfig

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


MAX_NODE_RESTARTS = 3  # per SuperNode and run: a node that keeps dying is a bug to see, not to hide


class _NodeKeeper(threading.Thread):
    """Plays a phone's OS for the SuperNodes on this machine: one that exits while the run goes
    on is started again, with the same partition-id, a new port and a log of its own, at most
    MAX_NODE_RESTARTS times. The server re-admits it under its new node id and catches it up
    (runtime_driver/federation/flower.py _readmit)."""

    def __init__(self, nodes: dict[int, subprocess.Popen], restart: Callable[[int, int], subprocess.Popen],
                 progress: Callable[[str], None]) -> None:
        super().__init__(daemon=True)
        self.nodes, self.restart, self.progress = nodes, restart, progress
        self.restarts = {slot: 0 for slot in nodes}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            for slot, node in list(self.nodes.items()):
                code = node.poll()
                if code is None or self.restarts[slot] >= MAX_NODE_RESTARTS:
                    continue
                self.restarts[slot] += 1
                self.progress(f"  SuperNode {slot} exited ({code}); started again ({self.restarts[slot]} of {MAX_NODE_RESTARTS})")
                self.nodes[slot] = self.restart(slot, self.restarts[slot])


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


def centralized(cfg: FederationSettings, manifest: dict[str, Any], resume: bool = False,
                progress: Callable[[str], None] = say) -> dict[str, Any]:
    """The baseline a federation is measured against: one device trains on all the training
    rows (no shards) for clients * rounds * local_steps P-RGE steps, the federation's forward
    passes, through the same program; validated as often (every eval_every rounds' steps)."""
    steps_per_round = cfg.clients * cfg.local_steps
    train = TrainConfig(method="prge", steps=cfg.rounds * steps_per_round, batch_size=int(manifest["shapes"]["batch_size"]),
                        lr=cfg.lr, eps=cfg.eps, seed=cfg.seed, eval_every=cfg.eval_every * steps_per_round,
                        eval_examples=cfg.eval_examples)
    progress(f"Centralized P-RGE: {train.steps} steps on one device, the federation's forward passes ...")
    summary = run_training(RunConfig(program=cfg.program, data=cfg.data, out=cfg.out, engine="executorch",
                                     test_examples=cfg.test_examples, train=train), resume=resume, progress=progress)
    # The federated runs' flat adapter file, here from the run's own log (replay checks it
    # against the saved PEFT adapter).
    replayed = replay_run(cfg.out)
    if not replayed.identical:
        raise RuntimeError(f"{cfg.out}: the centralized run's log does not replay to its adapter")
    write_flat_adapter(Path(cfg.out) / "adapter.safetensors", replayed.adapter)
    summary.update(method="centralized", rounds=cfg.rounds, clients=cfg.clients, local_steps=cfg.local_steps,
                   forward_rows=forward_rows(train.steps, int(manifest["num_queries"]), train.batch_size),
                   bytes_per_client_round={"down": 0.0, "up": 0.0})
    write_json_atomic(Path(cfg.out) / "summary.json", summary)
    return summary


ENGINES = ("deployment", "simulation")


def _write_flower_config(home: Path, superlink: str) -> None:
    """FLWR_HOME/config.toml: the one SuperLink `flwr run` talks to (superlink: its TOML lines)."""
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n{superlink}\n')
# Ray (the simulation engine's backend) on localhost only: no usage report, its services bound
# to 127.0.0.1 (this flag also skips the 8.8.8.8 "which address am I" probe), and, with a
# ray_bootstrap_config.yaml in HOME, no cloud-metadata probe by its dashboard process
# (ray/_private/services.py and ray/_common/usage/usage_lib.py of ray 2.55).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


# Settings a resumed federation may change: how long a round waits changes nothing it computes.
RESUMABLE_CHANGES = ("timeout",)
# Settings that name a file or folder: the same one given by another path (relative instead of
# absolute, through a symlink) is no change. A relative path in the record is taken from the
# current folder, as it was when the run began from there.
PATH_SETTINGS = ("program", "data", "out")


def _setting_differs(key: str, earlier: Any, now: Any) -> bool:
    if key in PATH_SETTINGS and isinstance(earlier, str) and isinstance(now, str) and earlier and now:
        return Path(earlier).resolve() != Path(now).resolve()
    return earlier != now


def _check_resume(out: Path, settings: dict[str, Any], resume: bool) -> None:
    """A federation's folder holds one run. Without --resume, one that has begun is refused (its
    rounds would be continued silently under new settings); with it, the settings must be
    those the run began with, so the round log stays the log of one federation."""
    record, rounds = out / "federation.json", len(read_metrics(out / "rounds.jsonl"))
    begun = rounds > 0 or (out / "ckpt").exists() or (out / "metrics.jsonl").exists()  # federated, or centralized
    if not record.is_file() or not begun:
        return
    if not resume:
        held = f"{rounds} rounds logged" if rounds else "its centralized run's log"
        raise ValueError(f"{out} holds an earlier federation ({held}): --resume continues it with the "
                         "same settings, or give a new --out")
    earlier = json.loads(record.read_text())
    changed = sorted(k for k in settings.keys() | earlier.keys()
                     if k not in RESUMABLE_CHANGES and _setting_differs(k, earlier.get(k), settings.get(k)))
    if changed:
        raise ValueError(f"{record}: --resume continues a run with its own settings; these differ: "
                         + ", ".join(f"{k} {earlier.get(k)!r} (now {settings.get(k)!r})" for k in changed))
    if settings["method"] == "fedavg":  # Flower's strategy keeps its state in the ServerApp process
        raise ValueError(f"{out}: the FedAvg baseline does not resume; give a new --out")


def federate(cfg: FederationSettings, engine: str = "deployment", resume: bool = False,
             client_env: dict[int, dict[str, str]] | None = None, server_env: dict[str, str] | None = None,
             progress: Callable[[str], None] = say) -> dict[str, Any]:
    """Run the federation on Flower's deployment or simulation engine (or the centralized
    baseline); returns the server's summary. resume: continue the run in cfg.out (the server
    replays its round log and goes on from the next round). client_env: extra environment of a
    client's SuperNode, deployment engine; server_env: of the SuperLink and the ServerApp (the
    crash tests arm failpoints with them)."""
    if cfg.clients < 1 or cfg.rounds < 1 or cfg.local_steps < 1:
        raise ValueError("--clients, --rounds and --local-steps must be at least 1")
    if cfg.method not in METHODS or cfg.aggregate not in AGGREGATES or engine not in ENGINES:
        raise ValueError(f"--method is one of {', '.join(METHODS)}, --aggregate one of {', '.join(AGGREGATES)} "
                         f"and --engine one of {', '.join(ENGINES)}")
    # Bad input fails here, before any process starts; the task is prepared once, not by every client.
    manifest = read_manifest(cfg.program)
    if program_kind(manifest) != TRAINING:
        raise ValueError(f"{cfg.program}: a {program_kind(manifest)} program; federate a P-RGE training program (`prge export`)")
    cfg = replace(cfg, data=str(resolve_data_dir(cfg.data or None, progress=progress)))
    run_config = "" if cfg.method == "centralized" else cfg.run_config()  # refuses paths Flower cannot carry
    settings = {**asdict(cfg), "engine": engine}
    _check_resume(Path(cfg.out), settings, resume)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(cfg.out) / "federation.json", settings)  # what `prge summarize` reads
    if cfg.method == "centralized":
        return centralized(cfg, manifest, resume, progress)
    out = Path(cfg.out)
    logs, home = out / "logs", out / "flower-home"
    logs.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # written again when the last round is done
    home.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    # Flower starts its helper processes (flower-superlink, flower-superexec, flwr-clientapp)
    # by name: the environment prge runs in must come first on PATH.
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home.resolve()),
           "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])}
    processes: list[subprocess.Popen] = []
    ray_tmp, keeper = None, None
    log_mode = "a" if resume else "w"  # a resumed run's logs follow those of the run it continues

    def start(name: str, command: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(logs / f"{name}.log", log_mode) as log:
            p = subprocess.Popen(command, env={**env, **(extra_env or {})}, stdout=log, stderr=subprocess.STDOUT)
        processes.append(p)
        return p

    try:
        run = [str(bin_dir / "flwr"), "run", str(APP_DIR), FEDERATION, "--stream", "--run-config", run_config]
        if engine == "simulation":
            # `flwr run` starts a simulation SuperLink of its own (detached; stopped with the
            # rest by FLWR_HOME), which runs the N virtual nodes' ClientApps on Ray workers:
            # one at a time, each with every core (a client's step already uses them all).
            http_port, control_port = _free_ports(2)
            _write_flower_config(home, 'address = ":local-in-memory:"')
            (home / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
            ray_tmp = tempfile.mkdtemp(prefix="prge-ray-")  # short: Ray's socket paths must fit 107 bytes
            cpus = os.cpu_count() or 1
            env.update(RAY_ENV, HOME=str(home.resolve()), RAY_TMPDIR=ray_tmp, PRGE_CACHE=str(cache_dir()),
                       FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port), FLWR_LOCAL_CONTROL_API_PORT=str(control_port))
            run += ["--federation-config",
                    f"num-supernodes={cfg.clients} client-resources-num-cpus={cpus} init-args-num-cpus={cpus}"]
            progress(f"Flower simulation engine: {cfg.clients} virtual clients (logs in {logs}); "
                     f"{cfg.rounds} rounds of {cfg.local_steps} local steps ...")
        else:
            superlink_port, *node_ports = _free_ports(1 + cfg.clients)
            _write_flower_config(home, f'address = "127.0.0.1:{superlink_port}"\ninsecure = true')
            superlink = start("superlink", [str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                            "--port", str(superlink_port)], server_env)
            _wait_healthy(superlink_port, superlink, logs / "superlink.log")

            def supernode(slot: int, restarts: int = 0) -> subprocess.Popen:
                port = node_ports[slot] if restarts == 0 else _free_ports(1)[0]
                return start(f"supernode-{slot}" + (f"-restart-{restarts}" if restarts else ""),
                             [str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{superlink_port}",
                              "--port", str(port), "--node-config", f"partition-id={slot} num-partitions={cfg.clients}"],
                             (client_env or {}).get(slot))

            keeper = _NodeKeeper({slot: supernode(slot) for slot in range(cfg.clients)}, supernode, progress)
            keeper.start()
            progress(f"Flower: a SuperLink and {cfg.clients} SuperNodes on 127.0.0.1 (logs in {logs}); "
                     f"{cfg.rounds} rounds of {cfg.local_steps} local steps ...")
        with open(logs / "server.log", log_mode) as server_log:
            # (the simulation engine's SuperLink is started by `flwr run`: server_env reaches it from here)
            flwr_run = subprocess.Popen(run, env={**env, **(server_env or {})}, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
            processes.append(flwr_run)
            for line in flwr_run.stdout:  # the ServerApp's log, streamed: one JSON line a round
                server_log.write(line)
                if line.lstrip().startswith('{"round"'):
                    progress("  " + line.strip())
            code = flwr_run.wait()
        # `flwr run --stream` exits 0 even when the ServerApp failed: the summary, written last, tells.
        summary_path = out / "summary.json"
        if code != 0 or not summary_path.exists():
            raise RuntimeError(f"the federation did not finish (flwr run exited {code}); see {logs / 'server.log'}")
        return json.loads(summary_path.read_text())
    finally:
        if keeper is not None:
            keeper.done.set()
            keeper.join()
        _stop(processes, home)
        if ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)
