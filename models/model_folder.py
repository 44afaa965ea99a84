"""A full-parameter run's weights in and out of Hugging Face model folders.

Out: a run's trained weights become a model folder `transformers` loads as it loads the base
(the base's config, generation config and tokenizer files, the weights as one
model.safetensors under their Hugging Face names), written atomically. In: the base folder's
weights by name, the initial state `prge replay` starts a full-parameter run from; and one
safetensors file as the flat weight vector of a full-parameter program (its initial state).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from models.files import replace_dir_atomically
from prge.full_mezo import WeightSlot, flat_numel

WEIGHTS_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# Everything of the base folder except its weights: what makes the folder load and tokenize.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


class ModelFolderError(ValueError):
    pass


def save_model_folder(out_dir: str | Path, named_weights: Iterable[tuple[str, Tensor]], base_model_dir: str | Path) -> Path:
    """Write out_dir as a Hugging Face model folder: the base's side files, the given weights."""
    base = Path(base_model_dir)
    with replace_dir_atomically(out_dir) as tmp:
        for name in _SIDE_FILES:
            if (base / name).is_file():
                shutil.copyfile(base / name, tmp / name)
        save_weights_file(tmp / WEIGHTS_FILE, named_weights)
    return Path(out_dir)


def save_weights_file(path: str | Path, named_weights: Iterable[tuple[str, Tensor]]) -> Path:
    """One safetensors file of float32 tensors under the given (Hugging Face) names."""
    tensors = {name: t.detach().to(torch.float32).contiguous() for name, t in named_weights}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return Path(path)


def read_flat_weights(path: str | Path, slots: tuple[WeightSlot, ...]) -> Tensor:
    """The slots' float32 tensors of one safetensors file as the flat weight vector, in slot
    order (named_weights' inverse), each read from the file straight into its place in the
    vector. Not through safetensors' memory map: a mapped file's pages count in the process's
    resident set until it is closed, so the whole file sat on top of the vector (measured on
    the default model's full-parameter program: 2,594 MB peak while reading its 538 MB file,
    the run's peak, against 1,687 MB during training steps)."""
    path = Path(path)
    flat = torch.empty(flat_numel(slots), dtype=torch.float32)
    destination = memoryview(flat.numpy()).cast("B")  # the vector's bytes (safetensors and the CPU: little-endian)
    with open(path, "rb") as f:
        try:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
        except (ValueError, MemoryError, OverflowError) as e:
            raise ModelFolderError(f"{path}: not a safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise ModelFolderError(f"{path}: not a safetensors file (its header is not a JSON object)")
        start = 0
        for slot in slots:
            entry = header.get(slot.name)
            if not isinstance(entry, dict):
                raise ModelFolderError(f"{path}: no weight {slot.name!r}")
            if tuple(entry.get("shape", ())) != slot.shape:
                raise ModelFolderError(f"{path}: {slot.name} has shape {entry.get('shape')}, expected {list(slot.shape)}")
            if entry.get("dtype") != "F32":
                raise ModelFolderError(f"{path}: {slot.name} is {entry.get('dtype')}, expected F32")
            part = destination[4 * start:4 * (start + slot.numel)]
            offsets = entry.get("data_offsets")
            if not (isinstance(offsets, list) and len(offsets) == 2 and offsets[1] - offsets[0] == len(part)):
                raise ModelFolderError(f"{path}: {slot.name}'s data is cut short or mislaid")
            f.seek(8 + header_size + offsets[0])
            if f.readinto(part) != len(part):
                raise ModelFolderError(f"{path}: {slot.name}'s data is cut short or mislaid")
            start += slot.numel
    return flat


def _weight_files(model_dir: Path) -> list[Path]:
    if (model_dir / _INDEX_FILE).is_file():
        index = json.loads((model_dir / _INDEX_FILE).read_text())
        return sorted({model_dir / f for f in index["weight_map"].values()})
    if (model_dir / WEIGHTS_FILE).is_file():
        return [model_dir / WEIGHTS_FILE]
    raise ModelFolderError(f"{model_dir}: no {WEIGHTS_FILE} (or {_INDEX_FILE})")


def read_weights(model_dir: str | Path, names: list[str]) -> dict[str, Tensor]:
    """The named float32 tensors of a model folder's safetensors files."""
    model_dir = Path(model_dir)
    found: dict[str, Tensor] = {}
    for path in _weight_files(model_dir):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                if key in names:
                    found[key] = fh.get_tensor(key).to(torch.float32)
    missing = [n for n in names if n not in found]
    if missing:
        raise ModelFolderError(f"{model_dir}: no weight {missing[0]!r} ({len(missing)} of {len(names)} missing)")
    return found
