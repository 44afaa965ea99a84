"""`prge replay`: a run's adapter is a function of its logged (seed, g, lr) alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.causal_lm import AdapterConfig
from runtime_driver.commands.cli import main
from runtime_driver.run import RunConfig, run_training
from runtime_driver.train import TrainConfig

SEQ_LEN = 16


def _train(out: Path, steps: int = 7, eval_every: int = 0, **kw) -> Path:
    cfg = RunConfig(out=str(out), seq_len=SEQ_LEN, test_examples=0, adapter=AdapterConfig(num_queries=2, rank=4),
                    train=TrainConfig(steps=steps, batch_size=2, lr=0.05, eps=1e-2, eval_every=eval_every, checkpoint_every=3,
                                      seed=4), **kw)
    run_training(cfg, quiet=True, progress=lambda _: None)
    return out


@pytest.fixture(scope="module")
def eager_run(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("eager") / "run", model=str(tiny_model_dir("llama")), data=str(tiny_data_dir))


@pytest.fixture(scope="module")
def executorch_run(tiny_program, tiny_data_dir, tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("et") / "run", engine="executorch", program=str(tiny_program("llama")),
                  data=str(tiny_data_dir))


@pytest.fixture(scope="module")
def executorch_fzoo_run(tiny_program, tiny_data_dir, tmp_path_factory) -> Path:
    """Rademacher noise and normalized g: replay reads the noise kind from config.json."""
    return _train(tmp_path_factory.mktemp("et-fzoo") / "run", engine="executorch",
                  program=str(tiny_program("llama", estimator="fzoo")), data=str(tiny_data_dir))


def _replay(run_dir: Path, capsys, *extra: str) -> tuple[int, dict | None, str]:
    code = main(["replay", str(run_dir), *extra])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


@pytest.mark.parametrize("run", ["eager_run", "executorch_run", "executorch_fzoo_run"])
def test_replay_reproduces_adapter_and_checkpoint_bit_for_bit(run, request, capsys, tmp_path):
    code, result, _ = _replay(request.getfixturevalue(run), capsys, "--out", str(tmp_path / "replayed.safetensors"))
    assert code == 0
    assert result["steps_replayed"] == 7 and result["identical"] is True
    # The final adapter and the final checkpoint (mid-run ones: see the crash tests).
    assert result["adapter"] == {"step": 7, "identical": True, "max_abs_diff": 0.0}
    assert result["ckpt"] == {"step": 7, "identical": True, "max_abs_diff": 0.0}
    assert (tmp_path / "replayed.safetensors").is_file()


def _copy_run(run_dir: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, dest)
    return dest


def _rewrite_metrics(run_dir: Path, edit) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = edit(rows)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_tampered_log_is_detected(eager_run, capsys, tmp_path):
    run = _copy_run(eager_run, tmp_path / "run")

    def nudge_g(rows):
        rows[4]["g"][0] += 1e-3
        return rows

    _rewrite_metrics(run, nudge_g)
    code, result, err = _replay(run, capsys)
    assert code == 1 and result["identical"] is False
    assert result["ckpt"]["identical"] is False and result["adapter"]["max_abs_diff"] > 0
    assert "does not reproduce" in err


@pytest.mark.parametrize("edit, words", [
    (lambda rows: [r for r in rows if r.get("step") != 3], "train row 4: step 4, expected 3"),
    (lambda rows: rows[:2] + [rows[1]] + rows[2:], "train row 3: step 1, expected 2"),
    (lambda rows: [{**r, "seed": "x"} if r.get("step") == 2 else r for r in rows], "integer seed"),
    (lambda rows: [], "no training steps logged"),
])
def test_broken_logs_are_clear_errors(edit, words, eager_run, capsys, tmp_path):
    run = _copy_run(eager_run, tmp_path / "run")
    _rewrite_metrics(run, edit)
    code, _, err = _replay(run, capsys)
    assert code == 2 and words in err and "Traceback" not in err


def test_replay_needs_a_run_directory(capsys, tmp_path):
    code, _, err = _replay(tmp_path, capsys)
    assert code == 2 and "config.json: not found" in err


def test_first_order_runs_are_not_replayable(eager_run, capsys, tmp_path):
    run = _copy_run(eager_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["train"]["method"] = "fo"
    (run / "config.json").write_text(json.dumps(config))
    code, _, err = _replay(run, capsys)
    assert code == 2 and "first-order run" in err


def _peft_files(folder: Path) -> tuple[dict, str]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors")), (folder / "adapter_config.json").read_text()


def test_replay_to_a_step_rebuilds_the_adapter_a_shorter_run_ended_with(eager_run, tiny_model_dir, tiny_data_dir, capsys,
                                                                         tmp_path):
    """`prge replay RUN --step 4 --peft DIR`: the adapter of a 7-step run as it was after step 4
    is, bit for bit, the PEFT adapter a 4-step run of the same settings ended with (a constant
    lr: the first 4 steps of both are the same steps)."""
    short = _train(tmp_path / "short", steps=4, model=str(tiny_model_dir("llama")), data=str(tiny_data_dir))
    code, result, _ = _replay(eager_run, capsys, "--step", "4", "--peft", str(tmp_path / "at-4"))
    assert code == 0 and result["steps_replayed"] == 4
    assert result["identical"] is None and "adapter" not in result  # nothing saved at step 4 to check against
    replayed, replayed_config = _peft_files(tmp_path / "at-4")
    saved, saved_config = _peft_files(short / "adapter")
    assert replayed.keys() == saved.keys() and all(torch.equal(replayed[k], saved[k]) for k in saved)
    assert replayed_config == saved_config
    assert any(saved[k].abs().max() > 0 for k in saved if "lora_B" in k)


def test_replay_to_the_best_validation_step(eager_run, capsys, tmp_path):
    """--step best: the step of the lowest validation loss in the log (the earliest of equals),
    replayed; at the last step the final adapter and checkpoint are checked as in a full replay."""
    run = _copy_run(eager_run, tmp_path / "run")

    def evals(losses):
        def edit(rows):
            kept = [r for r in rows if r.get("type") != "eval"]
            return kept + [{"type": "eval", "split": "validation", "step": step, "accuracy": 0.5, "loss": loss}
                           for step, loss in losses.items()]
        return edit

    _rewrite_metrics(run, evals({0: 0.7, 2: 0.5, 5: 0.4, 6: 0.4, 7: 0.6}))
    code, result, _ = _replay(run, capsys, "--step", "best", "--out", str(tmp_path / "best.safetensors"))
    assert code == 0 and result["best_validation_step"] == 5 and result["validation_loss"] == 0.4
    assert result["steps_replayed"] == 5 and (tmp_path / "best.safetensors").is_file()
    _rewrite_metrics(run, evals({0: 0.7, 7: 0.3}))
    code, result, _ = _replay(run, capsys, "--step", "best")
    assert code == 0 and result["best_validation_step"] == 7 and result["identical"] is True
    assert result["adapter"]["identical"] and result["ckpt"]["identical"]


@pytest.mark.parametrize("args, words", [
    (["--step", "8"], "the adapter after step 8 asked, but 7 steps are logged"),
    (["--step", "best"], "no validation evals logged"),
    (["--peft"], "adapter_config.json: not found"),  # the header comes from the run's final adapter
])
def test_bad_replay_requests_are_clear_errors(args, words, eager_run, capsys, tmp_path):
    run = _copy_run(eager_run, tmp_path / "run")
    _rewrite_metrics(run, lambda rows: [r for r in rows if r.get("type") != "eval"])
    if args == ["--peft"]:
        import shutil

        shutil.rmtree(run / "adapter")
        args = ["--peft", str(tmp_path / "out")]
    code, _, err = _replay(run, capsys, *args, "--out", str(tmp_path / "flat.safetensors"))
    assert code == 2 and words in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "flat.safetensors").exists()  # nothing half-written


def test_a_step_that_is_not_a_count_is_refused(eager_run, capsys):
    with pytest.raises(SystemExit):
        main(["replay", str(eager_run), "--step", "-1"])
    assert "a number of steps or 'best'" in capsys.readouterr().err
