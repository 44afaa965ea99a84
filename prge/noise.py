"""Counter-based noise that eager PyTorch and the ExecuTorch runtime compute bit-identically.

P-RGE never stores its perturbations: z is regenerated from a seed whenever it is needed (to
apply the previous step's update, to build the perturbed adapter copies, to replay a run).
That only works if every engine produces exactly the same numbers, so the generator is built
from plain integer and float64 tensor ops that stay on ExecuTorch's portable kernels:

  z[stream, j] = BoxMuller(u1, u2),  u = (hash(hash(counter XOR k1) XOR k2) + 0.5) / 2^32

with k1, k2 derived from (seed, stream). A stream is one query (one perturbation direction);
j indexes the flattened adapter. The 32-bit hash is lowbias32 (an integer finalizer with
excellent avalanche), computed in int64 so nothing overflows:
  * products of two 32-bit values are taken modulo 2^32 with a mask: the int64 product may
    wrap past 2^63, but wrapping is modulo 2^64 in eager PyTorch and in the runtime alike, so
    its low 32 bits are exact (splitting into 16-bit halves avoided the wrap but cost 6 ops
    with 2 slow integer remainders instead of 2 ops: the hash was ~2x slower in the runtime),
  * right shifts are floor divisions (`bitwise_right_shift` with a scalar is not Core ATen),
  * values fed to floor division stay non-negative (integer remainder and division act
    like C for negative operands in the runtime).
Float constants are float64 tensors, never Python floats (a float literal in float64 math is
captured as a float32 constant by export), made by torch.full in the graph (float64_scalar).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# The direction distributions a step can draw (prge/estimators.py picks one per estimator), each
# with the version of its generator. Bump a version when its numbers change: it is stored in
# manifests and checkpoints so a run is only ever replayed with the generator that produced it.
PRNG_VERSIONS = {
    "gaussian": "lowbias32x2-boxmuller-f64-v1",
    "rademacher": "lowbias32x2-sign-v1",
}
NOISE_KINDS = tuple(PRNG_VERSIONS)

_MASK32 = 1 << 32
_HASH_MUL_1 = 0x7FEB352D
_HASH_MUL_2 = 0x846CA68B
# Distinct odd constants that separate the key of each query stream and the two hash rounds.
_STREAM_MUL = 0x9E3779B1
_KEY2_SALT = 0x5BD1E995


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2^32 for 0 <= x < 2^32: the low 32 bits of the (possibly wrapped)
    int64 product, which are the same whether or not it wrapped."""
    return torch.bitwise_and(x * constant, _MASK32 - 1)


def float64_scalar(value: float) -> Tensor:
    """A float64 scalar made by an op in the graph (torch.full), not a tensor constant: a
    constant made inside a torch.cond branch breaks ExecuTorch's lowering (PRGEStep.updated)."""
    return torch.full((), value, dtype=torch.float64)


def hash32(x: Tensor) -> Tensor:
    """lowbias32 finalizer on int64 tensors holding values in [0, 2^32)."""
    x = torch.bitwise_xor(x, torch.floor_divide(x, 1 << 16))
    x = _mul32(x, _HASH_MUL_1)
    x = torch.bitwise_xor(x, torch.floor_divide(x, 1 << 15))
    x = _mul32(x, _HASH_MUL_2)
    return torch.bitwise_xor(x, torch.floor_divide(x, 1 << 16))


def stream_keys(seed: Tensor, num_streams: int = 1, first_stream: int = 0) -> tuple[Tensor, Tensor]:
    """Two 32-bit keys per stream, shape [num_streams, 1], from an int64 seed tensor. A caller
    drawing one stream in many chunks computes them once (keyed_gaussian, keyed_rademacher)."""
    seed = torch.remainder(seed.reshape(1, 1).to(torch.int64), _MASK32)
    streams = torch.arange(first_stream, first_stream + num_streams, dtype=torch.int64).reshape(num_streams, 1)
    k1 = hash32(torch.bitwise_xor(hash32(seed), _mul32(streams + 1, _STREAM_MUL)))
    k2 = hash32(torch.bitwise_xor(k1, torch.full_like(k1, _KEY2_SALT)))
    return k1, k2


