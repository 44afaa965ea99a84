"""The counter-based Gaussian generator: determinism, distribution, independence, hash32."""
from __future__ import annotations

import math

import pytest
import torch

from prge.noise import PRNG_VERSIONS, gaussian, hash32, uniform_bits

N = 1_000_000  # samples for the statistical checks
MASK32 = (1 << 32) - 1


def _lowbias32(x: int) -> int:
    """Reference lowbias32 on Python ints (arbitrary precision, no tricks)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def _ref_bits(seed: int, stream: int, counter: int) -> int:
    """Reference of uniform_bits for one element, written from the module docstring."""
    k1 = _lowbias32(_lowbias32(seed % (1 << 32)) ^ (((stream + 1) * 0x9E3779B1) & MASK32))
    k2 = _lowbias32(k1 ^ 0x5BD1E995)
    return _lowbias32(_lowbias32(counter ^ k1) ^ k2)


def _seed(s: int) -> torch.Tensor:
    return torch.tensor([s], dtype=torch.int64)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def big() -> torch.Tensor:
    """2 streams x N/2 samples of one seed: N samples in all."""
    return gaussian(_seed(12345), 2, N // 2)


# ---- determinism ---------------------------------------------------------------------------
def test_bit_identical_on_repeat():
    a = gaussian(_seed(7), 3, 1001)
    b = gaussian(_seed(7), 3, 1001)
    assert a.dtype == torch.float64 and a.shape == (3, 1001)
    assert torch.equal(a, b)
    assert torch.equal(uniform_bits(_seed(7), 3, 1001), uniform_bits(_seed(7), 3, 1001))


def test_seed_tensor_forms_agree():
    ref = gaussian(_seed(99), 2, 64)
    assert torch.equal(gaussian(torch.tensor(99), 2, 64), ref)  # 0-d
    assert torch.equal(gaussian(torch.tensor([[99]]), 2, 64), ref)  # [1, 1]
    assert torch.equal(gaussian(torch.tensor([99], dtype=torch.int32), 2, 64), ref)


def test_matches_python_reference():
    """uniform_bits against a plain-integer implementation: pins the generators to PRNG_VERSIONS."""
    assert PRNG_VERSIONS["gaussian"] == "lowbias32x2-boxmuller-f64-v1", "generator changed: update this reference"
    for seed in (0, 1, 12345, 2**31 - 1, 2**31, 2**32 - 1):
        bits = uniform_bits(_seed(seed), 3, 40, first_stream=5)
        for s in range(3):
            for j in (0, 1, 2, 17, 39):
                assert int(bits[s, j]) == _ref_bits(seed, 5 + s, j), (seed, s, j)


def test_box_muller_pairs_match_reference():
    bits = uniform_bits(_seed(3), 1, 10)[0].tolist()
    z = gaussian(_seed(3), 1, 10)[0].tolist()
    for p in range(5):
        u1, u2 = (bits[2 * p] + 0.5) / 2**32, (bits[2 * p + 1] + 0.5) / 2**32
        r = math.sqrt(-2.0 * math.log(u1))
        assert z[2 * p] == pytest.approx(r * math.cos(2 * math.pi * u2), abs=1e-12)
        assert z[2 * p + 1] == pytest.approx(r * math.sin(2 * math.pi * u2), abs=1e-12)


# ---- distribution --------------------------------------------------------------------------
def test_mean_and_variance(big):
    x = big.reshape(-1)
    n = x.numel()
    assert abs(float(x.mean())) < 5 / math.sqrt(n)
    # Var of the sample variance of N(0, 1) is 2 / (n - 1).
    assert abs(float(x.var()) - 1.0) < 5 * math.sqrt(2 / (n - 1))


def test_cdf_matches_normal(big):
    x, _ = torch.sort(big.reshape(-1))
    n = x.numel()
    cdf = torch.special.ndtr(x)
    empirical_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    empirical_lo = torch.arange(0, n, dtype=torch.float64) / n
    ks = max(float((empirical_hi - cdf).abs().max()), float((cdf - empirical_lo).abs().max()))
    assert ks < 0.005


def test_tail_fraction(big):
    x = big.reshape(-1)
    n = x.numel()
    p = 2 * float(torch.special.ndtr(torch.tensor(-3.0, dtype=torch.float64)))  # 0.0026998
    frac = float((x.abs() > 3).double().mean())
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.isfinite(x).all()
    assert float(x.abs().max()) < 7.0  # u is never 0, so log never explodes


# ---- independence --------------------------------------------------------------------------
def test_independence():
    n = N // 4
    bound = 5 / math.sqrt(n)
    block = gaussian(_seed(2024), 4, n)
    pairs = {
        "neighbouring seeds": (gaussian(_seed(2024), 1, n)[0], gaussian(_seed(2025), 1, n)[0]),
        "seeds 0 and 2^31": (gaussian(_seed(0), 1, n)[0], gaussian(_seed(2**31), 1, n)[0]),
        "streams 0 and 1": (block[0], block[1]),
        "streams 1 and 3": (block[1], block[3]),
        "first_stream blocks": (block[0], gaussian(_seed(2024), 2, n, first_stream=4)[0]),
        "lag 1": (block[2, :-1], block[2, 1:]),
        "lag 2": (block[2, :-2], block[2, 2:]),
        "cos/sin branches": (block[3, 0::2], block[3, 1::2]),
    }
    for name, (a, b) in pairs.items():
        c = _corr(a, b)
        assert abs(c) < bound, f"{name}: corr {c:.2e} >= {bound:.2e}"


def test_streams_and_seeds_differ():
    a = gaussian(_seed(1), 3, 32)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    assert not torch.equal(gaussian(_seed(2), 3, 32), a)
    # Seeds are taken mod 2^32.
    assert torch.equal(gaussian(_seed(2**32 + 1), 3, 32), a)


# ---- first_stream and shapes ---------------------------------------------------------------
def test_first_stream_is_a_row_of_the_block():
    block = gaussian(_seed(555), 6, 257)
    for s in range(6):
        assert torch.equal(gaussian(_seed(555), 1, 257, first_stream=s)[0], block[s])
    assert torch.equal(gaussian(_seed(555), 3, 257, first_stream=2), block[2:5])


def test_numel_odd_is_prefix_of_even():
    for numel in (1, 3, 7, 129):
        odd = gaussian(_seed(8), 2, numel)
        assert odd.shape == (2, numel)
        assert torch.equal(odd, gaussian(_seed(8), 2, numel + 1)[:, :numel])
        assert torch.isfinite(odd).all()


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1, 2**31, 2**31 + 12345, 2**32 - 1])
def test_extreme_seeds_work(seed):
    z = gaussian(_seed(seed), 2, 4001)
    assert torch.isfinite(z).all()
    assert abs(float(z.mean())) < 5 / math.sqrt(z.numel())
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / z.numel())


def test_large_seed_differs_from_small():
    assert not torch.equal(gaussian(_seed(2**31 + 5), 1, 64), gaussian(_seed(5), 1, 64))


# ---- hash32 --------------------------------------------------------------------------------
def test_hash32_known_values():
    assert int(hash32(torch.tensor([0]))[0]) == 0
    xs = [1, 2, 3, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFE, 0xFFFFFFFF]
    out = hash32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert out == [_lowbias32(x) for x in xs]


def test_hash32_range_and_bijective_on_sample():
    g = torch.Generator().manual_seed(0)
    spread = torch.randint(0, 1 << 32, (N,), generator=g, dtype=torch.int64).unique()
    for x in (torch.arange(N, dtype=torch.int64), spread, (1 << 32) - 1 - torch.arange(N, dtype=torch.int64)):
        h = hash32(x)
        assert h.dtype == torch.int64
        assert int(h.min()) >= 0 and int(h.max()) < (1 << 32)
        assert h.unique().numel() == x.numel()
