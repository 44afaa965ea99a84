"""ARM64: the driver cross-built against the manylinux aarch64 executorch wheel, run under
qemu-aarch64 user emulation, trains the tiny program to the same numbers as the x86-64 build.

Not bit-identical: XNNPACK and the optimized kernels take NEON paths on aarch64, so the float32
sums round differently (seen: losses within ~6e-7, B within ~2e-6 after 7 steps)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from native_helpers import EPS, build, metrics

SYSROOT = Path("/usr/aarch64-linux-gnu")  # Debian's cross sysroot: ld-linux-aarch64, libstdc++


@pytest.fixture(scope="module")
def aarch64_binary() -> Path:
    tools = ("aarch64-linux-gnu-g++", "qemu-aarch64", "cmake")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing or not SYSROOT.is_dir():
        pytest.skip(f"no {', '.join(missing) or SYSROOT} (apt-get install g++-aarch64-linux-gnu qemu-user; .ci/run does)")
    return build("aarch64")


def test_aarch64_build_under_qemu_matches_x86(aarch64_binary, run_native, program, data_file, native_run, tmp_path):
    out = tmp_path / "run"
    done = run_native(program, data_file, out, launcher=("qemu-aarch64", "-L", str(SYSROOT)), binary=aarch64_binary)
    assert done.returncode == 0, done.stderr
    arm, x86 = metrics(out), metrics(native_run)
    assert [(r["type"], r["step"]) for r in arm] == [(r["type"], r["step"]) for r in x86]
    for a, x in zip(arm, x86):
        if a["type"] == "train":
            assert a["seed"] == x["seed"]
            assert a["losses"] == pytest.approx(x["losses"], abs=1e-5)
            assert a["g"] == pytest.approx(x["g"], abs=1e-5 / EPS)
        else:
            assert a["accuracy"] == x["accuracy"]
            assert a["loss"] == pytest.approx(x["loss"], abs=1e-5)
    b_arm = load_file(str(out / "adapter.safetensors"))["adapter"]
    b_x86 = load_file(str(native_run / "adapter.safetensors"))["adapter"]
    torch.testing.assert_close(b_arm, b_x86, atol=1e-4, rtol=0)
