"""`prge native-adapter`: the native driver's flat adapter.safetensors -> a PEFT adapter folder.

The native driver (android_harness/) writes only the flat B it trained (key "adapter", float32,
the checkpoint format); the PEFT layout needs the program's slots, rank, alpha and a_seed,
which the manifest holds, and A, which is regenerated here from a_seed.
"""
from __future__ import annotations

from pathlib import Path

from export.manifest import read_manifest, slots_from_json
from models.peft_io import save_peft_adapter


def read_flat_adapter(path: str | Path, numel: int):
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter file")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise ValueError(f"{path}: unreadable safetensors file ({e})") from None
    flat = tensors.get("adapter")
    if flat is None or flat.dim() != 1 or flat.numel() != numel:
        shape = None if flat is None else list(flat.shape)
        raise ValueError(f"{path}: expected a flat 'adapter' tensor of {numel} values (this program's), got {shape}")
    return flat


def convert_native_adapter(program_dir: str | Path, adapter_file: str | Path, out_dir: str | Path) -> Path:
    manifest = read_manifest(program_dir)
    a = manifest["adapter"]
    flat = read_flat_adapter(adapter_file, int(a["numel"]))
    return save_peft_adapter(
        out_dir, slots_from_json(a["slots"]), flat, rank=a["rank"], alpha=a["alpha"], a_seed=a["a_seed"],
        targets=a["targets"], base_model=manifest["model"]["path"],
        fan_in_fan_out=manifest["model"]["model_type"] == "gpt2",
    )
