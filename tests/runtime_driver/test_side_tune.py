"""Side tuning's halves (runtime_driver/side_tune.py) on the tiny model and task: the device's
wire features, and a side network trained on them by the server that learns the task the frozen
random model cannot do."""
from __future__ import annotations

import json

import pytest
import torch

from export.contract.manifest import ManifestError
from models.causal_lm import build_side_features, load_tokenizer
from models.tasks.folder import load_folder_spec, load_task
from runtime_driver.side_tune import SideTrainConfig, device_features, side_metrics, train_side_network


@pytest.fixture(scope="module")
def wire(tiny_model_dir, tiny_data_dir):
    model_dir = tiny_model_dir("llama")
    task = load_task(load_folder_spec(tiny_data_dir), load_tokenizer(model_dir), tiny_data_dir)
    features = build_side_features(model_dir, task.label_ids)
    splits = {name: task.split(name, 16) for name in ("train", "validation")}
    with torch.no_grad():
        sent = {name: device_features(features, split, 8, False, len(features.taps), features.hidden_size)
                for name, split in splits.items()}
    return sent, {name: split.labels for name, split in splits.items()}


def test_the_side_network_learns_the_tiny_task(wire):
    sent, labels = wire
    config = SideTrainConfig(epochs=30, lr=3e-3, batch_size=16, seed=0)
    side, history = train_side_network(sent["train"], labels["train"], sent["validation"], labels["validation"], config)
    before, after = history.rows[0], history.rows[history.best_epoch]
    assert len(history.rows) == config.epochs + 1
    assert history.rows[-1]["train_loss"] < 0.5 * history.rows[1]["train_loss"]
    assert after["val_loss"] == min(row["val_loss"] for row in history.rows)  # the network kept
    assert after["val_accuracy"] >= before["val_accuracy"] + 0.2, (before, after)
    assert side_metrics(side, sent["validation"], labels["validation"]) == {k[4:]: v for k, v in after.items() if k.startswith("val_")}


def test_training_is_seeded(wire):
    sent, labels = wire
    config = SideTrainConfig(epochs=2, seed=3)
    runs = [train_side_network(sent["train"], labels["train"], sent["validation"], labels["validation"], config)[0]
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()))
    with pytest.raises(ValueError, match="one label per example"):
        train_side_network(sent["train"], labels["train"][:-1], sent["validation"], labels["validation"], config)


@pytest.fixture(scope="module")
def side_run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    from runtime_driver.commands.cli import main

    out = tmp_path_factory.mktemp("side") / "run"
    code = main(["side-tune", "--model", str(tiny_model_dir("llama")), "--data", str(tiny_data_dir), "--out", str(out),
                 "--batch", "4", "--seq-len", "16", "--epochs", "30", "--lr", "3e-3", "--server-batch", "16",
                 "--eval-examples", "24"])
    assert code == 0
    return out, json.loads((out / "summary.json").read_text())


def test_side_tune_end_to_end(side_run):
    """Device program -> int8 wire -> server -> base + side network program: the tuned program
    beats the frozen model on the test split, and the bytes sent are taps x hidden int8 plus
    a float32 scale per tap and the label logits."""
    from safetensors.torch import load_file

    out, summary = side_run
    for name in ("config.json", "metrics.jsonl", "side_network.safetensors", "side_network.json",
                 "device-program/manifest.json", "program/manifest.json", "wire/train.safetensors"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "program" / "manifest.json").read_text())
    taps, hidden = manifest["side"]["taps"], manifest["side"]["hidden_size"]
    assert summary["bytes_sent_per_example"] == len(taps) * hidden + 4 * len(taps) + 4 * 2
    wire = load_file(str(out / "wire" / "train.safetensors"))
    assert wire["codes"].dtype == torch.int8 and list(wire["codes"].shape) == [64, len(taps), hidden]
    assert summary["examples_sent"] == {"train": 64, "validation": 24, "test": 24}
    assert summary["test"]["accuracy"] >= summary["zero_shot_test"]["accuracy"] + 0.15, summary
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 31


def test_the_programs_compute_what_pytorch_does(side_run, tiny_model_dir, tiny_batch):
    """The device program's features equal eager's; the exported side network predicts what the
    PyTorch one (the saved weights) predicts on the same features."""
    from safetensors.torch import load_file

    from models.side_network import SideNetwork, split_features
    from runtime_driver.side_tune import ExecuTorchSide

    out, _ = side_run
    tuned = ExecuTorchSide(out / "program")
    eager = build_side_features(tiny_model_dir("llama"), tuned.manifest["task"]["label_token_ids"], tuned.taps)
    side = SideNetwork(**json.loads((out / "side_network.json").read_text()))
    side.load_state_dict(load_file(str(out / "side_network.safetensors")))
    ids, mask, _ = tiny_batch(4)
    with torch.no_grad():
        expected = eager(ids, mask)
        logits = side(*split_features(expected, len(tuned.taps), tuned.hidden_size))
    torch.testing.assert_close(tuned.features(ids, mask), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ExecuTorchSide(out / "device-program").features(ids, mask), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tuned.logits(ids, mask), logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(tuned.logits(ids, mask).argmax(1), logits.argmax(1))


def test_bad_requests_are_refused_before_any_export(tiny_model_dir, tiny_completion_data_dir, tiny_program, tmp_path):
    from runtime_driver.side_tune import ExecuTorchSide, SideTuneConfig, side_tune

    with pytest.raises(ValueError, match="label-word tasks"):
        side_tune(SideTuneConfig(model=str(tiny_model_dir("llama")), data=str(tiny_completion_data_dir), out=str(tmp_path / "x")),
                  progress=lambda _: None)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ManifestError, match="not a side-tuning one"):
        ExecuTorchSide(tiny_program())


def test_bench_times_the_device_forward(side_run):
    """`prge bench --programs` takes a side-tuning device program: its step is its one forward."""
    from runtime_driver.commands.bench import compare_programs

    out, _ = side_run
    row = compare_programs([str(out / "device-program")], reps=1, threads=1)[str(out / "device-program")]
    assert row["method"] == "side tuning (device forward)" and row["rows_per_step"] == 4
    assert row["train_step_ms"] > 0 and row["step_overhead"] is None and row["peak_rss_train_step_mb"] > 0
