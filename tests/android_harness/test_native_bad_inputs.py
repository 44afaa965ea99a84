"""Bad files and options end the native driver with one clear error line and exit code 2: never
a crash, an abort or a silent run on the wrong data."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runtime_driver.commands.cli import main


def _program_copy(program: Path, dest: Path) -> Path:
    return shutil.copytree(program, dest)


def _edit_manifest(program: Path, edit) -> None:
    path = program / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _other_program_sha(path: Path) -> None:
    """The header's program sha256 (hex, at byte 48) names another program."""
    data = bytearray(path.read_bytes())
    data[48] = ord("1") if data[48] != ord("1") else ord("2")
    path.write_bytes(bytes(data))


def _set(manifest: dict, keys: tuple, value) -> None:
    for key in keys[:-1]:
        manifest = manifest[key]
    manifest[keys[-1]] = value


def _consistent(manifest: dict, **changes) -> None:
    """Change top-level fields and rewrite the manifest's contract to match them."""
    from export.contract.manifest import program_shapes
    from export.contract.methods import signatures_json

    manifest.update(changes)
    manifest["contract"] = signatures_json(manifest["methods"], program_shapes(manifest))


# name -> (how to break a copy of the program dir and data file, extra args, expected message)
CASES = {
    "program folder missing": (lambda p, d: shutil.rmtree(p), (), "manifest.json: not found"),
    "pte truncated": (lambda p, d: _truncate(p / "model.pte"), (), "does not match manifest.json"),
    "pte missing": (lambda p, d: (p / "model.pte").unlink(), (), "model.pte: missing"),
    "manifest not json": (lambda p, d: (p / "manifest.json").write_text("{\"manifest_version\": 1,"), (), "invalid JSON"),
    "manifest lacks a key": (lambda p, d: _edit_manifest(p, lambda m: m.pop("shapes")), (), "missing key 'shapes'"),
    "manifest points outside the folder": (
        lambda p, d: _edit_manifest(p, lambda m: _set(m, ("program", "pte", "file"), "../model.pte")), ("--no-verify",),
        "expected a file name inside the export folder"),
    "manifest of another program": (
        lambda p, d: _edit_manifest(p, lambda m: _set(m, ("program", "pte", "sha256"), "0" * 64)), (), "does not match manifest.json"),
    # A manifest whose shapes disagree with its own contract, or (contract rewritten to match)
    # with the program's own method signatures, is caught even unverified.
    "manifest with other num_queries": (
        lambda p, d: _edit_manifest(p, lambda m: m.update(num_queries=3)), ("--no-verify",),
        "but this driver's contract says prev_g float32 [3]"),
    "manifest and its contract with other num_queries": (
        lambda p, d: _edit_manifest(p, lambda m: _consistent(m, num_queries=3)), ("--no-verify",),
        "is float32 [2] in the program, float32 [3] by manifest.json (manifest from another export?)"),
    "manifest of another contract version": (
        lambda p, d: _edit_manifest(p, lambda m: _set(m, ("contract", "version"), 99)), (), "re-export the program"),
    "manifest without a training method": (
        lambda p, d: _edit_manifest(p, lambda m: _consistent(m, methods=["train_step", "eval_logits"])), ("--no-verify",),
        "methods: no 'apply_update', which a label-word training program has"),
    "a label-word program's manifest saying completion": (
        lambda p, d: _edit_manifest(p, lambda m: _set(m, ("task", "loss"), "completion")), ("--no-verify",),
        "methods: no 'eval_losses', which a completion training program has"),
    "data file missing": (lambda p, d: d.unlink(), (), "data.bin: not found"),
    "data file truncated": (lambda p, d: _truncate(d, 0.9), (), "truncated"),
    "data file header only": (lambda p, d: _truncate(d, 0.0), (), "not a prge data file"),
    "data file corrupted": (lambda p, d: _flip_byte(d, 200), (), "checksum mismatch"),
    "data file for another program": (lambda p, d: _other_program_sha(d), (), "was written for another program"),
    "data file header corrupted": (lambda p, d: _flip_byte(d, 50), (), "corrupted header"),
    "more steps than the data file orders": (lambda p, d: None, ("--steps", "8"), "holds the row order of 7 steps"),
    "seed other than the data file's": (lambda p, d: None, ("--seed", "5"), "differs from the data file's run seed"),
    "unknown schedule": (lambda p, d: None, ("--schedule", "cosine"), "unknown lr schedule"),
    "unknown option": (lambda p, d: None, ("--learning-rate", "1"), "unknown option '--learning-rate'"),
    "bad number": (lambda p, d: None, ("--eval-every", "x"), "--eval-every: expected an integer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_a_message_and_exit_2(case, run_native, program, data_file, tmp_path):
    breaker, extra, message = CASES[case]
    prog = _program_copy(program, tmp_path / "program")
    data = Path(shutil.copy(data_file, tmp_path / "data.bin"))
    breaker(prog, data)
    done = run_native(prog, data, tmp_path / "run", *extra)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "prge-native: error:" in done.stderr and message in done.stderr, done.stderr


def test_unreadable_checkpoint_on_resume(run_native, program, data_file, native_run, tmp_path):
    run = shutil.copytree(native_run, tmp_path / "run")
    _truncate(run / "ckpt" / "adapter.safetensors", 0.5)
    done = run_native(program, data_file, run, "--resume")
    assert done.returncode == 2 and "truncated safetensors file" in done.stderr, done.stderr


def test_export_data_errors_are_user_errors(tmp_path, program, capsys):
    assert main(["export-data", "--program", str(tmp_path / "nope"), "--out", str(tmp_path / "d.bin")]) == 2
    assert "manifest.json: not found" in capsys.readouterr().err
    assert main(["export-data", "--program", str(program), "--steps", "0", "--out", str(tmp_path / "d.bin")]) == 2
    assert "--steps 0" in capsys.readouterr().err
    assert not (tmp_path / "d.bin").exists()


def test_native_adapter_rejects_an_adapter_of_another_program(tmp_path, program, capsys):
    from safetensors.torch import save_file
    import torch

    save_file({"adapter": torch.zeros(3)}, str(tmp_path / "a.safetensors"))
    assert main(["native-adapter", "--program", str(program), "--adapter", str(tmp_path / "a.safetensors"),
                 "--out", str(tmp_path / "peft")]) == 2
    assert "expected a flat 'adapter' tensor" in capsys.readouterr().err
