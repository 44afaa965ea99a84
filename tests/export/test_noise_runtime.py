"""The noise generator compiled into an ExecuTorch program gives eager's integers bit for bit,
including products that wrap past 2^63 inside the 32-bit multiply-hash."""
from __future__ import annotations

import torch
from torch import nn

from prge.noise import _HASH_MUL_2, _mul32, gaussian, uniform_bits


class _Noise(nn.Module):
    def forward(self, seed: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return uniform_bits(seed, 3, 1001, first_stream=2), _mul32(x, _HASH_MUL_2), gaussian(seed, 3, 1001)


def test_runtime_noise_is_bit_identical_to_eager(tmp_path):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    # Values near 2^32 times a constant near 2^31 overflow int64: the mask must undo the wrap.
    x = torch.tensor([0, 1, 2**31, 2**32 - 1, 2**32 - 12345, 3_000_000_000], dtype=torch.int64)
    seed = torch.tensor([2**31 - 1], dtype=torch.int64)
    exported = torch.export.export(_Noise(), (seed, x), strict=False)
    program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    (tmp_path / "noise.pte").write_bytes(program.buffer)
    bits, products, normals = Runtime.get().load_program(tmp_path / "noise.pte").load_method("forward").execute([seed, x])
    eager_bits, eager_products, eager_normals = _Noise()(seed, x)
    assert torch.equal(products, torch.tensor([(int(v) * _HASH_MUL_2) % 2**32 for v in x]))
    assert torch.equal(eager_products, products)
    assert torch.equal(eager_bits, bits)
    assert (x * _HASH_MUL_2 < 0).any()  # the case that matters really wrapped
    # float64 log/sin/cos may differ by an ulp between libms
    assert torch.allclose(normals, eager_normals, rtol=0, atol=1e-12)
