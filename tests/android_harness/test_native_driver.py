"""The native driver trains exactly like the Python ExecuTorch driver (same seeds, data, losses,
metrics rows, checkpoints and adapter), resumes after a kill, and `prge` reads what it writes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from native_helpers import EPS, EVAL_EXAMPLES, LR, SEED, STEPS, assert_same_metrics_rows, deterministic, metrics
from runtime_driver.commands.cli import main
from runtime_driver.data_file import decode
from runtime_driver.run import RunConfig, program_task, run_training
from runtime_driver.train import TrainConfig

from export.contract.manifest import read_manifest


@pytest.fixture(scope="module")
def python_run(program, tiny_data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("python-et") / "run"
    train = TrainConfig(steps=STEPS, batch_size=2, lr=LR, eps=EPS, seed=SEED, eval_every=3,
                        eval_examples=EVAL_EXAMPLES, checkpoint_every=3)
    run_training(RunConfig(engine="executorch", program=str(program), data=str(tiny_data_dir), out=str(out),
                           test_examples=0, train=train), quiet=True, progress=lambda _: None)
    return out


def test_data_file_holds_the_python_drivers_rows_and_order(program, tiny_data_dir, data_file):
    from models.tasks.batches import batch_indices

    d = decode(data_file.read_bytes())
    manifest = read_manifest(program)
    task = program_task(program, manifest, tiny_data_dir)
    train = task.split("train", d.seq_len)
    val = task.split("validation", d.seq_len, limit=EVAL_EXAMPLES)
    assert (d.seq_len, d.batch_size, d.steps, d.run_seed) == (16, 2, STEPS, SEED)
    assert d.pte_sha256 == manifest["program"]["pte"]["sha256"]
    assert torch.equal(torch.from_numpy(d.train_ids), train.input_ids)
    assert torch.equal(torch.from_numpy(d.train_mask), train.attention_mask)
    assert torch.equal(torch.from_numpy(d.val_labels), val.labels)
    assert d.order.tolist() == [i for t in range(STEPS) for i in batch_indices(len(train), 2, t, SEED)]


def test_native_run_matches_python_executorch_driver(native_run, python_run):
    assert_same_metrics_rows(native_run, python_run)
    native_b = load_file(str(native_run / "adapter.safetensors"))["adapter"]
    python_ckpt = load_file(str(python_run / "ckpt" / "adapter.safetensors"))["adapter"]  # taken at the last step
    assert native_b.abs().max() > 0  # training moved B
    torch.testing.assert_close(native_b, python_ckpt, atol=1e-6, rtol=0)
    n_state = json.loads((native_run / "ckpt" / "state.json").read_text())
    p_state = json.loads((python_run / "ckpt" / "state.json").read_text())
    # The judge's baseline: the same steps' mean losses (they agree to float32 rounding of the losses).
    assert n_state.pop("baseline_losses") == pytest.approx(p_state.pop("baseline_losses"), abs=1e-6)
    assert n_state == p_state  # step, next seed, data position and the whole fingerprint


def test_native_adapter_becomes_the_same_peft_adapter(native_run, python_run, program, tmp_path, capsys):
    assert main(["native-adapter", "--program", str(program), "--adapter", str(native_run / "adapter.safetensors"),
                 "--out", str(tmp_path / "peft")]) == 0
    ours = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    theirs = load_file(str(python_run / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text()) == \
        json.loads((python_run / "adapter" / "adapter_config.json").read_text())


def test_replay_rebuilds_a_native_run_bit_for_bit(native_run, program, tmp_path, capsys):
    """The native log is complete: `prge replay` regenerates its checkpoint and final adapter."""
    run = shutil.copytree(native_run, tmp_path / "run")
    assert main(["native-adapter", "--program", str(program), "--adapter", str(run / "adapter.safetensors"),
                 "--out", str(run / "adapter")]) == 0
    capsys.readouterr()
    assert main(["replay", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["identical"] is True and result["steps_replayed"] == STEPS


@pytest.mark.parametrize("failpoint", ["after-step@4", "ckpt-old-moved@6", "ckpt-tmp-written@3"])
def test_resume_after_kill_matches_uninterrupted_run(failpoint, run_native, program, data_file, native_run, tmp_path):
    out = tmp_path / "run"
    killed = run_native(program, data_file, out, env={"PRGE_FAILPOINT": failpoint})
    assert killed.returncode == -9, killed.stderr  # SIGKILL: no cleanup ran
    resumed = run_native(program, data_file, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert [deterministic(r) for r in metrics(out)] == [deterministic(r) for r in metrics(native_run)]
    assert (out / "adapter.safetensors").read_bytes() == (native_run / "adapter.safetensors").read_bytes()
    assert not list(out.glob(".ckpt-*"))  # what the kill left mid-swap is cleaned up


def test_python_driver_resumes_a_native_checkpoint(run_native, program, data_file, tiny_data_dir, python_run, tmp_path):
    """The checkpoints are one format: a native run killed after its step-3 checkpoint is
    finished by the Python ExecuTorch driver with the uninterrupted Python run's result."""
    out = tmp_path / "run"
    killed = run_native(program, data_file, out, env={"PRGE_FAILPOINT": "after-step@4"})
    assert killed.returncode == -9
    train = TrainConfig(steps=STEPS, batch_size=2, lr=LR, eps=EPS, seed=SEED, eval_every=3,
                        eval_examples=EVAL_EXAMPLES, checkpoint_every=3)
    run_training(RunConfig(engine="executorch", program=str(program), data=str(tiny_data_dir), out=str(out),
                           test_examples=0, train=train), resume=True, quiet=True, progress=lambda _: None)
    resumed, python = metrics(out), metrics(python_run)
    train_rows = lambda rows: [deterministic(r) for r in rows if r["type"] == "train"]  # noqa: E731
    assert train_rows(resumed) == train_rows(python)
    # eval rows 0 and 3 came from the native driver: its float64 log-softmax may differ in the last bit
    assert [(r["step"], r["accuracy"]) for r in resumed if r["type"] == "eval"] == \
        [(r["step"], r["accuracy"]) for r in python if r["type"] == "eval"]
    assert torch.equal(load_file(str(out / "ckpt" / "adapter.safetensors"))["adapter"],
                       load_file(str(python_run / "ckpt" / "adapter.safetensors"))["adapter"])


