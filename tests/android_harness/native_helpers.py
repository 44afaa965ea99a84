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
