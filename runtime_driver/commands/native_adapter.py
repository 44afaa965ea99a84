"""`prge native-adapter`: the native driver's flat adapter.safetensors -> a PEFT adapter folder.

The native driver (android_harness/) writes only the flat B it trained (key "adapter", float32,
the checkpoint format); the PEFT layout needs the program's slots, rank, alpha and a_seed,
which the manifest holds, and A, which is regenerated here from a_seed.
"""
from __future__ import annotations

from pathlib import Path

from export.contract.manifest import read_manifest, slots_from_json
from models.peft_io import save_peft_adapter
from runtime_driver.checkpoint import read_flat_adapter


def convert_native_adapter(program_dir: str | Path, adapter_file: str | Path, out_dir: str | Path) -> Path:
    manifest = read_manifest(program_dir)
    a = manifest["adapter"]
    if not Path(adapter_file).is_file():
        raise FileNotFoundError(f"{adapter_file}: no adapter file")
    flat = read_flat_adapter(adapter_file, numel=int(a["numel"]))
    return save_peft_adapter(
        out_dir, slots_from_json(a["slots"]), flat, rank=a["rank"], alpha=a["alpha"], a_seed=a["a_seed"],
        targets=a["targets"], base_model=manifest["model"]["path"],
        fan_in_fan_out=manifest["model"]["model_type"] == "gpt2",
    )
