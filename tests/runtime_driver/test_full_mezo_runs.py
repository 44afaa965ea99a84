"""`prge train --method mezo-full` on the tiny model: a whole run writes a model folder
`transformers` loads, an interrupted run resumes to the same weights bit for bit, and
`prge replay` rebuilds the weights from the base model and the log alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from runtime_driver.commands.cli import main
from runtime_driver.metrics import read_metrics
from runtime_driver.run import RunConfig, run_training
from runtime_driver.train import TrainConfig

SEQ_LEN = 16
STEPS = 6


def _run(tmp_path: Path, name: str, model: Path, data: Path, resume: bool = False, **train) -> Path:
    settings = {"method": "mezo-full", "steps": STEPS, "batch_size": 2, "lr": 1e-3, "eps": 1e-3, "eval_every": 3,
                "eval_examples": 8, "seed": 2, **train}
    cfg = RunConfig(model=str(model), data=str(data), out=str(tmp_path / name), seq_len=SEQ_LEN, test_examples=8,
                    train=TrainConfig(**settings))
    run_training(cfg, resume=resume, quiet=True, progress=lambda _: None)
    return tmp_path / name


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def whole_run(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("full"), "whole", tiny_model_dir("llama"), tiny_data_dir, checkpoint_every=STEPS)


def test_a_run_trains_every_weight_and_writes_a_loadable_model_folder(whole_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    rows = [r for r in read_metrics(whole_run / "metrics.jsonl") if r["type"] == "train"]
    assert len(rows) == STEPS and all(len(r["g"]) == 1 and len(r["losses"]) == 2 for r in rows)
    summary = json.loads((whole_run / "summary.json").read_text())
    assert summary["method"] == "mezo-full" and "accuracy" in summary["test"]
    assert not (whole_run / "adapter").exists()
    trained = AutoModelForCausalLM.from_pretrained(str(whole_run / "model"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")))
    changed = [n for n, p in base.named_parameters() if not torch.equal(p, dict(trained.named_parameters())[n])]
    assert changed == [n for n, _ in base.named_parameters()]  # MeZO moves every weight
    assert trained.lm_head.weight.data_ptr() == trained.model.embed_tokens.weight.data_ptr()  # still tied


def test_replay_rebuilds_the_weights_from_the_base_model_and_the_log(whole_run, capsys):
    code = main(["replay", str(whole_run)])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["steps_replayed"] == STEPS and result["identical"] is True
    assert result["model"] == {"step": STEPS, "identical": True, "max_abs_diff": 0.0}
    assert result["ckpt"] == {"step": STEPS, "identical": True, "max_abs_diff": 0.0}


def test_replay_finds_a_changed_weight(whole_run, tmp_path, capsys):
    from safetensors.torch import save_file
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(whole_run, copy)
    shutil.rmtree(copy / "ckpt")
    weights = _weights(copy)
    name = next(iter(weights))
    weights[name].view(-1)[0] += 1e-6
    save_file(weights, str(copy / "model" / "model.safetensors"))
    assert main(["replay", str(copy)]) != 0
    assert json.loads(capsys.readouterr().out)["model"]["identical"] is False


def test_an_interrupted_run_resumes_to_the_same_weights(whole_run, tiny_model_dir, tiny_data_dir, tmp_path,
                                                         stop_after_step):
    model = tiny_model_dir("llama")
    with stop_after_step(4):
        _run(tmp_path, "resumed", model, tiny_data_dir, checkpoint_every=3)
    _run(tmp_path, "resumed", model, tiny_data_dir, resume=True, checkpoint_every=3)
    whole, resumed = _weights(whole_run), _weights(tmp_path / "resumed")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_refused_inputs(tiny_model_dir, tiny_completion_data_dir, tmp_path):
    with pytest.raises(ValueError, match="label-word tasks"):
        _run(tmp_path, "completion", tiny_model_dir("llama"), tiny_completion_data_dir)
    assert not (tmp_path / "completion").exists()
