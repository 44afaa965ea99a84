"""A clean console: the libraries' known-harmless lines are silenced at their source, every
other line still shows, and --verbose brings them all back (models/console.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
# One fragment of each silenced line: torchao's CUDA-only kernels, torch pytree's enum notices,
# torch.export's LeafSpec FutureWarning, ExecuTorch's mutated-buffer note, transformers' weight
# loading bars, the ExecuTorch runtime's cpuinfo and thread-pool logs.
NOISE = ("Failed to load", "is an Enum subclass", "LeafSpec", "Mutation on a buffer", "Loading weights",
         "cpuinfo_utils.cpp", "Resetting threadpool")


def _prge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "runtime_driver.commands.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_commands_print_only_what_a_user_can_act_on(tiny_model_dir, tiny_data_dir, tmp_path):
    model, data = str(tiny_model_dir("llama")), str(tiny_data_dir)
    export = _prge("export", "--model", model, "--data", data, "--q", "1", "--rank", "2", "--batch", "1", "--seq-len", "16",
                   "--out", str(tmp_path / "program"), cwd=tmp_path)
    train_args = ("train", "--engine", "executorch", "--program", str(tmp_path / "program"), "--data", data, "--batch", "1",
                  "--steps", "2", "--eval-every", "0", "--eval-examples", "4", "--test-examples", "4", "--threads", "1")
    train = _prge(*train_args, "--out", str(tmp_path / "run"), cwd=tmp_path)
    evaluate = _prge("eval", "--model", model, "--data", data, "--seq-len", "16", "--limit", "4", cwd=tmp_path)
    for done in (export, train, evaluate):
        assert not [n for n in NOISE if n in done.stderr], done.stderr
    assert "tracing train_step" in export.stderr  # prge's own progress still shows
    verbose = _prge(*train_args, "--out", str(tmp_path / "run-verbose"), "--verbose", cwd=tmp_path)
    assert "Failed to load" in verbose.stderr and "is an Enum subclass" in verbose.stderr  # all back
