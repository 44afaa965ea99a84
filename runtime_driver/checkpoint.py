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
# A flat-adapter file holds one float32 tensor under this key: checkpoints, the native
# driver's final adapter and `prge replay --out` all use it.
ADAPTER_KEY = "adapter"


class CheckpointError(ValueError):
    pass


@dataclass
class Checkpoint:
    adapter: Tensor  # flat B, float32
    step: int  # the next step to run
    state: dict[str, Any]  # everything else recorded (next seed, data position, fingerprint)


def write_flat_adapter(path: str | Path, adapter: Tensor) -> None:
    """Write a flat-adapter file through a temp name, fsynced, then renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({ADAPTER_KEY: adapter.detach().to(torch.float32).contiguous()}, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_flat_adapter(path: str | Path, what: str = "adapter file", numel: int | None = None) -> Tensor:
    """The flat float32 B of a flat-adapter file; anything else is a CheckpointError naming the
    file (`what` says what the file was meant to be, numel what size it must have)."""
    path = Path(path)
    try:
        flat = load_file(str(path)).get(ADAPTER_KEY)
    except Exception as e:  # safetensors raises several types for missing or corrupt files
        raise CheckpointError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None
    if flat is None or flat.dtype != torch.float32 or flat.dim() != 1 or (numel is not None and flat.numel() != numel):
        got = "nothing" if flat is None else f"{flat.dtype} {list(flat.shape)}"
        size = f", {numel} values (this program's)" if numel is not None else ""
        raise CheckpointError(f"{path}: expected a flat {ADAPTER_KEY!r} tensor (float32{size}), got {got}")
    return flat


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
    write_flat_adapter(tmp / ADAPTER_FILE, adapter)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    with open(tmp / STATE_FILE, "rb") as fh:
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
    except Exception as e:
        raise CheckpointError(f"{found}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    adapter = read_flat_adapter(found / ADAPTER_FILE, what="checkpoint")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or isinstance(state["step"], bool):
        raise CheckpointError(f"{found / STATE_FILE}: missing integer 'step'")
    if state["step"] < 0:
        raise CheckpointError(f"{found / STATE_FILE}: negative step {state['step']}")
    return Checkpoint(adapter=adapter, step=state["step"], state=state)
