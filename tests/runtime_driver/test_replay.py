"""`prge replay`: a run's adapter is a function of its logged (seed, g, lr) alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.causal_lm import AdapterConfig
from runtime_driver.commands.cli import main
from runtime_driver.run import RunConfig, run_training
from runtime_driver.train import TrainConfig

SEQ_LEN = 16


def _train(out: Path, **kw) -> Path:
    cfg = RunConfig(out=str(out), seq_len=SEQ_LEN, test_examples=0, adapter=AdapterConfig(num_queries=2, rank=4),
                    train=TrainConfig(steps=7, batch_size=2, lr=0.05, eps=1e-2, eval_every=0, checkpoint_every=3, seed=4),
                    **kw)
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
