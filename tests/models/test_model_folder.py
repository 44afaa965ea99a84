"""A full-parameter program's initial weights file read as the flat weight vector: the same
values as safetensors' own loader, and a clear error for a file that does not hold the slots."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.model_folder import ModelFolderError, read_flat_weights, save_weights_file
from prge.full_mezo import WeightSlot

SLOTS = (WeightSlot("embed.weight", (7, 3), 0), WeightSlot("layers.0.q.weight", (3, 3), 22),
         WeightSlot("norm.weight", (3,), 32))


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {s.name: torch.randn(s.shape, generator=g) for s in SLOTS}
    tensors["unused.bias"] = torch.randn(5, generator=g)  # a file may hold more than the slots
    return tensors


def test_the_vector_holds_the_files_tensors_in_slot_order_bit_for_bit(tmp_path):
    path = save_weights_file(tmp_path / "weights.safetensors", reversed(list(_weights().items())))  # file order differs
    loaded = load_file(str(path))
    expected = torch.cat([loaded[s.name].reshape(-1) for s in SLOTS])
    flat = read_flat_weights(path, SLOTS)
    assert flat.dtype == torch.float32 and torch.equal(flat, expected)


@pytest.mark.parametrize("case, message", [
    ("missing", "no weight 'norm.weight'"),
    ("shape", r"norm.weight has shape \[4\], expected \[3\]"),
    ("dtype", "norm.weight is BF16, expected F32"),
    ("truncated", "norm.weight's data is cut short or mislaid"),
    ("garbage", "not a safetensors file"),
])
def test_a_file_that_does_not_hold_the_slots_is_refused_with_its_name(tmp_path, case, message):
    path, tensors = tmp_path / "weights.safetensors", _weights()
    if case == "missing":
        del tensors["norm.weight"]
    elif case == "shape":
        tensors["norm.weight"] = torch.zeros(4)
    elif case == "dtype":
        tensors["norm.weight"] = tensors["norm.weight"].to(torch.bfloat16)
    if case == "garbage":
        path.write_bytes(b"\xff" * 64)
    else:
        save_file(tensors, str(path))
    if case == "truncated":  # safetensors lays float32 data out by name: cut through unused.bias (20 bytes) into norm.weight
        path.write_bytes(path.read_bytes()[:-24])
    with pytest.raises(ModelFolderError, match=message):
        read_flat_weights(path, SLOTS)
