"""run/ckpt/: the adapter (safetensors) and the loop state (JSON), replaced atomically.

A checkpoint is always taken with no pending update (the driver applies it first), so the
adapter plus the step to run next is the whole training state: the data order and the noise
seeds are pure functions of (run seed, step).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from prge.failpoints import reached

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.json"


class CheckpointError(ValueError):
    pass


@dataclass
class Checkpoint:
    adapter: Tensor  # flat B, float32
    step: int  # the next step to run
    state: dict[str, Any]  # everything else recorded (next seed, data position, fingerprint)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt_dir: str | Path, adapter: Tensor, state: dict[str, Any]) -> None:
    """Write into a fresh temp dir, fsync, then swap it in with renames: a reader (or a resumed
    run after kill -9) sees either the old checkpoint or the new one, never a mix."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-new.", dir=ckpt_dir.parent))
    save_file({"adapter": adapter.detach().to(torch.float32).contiguous()}, str(tmp / ADAPTER_FILE))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    reached("ckpt-tmp-written", state.get("step"))
    if ckpt_dir.exists():
        os.replace(ckpt_dir, ckpt_dir.parent / f".ckpt-old.{os.getpid()}")
        reached("ckpt-old-moved", state.get("step"))
    os.replace(tmp, ckpt_dir)
    _fsync_dir(ckpt_dir.parent)
    # The new checkpoint is in place: drop this swap's old copy and any a killed run left behind.
    for stale in (*ckpt_dir.parent.glob(".ckpt-new.*"), *ckpt_dir.parent.glob(".ckpt-old.*")):
        shutil.rmtree(stale, ignore_errors=True)


def find_checkpoint_dir(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ckpt/ or, if a kill hit between the two renames of
    save_checkpoint, the complete old copy it had moved aside."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / STATE_FILE).is_file():
        return ckpt_dir
    olds = sorted(ckpt_dir.parent.glob(".ckpt-old.*"))
    for old in olds:
        if (old / STATE_FILE).is_file():
            return old
    return None


def load_checkpoint(ckpt_dir: str | Path) -> Checkpoint:
    found = find_checkpoint_dir(ckpt_dir)
    if found is None:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint to resume from")
    try:
        state = json.loads((found / STATE_FILE).read_text())
        adapter = load_file(str(found / ADAPTER_FILE))["adapter"]
    except Exception as e:
        raise CheckpointError(f"{found}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or isinstance(state["step"], bool):
        raise CheckpointError(f"{found / STATE_FILE}: missing integer 'step'")
    if state["step"] < 0:
        raise CheckpointError(f"{found / STATE_FILE}: negative step {state['step']}")
    if adapter.dtype != torch.float32 or adapter.dim() != 1:
        raise CheckpointError(f"{found / ADAPTER_FILE}: expected a flat float32 adapter, got {adapter.dtype} {list(adapter.shape)}")
    return Checkpoint(adapter=adapter, step=state["step"], state=state)
