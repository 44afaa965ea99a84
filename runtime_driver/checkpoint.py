"""run/ckpt/: the adapter (safetensors) and the loop state (JSON), replaced atomically.

A checkpoint is always taken with no pending update (the driver applies it first), so the
adapter plus the step to run next is the whole training state: the data order and the noise
seeds are pure functions of (run seed, step); the judge's divergence baseline is in the state.
First order with an optimizer that keeps state (Adam's moments) adds optimizer.safetensors.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from models.files import moved_aside, replace_dir_atomically, write_file_atomic
from runtime_driver.failpoints import reached

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
# A flat-adapter file holds one float32 tensor under this key: checkpoints, the native
# driver's final adapter and `prge replay --out` all use it.
ADAPTER_KEY = "adapter"


class CheckpointError(ValueError):
    pass


@dataclass
class Checkpoint:
    adapter: Tensor  # flat B, float32
    step: int  # the next step to run
    state: dict[str, Any]  # everything else recorded (next seed, data position, baseline, fingerprint)
    optimizer: dict[str, Tensor] | None = None  # a first-order optimizer's named state tensors, when it has any


def flat_adapter_bytes(adapter: Tensor) -> bytes:
    """The safetensors bytes of a flat-adapter file."""
    return save({ADAPTER_KEY: adapter.detach().to(torch.float32).contiguous()})


def write_flat_adapter(path: str | Path, adapter: Tensor) -> None:
    write_file_atomic(path, flat_adapter_bytes(adapter))


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


def save_checkpoint(ckpt_dir: str | Path, adapter: Tensor, state: dict[str, Any],
                    optimizer: dict[str, Tensor] | None = None) -> None:
    """A reader (or a resumed run after kill -9) sees either the old checkpoint or the new one,
    never a mix (models/files.py replace_dir_atomically). optimizer: named state tensors, saved
    with the adapter when there are any."""
    step = state.get("step")
    with replace_dir_atomically(ckpt_dir, on_written=lambda: reached("ckpt-tmp-written", step),
                                on_old_moved=lambda: reached("ckpt-old-moved", step)) as tmp:
        (tmp / ADAPTER_FILE).write_bytes(flat_adapter_bytes(adapter))
        if optimizer:
            (tmp / OPTIMIZER_FILE).write_bytes(save({k: v.detach().contiguous() for k, v in optimizer.items()}))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def find_checkpoint_dir(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ckpt/ or, if a kill hit between the two renames of
    save_checkpoint, the complete old copy it had moved aside."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / STATE_FILE).is_file():
        return ckpt_dir
    for old in moved_aside(ckpt_dir):
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
    baseline = state.get("baseline_losses", [])
    if not isinstance(baseline, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in baseline):
        raise CheckpointError(f"{found / STATE_FILE}: 'baseline_losses' must be a list of numbers")
    optimizer = None
    if (found / OPTIMIZER_FILE).exists():
        try:
            optimizer = load_file(str(found / OPTIMIZER_FILE))
        except Exception as e:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"{found / OPTIMIZER_FILE}: unreadable optimizer state ({type(e).__name__}: {e})") from None
    return Checkpoint(adapter=adapter, step=state["step"], state=state, optimizer=optimizer)