def test_resume_refuses_a_checkpoint_of_another_configuration(run_native, program, data_file, native_run, tmp_path):
    run = shutil.copytree(native_run, tmp_path / "run")
    done = run_native(program, data_file, run, "--resume", "--lr", "0.1")
    assert done.returncode == 2
    assert "checkpoint is from another configuration (differs in lr)" in done.stderr


def test_runtime_info_lines_only_with_verbose(run_native, program, data_file, tmp_path):
    quiet = run_native(program, data_file, tmp_path / "quiet", "--threads", "1")
    assert quiet.returncode == 0 and "executorch:" not in quiet.stderr, quiet.stderr
    verbose = run_native(program, data_file, tmp_path / "verbose", "--threads", "1", "--verbose")
    assert verbose.returncode == 0 and "Resetting threadpool to 1 threads" in verbose.stderr, verbose.stderr


def _native_and_python_runs(run_native, program: Path, tiny_data_dir: Path, tmp_path: Path) -> tuple[list, list]:
    """The same run of another program by both drivers (tmp_path/native, tmp_path/python): their metrics rows."""
    from runtime_driver.commands.export_data import export_data

    data = export_data(program, tiny_data_dir, tmp_path / "data.bin", steps=STEPS, seed=SEED, eval_examples=EVAL_EXAMPLES)
    done = run_native(program, data, tmp_path / "native")
    assert done.returncode == 0, done.stderr
    train = TrainConfig(steps=STEPS, batch_size=2, lr=LR, eps=EPS, seed=SEED, eval_every=3,
                        eval_examples=EVAL_EXAMPLES, checkpoint_every=3)
    run_training(RunConfig(engine="executorch", program=str(program), data=str(tiny_data_dir), out=str(tmp_path / "python"),
                           test_examples=0, train=train), quiet=True, progress=lambda _: None)
    return metrics(tmp_path / "native"), metrics(tmp_path / "python")


def test_native_run_of_a_quantized_program_matches_python(run_native, tiny_program, tiny_data_dir, tmp_path):
    # Integer weights are packed by XNNPACK at load (float32 ones are delegate inputs, never
    # packed), and the native driver shares the packed copy between methods through XNNPACK's
    # weight cache: the numbers must be the Python runtime's, which has no such cache.
    native, python = _native_and_python_runs(run_native, tiny_program("llama", quantize="8da8w"), tiny_data_dir, tmp_path)
    assert [(r["type"], r["step"]) for r in native] == [(r["type"], r["step"]) for r in python]
    for n, p in zip(native, python):
        if n["type"] == "train":
            assert max(abs(a - b) for a, b in zip(n["losses"], p["losses"])) <= 1e-6
        else:
            assert n["accuracy"] == p["accuracy"]


def test_native_run_of_an_fzoo_program_matches_python_and_replays(run_native, tiny_program, tiny_data_dir, tmp_path, capsys):
    """The estimator travels in the manifest: the native driver normalizes g as the Python
    driver does (same bits), records the Rademacher noise for replay, and fingerprints it."""
    program = tiny_program("llama", estimator="fzoo")
    native, python = _native_and_python_runs(run_native, program, tiny_data_dir, tmp_path)
    train_rows = [(n, p) for n, p in zip(native, python) if n["type"] == "train"]
    assert len(train_rows) == STEPS
    for n, p in train_rows:
        assert n["losses"] == p["losses"] and n["g"] == p["g"]  # same losses, so the same normalized g, bit for bit
        assert max(abs(x) for x in n["g"]) <= 2 ** 0.5 + 1e-12  # normalized: |g| <= sqrt(q), q = 2
    n_state = json.loads((tmp_path / "native" / "ckpt" / "state.json").read_text())
    p_state = json.loads((tmp_path / "python" / "ckpt" / "state.json").read_text())
    assert n_state["fingerprint"] == p_state["fingerprint"] and n_state["fingerprint"]["estimator"] == "fzoo"
    run = tmp_path / "native"
    assert main(["native-adapter", "--program", str(program), "--adapter", str(run / "adapter.safetensors"),
                 "--out", str(run / "adapter")]) == 0
    capsys.readouterr()
    assert main(["replay", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["identical"] is True
