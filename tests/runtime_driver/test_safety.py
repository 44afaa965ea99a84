"""Safety: no pickle anywhere, no network at run time, nothing written outside the run directory."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("prge", "models", "export", "runtime_driver")

# Any of these loads or writes pickles (torch.load without weights_only is pickle too).
UNSAFE = re.compile(r"\bimport pickle\b|\bpickle\.|\bcloudpickle\b|\btorch\.load\(|\btorch\.save\(|"
                    r"weights_only\s*=\s*False|trust_remote_code\s*=\s*True|\bdill\b")


def test_no_pickle_in_the_code() -> None:
    offenders = []
    for folder in SOURCE_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if UNSAFE.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


# Runs a prge command with every socket connection and DNS lookup refused by an audit hook.
_NO_NETWORK = """
import sys
def refuse(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request"):
        raise PermissionError(f"network access attempted at run time: {event} {args!r:.200}")
sys.addaudithook(refuse)
from runtime_driver.commands.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["eager", "executorch"])
def test_training_needs_no_network_and_writes_only_its_run_directory(engine, tiny_model_dir, tiny_data_dir,
                                                                     tiny_program, tmp_path):
    model = shutil.copytree(tiny_model_dir("llama"), tmp_path / "model")
    data = shutil.copytree(tiny_data_dir, tmp_path / "data")
    program = shutil.copytree(tiny_program("llama"), tmp_path / "program")
    run = tmp_path / "work" / "run"
    before = _snapshot(tmp_path)
    source = ["--program", str(program)] if engine == "executorch" else ["--model", str(model), "--seq-len", "16", "--q", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # prge must set offline mode itself
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", _NO_NETWORK, "train", "--engine", engine, *source, "--data", str(data), "--out", str(run),
         "--steps", "2", "--batch", "2", "--eval-every", "0", "--test-examples", "4", "--checkpoint-every", "1",
         "--threads", "1"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    after = _snapshot(tmp_path)
    changed = {name for name in set(before) | set(after) if before.get(name) != after.get(name)}
    assert changed and all(name.startswith("work/run/") for name in changed), sorted(changed)
