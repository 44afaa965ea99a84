"""Write and read LoRA-FA adapters in PEFT's LoRA format (adapter_config.json + safetensors).

The frozen A matrices are regenerated from (a_seed, stream), so B and the adapter layout are
all a run needs to produce a standard PEFT adapter that `PeftModel.from_pretrained` loads.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from prge.failpoints import reached
from prge.lora import frozen_a
from prge.step import AdapterSlot

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterFileError(ValueError):
    pass


def _key(name: str, matrix: str) -> str:
    return f"base_model.model.{name}.{matrix}.weight"


def adapter_tensors(slots: Sequence[AdapterSlot], flat_b: Tensor, rank: int, a_seed: int) -> dict[str, Tensor]:
    tensors = {}
    for slot in slots:
        tensors[_key(slot.name, "lora_A")] = frozen_a(a_seed, slot.a_stream, rank, slot.in_features).contiguous()
        b = flat_b[slot.offset : slot.offset + slot.numel].reshape(slot.shape)
        tensors[_key(slot.name, "lora_B")] = b.to(torch.float32).contiguous()
    return tensors


def save_peft_adapter(
    out_dir: str | Path,
    slots: Sequence[AdapterSlot],
    flat_b: Tensor,
    *,
    rank: int,
    alpha: float,
    a_seed: int,
    targets: list[str] | str,
    base_model: str,
    fan_in_fan_out: bool = False,
) -> Path:
    """Write out_dir/{adapter_config.json, adapter_model.safetensors} atomically (temp dir, rename)."""
    out_dir = Path(out_dir)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": targets,
        "fan_in_fan_out": fan_in_fan_out,  # GPT-2's Conv1D stores weights as [in, out]
        "inference_mode": True,
        # prge provenance: LoRA-FA trains only B; A is regenerated from this seed.
        "prge": {"method": "lora-fa", "a_seed": a_seed},
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(adapter_tensors(slots, flat_b, rank, a_seed), str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        reached("adapter-tmp-written")
        # Swap by renames, never delete-then-rename: a kill in between must not lose both.
        old = out_dir.parent / f".{out_dir.name}.old.{os.getpid()}"
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        for stale in out_dir.parent.glob(f".{out_dir.name}.*"):  # this swap's old copy, a killed run's temp
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_peft_adapter(adapter_dir: str | Path, slots: Sequence[AdapterSlot], rank: int, a_seed: int) -> Tensor:
    """The flat B of a PEFT adapter written for this layout; its A must be prge's frozen A."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterFileError(f"{adapter_dir}: no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise AdapterFileError(f"{path}: unreadable safetensors file ({e})") from None
    parts = []
    for slot in slots:
        a_key, b_key = _key(slot.name, "lora_A"), _key(slot.name, "lora_B")
        if b_key not in tensors or a_key not in tensors:
            raise AdapterFileError(f"{path}: no tensors for adapted module {slot.name}")
        b = tensors[b_key]
        if tuple(b.shape) != slot.shape:
            raise AdapterFileError(f"{path}: {b_key} has shape {tuple(b.shape)}, expected {slot.shape}")
        expected_a = frozen_a(a_seed, slot.a_stream, rank, slot.in_features)
        if not torch.equal(tensors[a_key].to(torch.float32), expected_a):
            raise AdapterFileError(
                f"{path}: {a_key} is not prge's frozen A for a_seed {a_seed}; LoRA-FA can only continue "
                "from adapters whose A it can regenerate"
            )
        parts.append(b.reshape(-1).to(torch.float32))
    return torch.cat(parts)
