"""kill -9 during ExecuTorch training, then --resume: the same adapter, bit for bit.

Every run here is a real `prge train --engine executorch` process. It is killed either by a
SIGKILL from this test at a random moment, or by itself at a named kill point (PRGE_FAILPOINT,
runtime_driver/failpoints.py) inside a checkpoint swap, mid-way through a metrics line or the final
adapter write, where a kill from outside would almost never land.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runtime_driver.metrics import read_metrics
from runtime_driver.replay import replay_run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 10


def _command(program: Path, data: Path, out: Path, resume: bool) -> list[str]:
    return [
        sys.executable, "-m", "runtime_driver.commands.cli", "train", "--engine", "executorch", "--program", str(program),
        "--data", str(data), "--out", str(out), "--steps", str(STEPS), "--batch", "2", "--lr", "0.05",
        "--eps", "1e-2", "--seed", "4", "--checkpoint-every", "2", "--eval-every", "5", "--eval-examples", "8",
        "--test-examples", "0", "--threads", "1", *(["--resume"] if resume else []),
    ]


def _env(failpoint: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("PRGE_FAILPOINT", None)
    if failpoint:
        env["PRGE_FAILPOINT"] = failpoint
    return env


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def setup(tiny_program, tiny_data_dir, tmp_path_factory):
    program = tiny_program("llama")
    reference = tmp_path_factory.mktemp("crash") / "uninterrupted"
    done = _run(_command(program, tiny_data_dir, reference, resume=False), _env())
    assert done.returncode == 0, done.stderr[-2000:]
    return program, tiny_data_dir, reference


def _resume_and_check(setup, run_dir: Path) -> None:
    program, data, reference = setup
    done = _run(_command(program, data, run_dir, resume=True), _env())
    assert done.returncode == 0, done.stderr[-2000:]
    final, expected = _adapter(run_dir), _adapter(reference)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected), "resumed adapter differs"
    # The log reads cleanly, has every step exactly once, and agrees with the uninterrupted one.
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # no torn line survives a resume
    train = [r for r in rows if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(STEPS))
    ref = [r for r in read_metrics(reference / "metrics.jsonl") if r["type"] == "train"]
    assert [(r["seed"], r["g"]) for r in train] == [(r["seed"], r["g"]) for r in ref]
    assert [r["step"] for r in rows if r["type"] == "eval"] == [0, 5, 10]
    assert replay_run(run_dir).identical
    leftovers = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("."))
    assert leftovers == [], leftovers


# (kill point, step): where PRGE_FAILPOINT kills the first process. Checkpoints are taken after
# steps 2, 4, 6, 8, 10 (state "step" = steps done).
KILL_POINTS = [
    ("after-step@0", "before the first checkpoint"),
    ("ckpt-tmp-written@4", "new checkpoint written to its temp dir, not yet swapped in"),
    ("ckpt-old-moved@6", "between the checkpoint swap's two renames (no ckpt/ on disk)"),
    ("metrics-torn-line@7", "half of a metrics line written"),
    ("ckpt-tmp-written@10", "the final checkpoint, before its swap"),
    ("adapter-tmp-written", "the final PEFT adapter, before its swap"),
]


@pytest.mark.parametrize("failpoint, where", KILL_POINTS, ids=[k for k, _ in KILL_POINTS])
def test_kill_at_a_kill_point_then_resume(failpoint, where, setup, tmp_path):
    program, data, _ = setup
    run_dir = tmp_path / "run"
    killed = _run(_command(program, data, run_dir, resume=False), _env(failpoint))
    assert killed.returncode == -signal.SIGKILL, f"not killed {where}: rc {killed.returncode}"
    if failpoint.startswith("metrics-torn-line"):
        assert not (run_dir / "metrics.jsonl").read_text().endswith("\n")  # the torn line is there
        assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"] == list(range(7))
    if failpoint.startswith("ckpt-old-moved"):
        assert not (run_dir / "ckpt").exists() and list(run_dir.glob(".ckpt-old.*"))
    _resume_and_check(setup, run_dir)


def test_kill_at_random_moments_repeatedly_then_resume(setup, tmp_path):
    """SIGKILL from outside after a random number of logged steps, three times in a row on the
    same run (each resume is itself killed), then a last resume to the end."""
    program, data, _ = setup
    run_dir = tmp_path / "run"
    rng = random.Random(7)
    for attempt in range(3):
        target = rng.randint(1, STEPS - 2)
        proc = subprocess.Popen(_command(program, data, run_dir, resume=attempt > 0), env=_env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            rows = read_metrics(run_dir / "metrics.jsonl")
            if any(r.get("type") == "train" and r["step"] >= target for r in rows):
                time.sleep(rng.uniform(0.0, 0.05))  # land anywhere in the following work
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        assert proc.wait(timeout=60) == -signal.SIGKILL, f"attempt {attempt}: finished before step {target}"
    _resume_and_check(setup, run_dir)
