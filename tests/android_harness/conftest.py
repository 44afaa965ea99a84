"""Fixtures of the native-driver tests: the built binary, a tiny program's data file, runs."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from native_helpers import EVAL_EXAMPLES, SEED, STEPS, build, native_args


@pytest.fixture(scope="session")
def native_binary() -> Path:
    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {', '.join(missing)} on this machine (.ci/run installs them)")
    return build("host")


@pytest.fixture(scope="session")
def program(tiny_program) -> Path:
    # micro_batch=2: train_step's 8 rows run as a loop of 4 pieces, so the native runtime is
    # shown to run the exported loop (scan) exactly like the Python runtime.
    return tiny_program("llama", micro_batch=2)


@pytest.fixture(scope="session")
def data_file(program, tiny_data_dir, tmp_path_factory) -> Path:
    from runtime_driver.commands.export_data import export_data

    return export_data(program, tiny_data_dir, tmp_path_factory.mktemp("native-data") / "data.bin",
                       steps=STEPS, seed=SEED, eval_examples=EVAL_EXAMPLES)


@pytest.fixture(scope="session")
def run_native(native_binary) -> Callable[..., subprocess.CompletedProcess]:
    """run(program, data, out, *extra, env=None, launcher=()) -> the finished process."""

    def run(program: Path, data: Path, out: Path, *extra: str, env: dict | None = None, launcher=(), binary=None):
        cmd = [*launcher, str(binary or native_binary), *native_args(program, data, out, *extra)]
        return subprocess.run(cmd, capture_output=True, text=True, errors="replace", env={**os.environ, **(env or {})}, timeout=600)

    return run


@pytest.fixture(scope="session")
def native_run(run_native, program, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("native") / "run"
    done = run_native(program, data_file, out)
    assert done.returncode == 0, done.stderr
    return out

