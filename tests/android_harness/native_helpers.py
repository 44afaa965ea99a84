"""Constants and helpers of the native-driver tests (this folder is on sys.path in pytest's
default import mode, so test modules import it by name)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "android_harness" / "build.sh"
# The tiny run every native test trains: P-RGE q=2, b=2 on the tiny llama and task.
STEPS, SEED, LR, EPS, EVAL_EXAMPLES = 7, 4, 0.05, 1e-2, 24


def build(target: str) -> Path:
    """android_harness/build.sh (incremental: cmake caches the build in build/native*)."""
    done = subprocess.run([str(BUILD), target], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, f"build.sh {target} failed:\n{done.stderr[-4000:]}"
    return Path(done.stdout.strip().splitlines()[-1])


def native_args(program: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--program", str(program), "--data", str(data), "--out", str(out), "--lr", str(LR), "--eps", str(EPS),
            "--eval-every", "3", "--checkpoint-every", "3", "--quiet", *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def deterministic(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("time", "step_ms")}


def assert_same_metrics_rows(native_run: Path, python_run: Path) -> list[dict]:
    """The native run logged the Python run's rows: the same steps, seeds, lr and eps, losses
    within float32 rounding (1e-6), g within that over eps, and the same validation metrics
    (accuracy exactly; loss and perplexity to float64 rounding). Returns the native rows."""
    import pytest

    native, python = metrics(native_run), metrics(python_run)
    assert [(r["type"], r["step"]) for r in native] == [(r["type"], r["step"]) for r in python]
    for n, p in zip(native, python):
        assert set(n) == set(p)
        if n["type"] == "train":
            assert (n["seed"], n["lr"], n["eps"]) == (p["seed"], p["lr"], p["eps"])
            assert max(abs(a - b) for a, b in zip(n["losses"], p["losses"])) <= 1e-6
            assert n["g"] == pytest.approx(p["g"], abs=1e-6 / EPS)
        else:
            assert n.get("accuracy") == p.get("accuracy")
            assert n["loss"] == pytest.approx(p["loss"], abs=1e-9)
            if "perplexity" in p:  # a completion task's
                assert n["perplexity"] == pytest.approx(p["perplexity"], rel=1e-9)
    return native

