"""Write and read LoRA-FA adapters in PEFT's LoRA format (adapter_config.json + safetensors).

The frozen A matrices are regenerated from (a_seed, stream), so B and the adapter layout are
all a run needs to produce a standard PEFT adapter that `PeftModel.from_pretrained` loads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.files import replace_dir_atomically
from prge.lora import frozen_a
from prge.step import AdapterSlot

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterFileError(ValueError):
    pass


@dataclass(frozen=True)
class PeftAdapterConfig:
    """What prge needs of a PEFT adapter_config.json to rebuild the adapter it describes."""

    rank: int
    alpha: float
    targets: list[str] | str
    a_seed: int  # prge's seed of the frozen A matrices
    base_model: str = ""  # base_model_name_or_path
    fan_in_fan_out: bool = False


def read_adapter_config(adapter_dir: str | Path) -> PeftAdapterConfig:
    """The adapter_config.json of a PEFT adapter written by prge (LoRA-FA, with its a_seed)."""
    path = Path(adapter_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
        return PeftAdapterConfig(int(config["r"]), float(config["lora_alpha"]), config["target_modules"],
                                 int(config["prge"]["a_seed"]), str(config.get("base_model_name_or_path") or ""),
                                 bool(config.get("fan_in_fan_out", False)))
    except FileNotFoundError:
        raise AdapterFileError(f"{path}: not found (is {adapter_dir} a PEFT adapter folder?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise AdapterFileError(f"{path}: not a prge PEFT adapter config ({type(e).__name__}: {e})") from None


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
    on_written: Callable[[], None] | None = None,
) -> Path:
    """Write out_dir/{adapter_config.json, adapter_model.safetensors} atomically (temp dir,
    renames; on_written: see replace_dir_atomically)."""
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
    with replace_dir_atomically(out_dir, on_written=on_written) as tmp:
        save_file(adapter_tensors(slots, flat_b, rank, a_seed), str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
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
