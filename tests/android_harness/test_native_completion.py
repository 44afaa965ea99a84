"""A completion program (per-position targets, eval_losses) trains natively exactly as the
Python ExecuTorch driver trains it: same data file rows, losses, g, held-out loss and
perplexity, checkpoints and adapter; it resumes after a kill and replays; a data file of the
other kind of task, or with a target outside the vocabulary, is refused with one line."""
from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from native_helpers import EPS, EVAL_EXAMPLES, LR, SEED, STEPS, assert_same_metrics_rows, deterministic, metrics
from prge.step import IGNORE_TARGET
from runtime_driver.commands.cli import main
from runtime_driver.data_file import HEADER_BYTES, decode
from runtime_driver.run import RunConfig, program_task, run_training
from runtime_driver.train import TrainConfig

from export.contract.manifest import read_manifest


@pytest.fixture(scope="module")
def completion_data(tiny_completion_program, tiny_completion_data_dir, tmp_path_factory) -> Path:
    from runtime_driver.commands.export_data import export_data

    return export_data(tiny_completion_program, tiny_completion_data_dir, tmp_path_factory.mktemp("cdata") / "data.bin",
                       steps=STEPS, seed=SEED, eval_examples=EVAL_EXAMPLES)


@pytest.fixture(scope="module")
def completion_native_run(run_native, tiny_completion_program, completion_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cnative") / "run"
    done = run_native(tiny_completion_program, completion_data, out)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def completion_python_run(tiny_completion_program, tiny_completion_data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cpython") / "run"
    train = TrainConfig(steps=STEPS, batch_size=2, lr=LR, eps=EPS, seed=SEED, eval_every=3,
                        eval_examples=EVAL_EXAMPLES, checkpoint_every=3)
    run_training(RunConfig(engine="executorch", program=str(tiny_completion_program), data=str(tiny_completion_data_dir),
                           out=str(out), test_examples=0, train=train), quiet=True, progress=lambda _: None)
    return out


def test_data_file_holds_the_completion_targets(tiny_completion_program, tiny_completion_data_dir, completion_data):
    d = decode(completion_data.read_bytes())
    task = program_task(tiny_completion_program, read_manifest(tiny_completion_program), tiny_completion_data_dir)
    train = task.split("train", d.seq_len)
    validation = task.split("validation", d.seq_len, limit=EVAL_EXAMPLES)
    assert (d.label_width, d.num_labels) == (d.seq_len, 0)
    assert torch.equal(torch.from_numpy(d.train_labels), train.labels)
    assert torch.equal(torch.from_numpy(d.val_labels), validation.labels)
    assert torch.equal(torch.from_numpy(d.val_ids), validation.input_ids)
    assert (d.train_labels != IGNORE_TARGET).any(axis=1).all()  # every row has scored targets


def test_native_completion_run_matches_python_executorch_driver(completion_native_run, completion_python_run):
    native = assert_same_metrics_rows(completion_native_run, completion_python_run)
    assert all("accuracy" not in r and "perplexity" in r for r in native if r["type"] == "eval")  # scored by loss
    native_b = load_file(str(completion_native_run / "adapter.safetensors"))["adapter"]
    python_b = load_file(str(completion_python_run / "ckpt" / "adapter.safetensors"))["adapter"]
    assert native_b.abs().max() > 0
    torch.testing.assert_close(native_b, python_b, atol=1e-6, rtol=0)
    n_state = json.loads((completion_native_run / "ckpt" / "state.json").read_text())
    p_state = json.loads((completion_python_run / "ckpt" / "state.json").read_text())
    assert n_state.pop("baseline_losses") == pytest.approx(p_state.pop("baseline_losses"), abs=1e-6)
    assert n_state == p_state
    summary = json.loads((completion_native_run / "summary.json").read_text())
    assert summary["last_validation_accuracy"] is None
    assert summary["last_validation_loss"] == pytest.approx(native[-1]["loss"], abs=0)


def test_native_completion_run_resumes_after_a_kill_and_replays(run_native, tiny_completion_program, completion_data,
                                                                completion_native_run, tmp_path, capsys):
    out = tmp_path / "run"
    killed = run_native(tiny_completion_program, completion_data, out, env={"PRGE_FAILPOINT": "after-step@4"})
    assert killed.returncode == -9, killed.stderr
    resumed = run_native(tiny_completion_program, completion_data, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert [deterministic(r) for r in metrics(out)] == [deterministic(r) for r in metrics(completion_native_run)]
    assert (out / "adapter.safetensors").read_bytes() == (completion_native_run / "adapter.safetensors").read_bytes()
    assert main(["native-adapter", "--program", str(tiny_completion_program), "--adapter",
                 str(out / "adapter.safetensors"), "--out", str(out / "adapter")]) == 0
    capsys.readouterr()
    assert main(["replay", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["identical"] is True and result["steps_replayed"] == STEPS


def _rewrite(path: Path, edit) -> None:
    """Edit a data file's bytes (edit(bytearray)) and re-seal its payload checksum, so only the
    edit itself can be what the driver objects to."""
    data = bytearray(path.read_bytes())
    edit(data)
    struct.pack_into("<I", data, 40, zlib.crc32(bytes(data[HEADER_BYTES:])))
    path.write_bytes(bytes(data))


def test_a_label_word_data_file_is_refused_by_a_completion_program(run_native, tiny_completion_program, data_file,
                                                                   tmp_path):
    sha = read_manifest(tiny_completion_program)["program"]["pte"]["sha256"].encode("ascii")
    data = Path(shutil.copy(data_file, tmp_path / "data.bin"))
    _rewrite(data, lambda b: b.__setitem__(slice(48, 112), sha))  # bound to this program, still label words
    done = run_native(tiny_completion_program, data, tmp_path / "run")
    assert done.returncode == 2
    assert "holds a label-word task's labels, the program is for a completion task" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


def test_a_target_outside_the_vocabulary_is_refused(run_native, tiny_completion_program, completion_data, tmp_path):
    d = decode(completion_data.read_bytes())
    vocab = read_manifest(tiny_completion_program)["shapes"]["vocab_size"]
    row, col = 0, int((d.train_labels[0] != IGNORE_TARGET).nonzero()[0][0])
    at = HEADER_BYTES + 4 * (2 * d.train_ids.size + row * d.seq_len + col)  # train_labels follow ids and mask
    data = Path(shutil.copy(completion_data, tmp_path / "data.bin"))
    _rewrite(data, lambda b: struct.pack_into("<i", b, at, vocab))
    assert decode(data.read_bytes()).train_labels[row, col] == vocab
    done = run_native(tiny_completion_program, data, tmp_path / "run")
    assert done.returncode == 2
    assert f"a target token outside the vocabulary (0..{vocab - 1})" in done.stderr, done.stderr
