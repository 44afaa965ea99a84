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
    """The slots' tensors of one safetensors file as the flat float32 weight vector, in slot
    order (named_weights' inverse). Filled tensor by tensor, so the file's tensors and the
    vector are never both whole in memory."""
    flat = torch.empty(flat_numel(slots), dtype=torch.float32)
    start = 0
    with safe_open(str(path), framework="pt") as fh:
        names = set(fh.keys())
        for slot in slots:
            if slot.name not in names:
                raise ModelFolderError(f"{path}: no weight {slot.name!r}")
            tensor = fh.get_tensor(slot.name)
            if tuple(tensor.shape) != slot.shape:
                raise ModelFolderError(f"{path}: {slot.name} has shape {list(tensor.shape)}, expected {list(slot.shape)}")
            flat[start:start + slot.numel] = tensor.reshape(-1)
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
