"""The adb bundle: self-contained (its own glibc loader and libraries: run under qemu-aarch64
with no sysroot), and adb_run.sh pushes, runs and pulls it (against a stand-in for adb, since
no phone is attached here)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from native_helpers import EPS, LR, ROOT, metrics

HARNESS = ROOT / "android_harness"
# Stands in for adb: the "device" file system is $FAKE_DEVICE_ROOT, and the device's shell runs
# the commands with qemu-aarch64 as the launcher, the way an arm64 phone runs them natively.
FAKE_ADB = """#!/bin/sh
set -e
case "$1" in
  push) mkdir -p "$FAKE_DEVICE_ROOT$3"; cp -R "$2" "$FAKE_DEVICE_ROOT$3" ;;
  pull) cp -R "$FAKE_DEVICE_ROOT$2" "$3" ;;
  shell) shift; echo "$*" >> "$FAKE_DEVICE_ROOT/shell.log"
         PRGE_LAUNCHER=qemu-aarch64 sh -c "$(echo "$*" | sed "s#/data/local/tmp#$FAKE_DEVICE_ROOT/data/local/tmp#g")" ;;
  *) echo "fake adb: unsupported $1" >&2; exit 1 ;;
esac
"""


@pytest.fixture(scope="module")
def bundle(program, data_file, tmp_path_factory) -> Path:
    if shutil.which("qemu-aarch64") is None or shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("no qemu-aarch64 / aarch64-linux-gnu-g++ (apt-get install qemu-user g++-aarch64-linux-gnu)")
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    done = subprocess.run([str(HARNESS / "make_bundle.sh"), "--program", str(program), "--data", str(data_file),
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_bundle_runs_with_nothing_but_its_own_files(bundle, tmp_path):
    moved = shutil.copytree(bundle, tmp_path / "elsewhere")  # no path of the build machine is needed
    done = subprocess.run(["sh", str(moved / "run.sh"), "--steps", "3", "--lr", str(LR), "--eps", str(EPS), "--quiet"],
                          capture_output=True, text=True, env={**os.environ, "PRGE_LAUNCHER": "qemu-aarch64"})
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in metrics(moved / "run") if r["type"] == "train"] == [0, 1, 2]
    assert json.loads(done.stdout)["steps_run"] == 3


def test_adb_run_pushes_trains_and_pulls(bundle, native_run, tmp_path):
    adb = tmp_path / "adb"
    adb.write_text(FAKE_ADB)
    adb.chmod(0o755)
    device = tmp_path / "device"
    device.mkdir()
    env = {**os.environ, "ADB": str(adb), "FAKE_DEVICE_ROOT": str(device)}
    done = subprocess.run([str(HARNESS / "adb_run.sh"), str(bundle), "--lr", str(LR), "--eps", str(EPS),
                           "--eval-every", "3", "--checkpoint-every", "3", "--quiet"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    pulled = bundle / "pulled" / "run"
    assert (pulled / "adapter.safetensors").is_file() and (pulled / "ckpt" / "state.json").is_file()
    arm, x86 = metrics(pulled), metrics(native_run)
    assert [(r["type"], r["step"]) for r in arm] == [(r["type"], r["step"]) for r in x86]
    assert "/data/local/tmp/prge/run.sh" in (device / "shell.log").read_text()