def uniform_bits(seed: Tensor, num_streams: int, numel: int, first_stream: int = 0) -> Tensor:
    """Uniform 32-bit integers (as int64), shape [num_streams, numel]."""
    return keyed_bits(stream_keys(seed, num_streams, first_stream), numel)


def keyed_bits(keys: tuple[Tensor, Tensor], numel: int, first_counter: int = 0) -> Tensor:
    """uniform_bits of the streams whose stream_keys are given, for counters first_counter ..
    first_counter + numel - 1 (a long stream drawn in chunks: each value is a pure function of
    its counter)."""
    k1, k2 = keys
    counters = torch.arange(first_counter, first_counter + numel, dtype=torch.int64).reshape(1, numel)
    return hash32(torch.bitwise_xor(hash32(torch.bitwise_xor(counters, k1)), k2))


def gaussian(seed: Tensor, num_streams: int, numel: int, first_stream: int = 0) -> Tensor:
    """Standard normal float64 noise [num_streams, numel] for streams first_stream, first_stream+1, ...

    A pure function of (seed, stream, element index): stream s is the same whichever block of
    streams it is generated in, and a chunk of it (keyed_gaussian) equals the same slice of the whole.

    Box-Muller turns each pair of uniforms into two normals (cos and sin branch), so element
    2p and 2p+1 of a stream come from counters 2p and 2p+1: a chunk starts at an even element.
    """
    return keyed_gaussian(stream_keys(seed, num_streams, first_stream), numel)


def keyed_gaussian(keys: tuple[Tensor, Tensor], numel: int, first_element: int = 0) -> Tensor:
    """gaussian of the streams whose stream_keys are given, elements first_element ..
    first_element + numel - 1."""
    if first_element % 2:
        raise ValueError(f"a Gaussian chunk starts at an even element (Box-Muller pairs), not {first_element}")
    num_streams = keys[0].shape[0]
    pairs = (numel + 1) // 2
    bits = keyed_bits(keys, 2 * pairs, first_element).reshape(num_streams, pairs, 2)
    scale, half, minus_two, two_pi = (float64_scalar(v) for v in (1.0 / _MASK32, 0.5, -2.0, 2.0 * math.pi))
    u = (bits.to(torch.float64) + half) * scale  # in (0, 1): log never sees 0
    radius = torch.sqrt(minus_two * torch.log(u[..., 0]))
    angle = two_pi * u[..., 1]
    normals = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
    return normals.reshape(num_streams, 2 * pairs)[:, :numel]


def rademacher(seed: Tensor, num_streams: int, numel: int, first_stream: int = 0) -> Tensor:
    """Random signs, +1.0 or -1.0 in float64, [num_streams, numel]: the top bit of each of the
    same 32-bit hashes `gaussian` reads (integer ops only: no log, sqrt, cos or sin)."""
    return keyed_rademacher(stream_keys(seed, num_streams, first_stream), numel)


def keyed_rademacher(keys: tuple[Tensor, Tensor], numel: int, first_element: int = 0) -> Tensor:
    """rademacher of the streams whose stream_keys are given."""
    bits = keyed_bits(keys, numel, first_element)
    return (torch.floor_divide(bits, 1 << 31) * 2 - 1).to(torch.float64)


def directions(kind: str, seed: Tensor, num_streams: int, numel: int, first_stream: int = 0) -> Tensor:
    """Perturbation directions of the given kind (NOISE_KINDS), float64 [num_streams, numel]."""
    return keyed_directions(kind, stream_keys(seed, num_streams, first_stream), numel)


def keyed_directions(kind: str, keys: tuple[Tensor, Tensor], numel: int, first_element: int = 0) -> Tensor:
    """directions of the streams whose stream_keys are given, elements first_element ..
    first_element + numel - 1 (prge/full_mezo.py draws each weight tensor's part of one stream)."""
    if kind == "gaussian":
        return keyed_gaussian(keys, numel, first_element)
    if kind == "rademacher":
        return keyed_rademacher(keys, numel, first_element)
    raise ValueError(f"unknown noise {kind!r}; expected one of {NOISE_KINDS}")
