"""Damaged or mismatched programs, manifests, tokenizers and checkpoints: `prge train --resume`
exits 2 with a message naming the file, and neither the run directory nor the program changes."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from export.contract.manifest import program_shapes
from export.contract.methods import signatures_json
from runtime_driver.commands.cli import main


def _train(program: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--engine", "executorch", "--program", str(program), "--data", str(data), "--out", str(out),
            "--steps", "6", "--batch", "2", "--lr", "0.05", "--seed", "1", "--checkpoint-every", "2",
            "--eval-every", "0", "--test-examples", "0", *extra]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tiny_program, tiny_data_dir, tmp_path_factory):
    """A program and a finished run of it (checkpoints every 2 steps; the last one, at step 6,
    is what --resume continues from)."""
    program = tiny_program("llama")
    run = tmp_path_factory.mktemp("bad-artifacts") / "run"
    assert main(_train(program, tiny_data_dir, run)) == 0
    return program, tiny_data_dir, run


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _set(keys: tuple, value, consistent: bool = False):
    """Set one manifest field; consistent: also rewrite the manifest's contract to match, as a
    careful forger would, so only the program itself can tell."""
    def edit(obj):
        manifest = obj
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value
        if consistent:
            manifest["contract"] = signatures_json(manifest["methods"], program_shapes(manifest))
    return edit


# (what is damaged, how, words the error must contain)
PROGRAM_DAMAGE = [
    ("model.pte", _truncate, "does not match manifest.json"),
    ("model.pte", _flip_byte, "does not match manifest.json"),
    ("model.pte", lambda p: p.unlink(), "model.pte: missing"),
    ("tokenizer.json", _flip_byte, "not the tokenizer this program was exported with"),
    ("manifest.json", _truncate, "not valid JSON"),
    ("manifest.json", lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "not valid JSON"),
    ("manifest.json", lambda p: _edit_json(p, _set(("num_queries",), 3)), "contract: the methods' inputs and outputs differ"),
    ("manifest.json", lambda p: _edit_json(p, _set(("num_queries",), 3, consistent=True)),
     "train_step input 5 (prev_g) is float32 [2] in the program, float32 [3] by the manifest"),
    ("manifest.json", lambda p: _edit_json(p, _set(("shapes", "seq_len"), 32)), "contract: the methods' inputs"),
    ("manifest.json", lambda p: _edit_json(p, _set(("shapes", "seq_len"), 32, consistent=True)),
     "train_step input 0 (input_ids) is int64 [2, 16] in the program"),
    ("manifest.json", lambda p: _edit_json(p, _set(("contract", "version"), 0)), "re-export the program"),
    ("manifest.json", lambda p: _edit_json(p, _set(("adapter", "numel"), 7)), "adapter.numel"),
    ("manifest.json", lambda p: _edit_json(p, _set(("prng_version",), "other-v0")), "another noise generator"),
    ("manifest.json", lambda p: _edit_json(p, _set(("program", "pte", "file"), "../model.pte")), "inside the export folder"),
    ("manifest.json", lambda p: _edit_json(p, _set(("shapes",), None)), "shapes: expected an object"),
    ("manifest.json", lambda p: _edit_json(p, lambda m: m.pop("tokenizer")), "missing keys tokenizer"),
    ("manifest.json", lambda p: _edit_json(p, _set(("methods",), ["train_step"], consistent=True)),
     "the program has no apply_update, eval_logits, get_adapter, set_adapter method"),
]


@pytest.mark.parametrize("name, damage, words", PROGRAM_DAMAGE,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(PROGRAM_DAMAGE)])
def test_damaged_program_is_refused_and_nothing_is_written(name, damage, words, base, tmp_path, capsys):
    program, data, run = base
    program, run = shutil.copytree(program, tmp_path / "program"), shutil.copytree(run, tmp_path / "run")
    damage(program / name)
    before = _snapshot(run), _snapshot(program)
    code = main(_train(program, data, run, "--resume"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err and "Traceback" not in err, err
    assert (_snapshot(run), _snapshot(program)) == before


def test_manifest_of_another_export_is_refused(base, tiny_program, tmp_path, capsys):
    program, data, run = base
    program, run = shutil.copytree(program, tmp_path / "program"), shutil.copytree(run, tmp_path / "run")
    shutil.copy(tiny_program("llama", external=True) / "manifest.json", program / "manifest.json")
    before = _snapshot(run)
    assert main(_train(program, data, run, "--resume")) == 2
    assert "model.pte: does not match manifest.json" in capsys.readouterr().err
    assert _snapshot(run) == before


CHECKPOINT_DAMAGE = [
    ("ckpt/adapter.safetensors", _truncate, "unreadable checkpoint"),
    ("ckpt/adapter.safetensors", lambda p: p.write_bytes(b"\x08" + b"\x00" * 7 + b"{not json"), "unreadable checkpoint"),
    ("ckpt/state.json", _truncate, "unreadable checkpoint"),
    ("ckpt/state.json", lambda p: p.write_text('{"step": "four"}'), "missing integer 'step'"),
    ("ckpt/state.json", lambda p: _edit_json(p, _set(("fingerprint", "lr"), 0.5)), "another configuration (differs in lr)"),
    ("ckpt/state.json", lambda p: _edit_json(p, _set(("fingerprint", "program_sha256"), "0" * 64)),
     "another configuration (differs in program_sha256)"),
]


@pytest.mark.parametrize("name, damage, words", CHECKPOINT_DAMAGE,
                         ids=[f"{Path(n).name}-{i}" for i, (n, _, _) in enumerate(CHECKPOINT_DAMAGE)])
def test_damaged_checkpoint_is_refused_and_nothing_is_written(name, damage, words, base, tmp_path, capsys):
    program, data, run = base
    run = shutil.copytree(run, tmp_path / "run")
    damage(run / name)
    before = _snapshot(run)
    code = main(_train(program, data, run, "--resume"))
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err, err
    assert _snapshot(run) == before


def test_resume_with_other_settings_is_refused(base, tmp_path, capsys):
    program, data, run = base
    run = shutil.copytree(run, tmp_path / "run")
    before = _snapshot(run)
    assert main(_train(program, data, run, "--resume", "--eps", "0.05")) == 2
    assert "differs in eps" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_checkpoint_of_another_program_is_refused(base, tiny_program, tmp_path, capsys):
    """Same model, task and settings, but another export (external weights): another .pte."""
    _, data, run = base
    run = shutil.copytree(run, tmp_path / "run")
    before = _snapshot(run)
    assert main(_train(tiny_program("llama", external=True), data, run, "--resume")) == 2
    assert "differs in program_sha256" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_intact_artifacts_resume(base, tmp_path, capsys):
    """The control: the same copies, undamaged, resume (nothing left to run) and finish."""
    program, data, run = base
    run = shutil.copytree(run, tmp_path / "run")
    assert main(_train(program, data, run, "--resume")) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == list(range(6))
