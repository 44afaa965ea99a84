"""`prge study`: the lr is chosen on validation only, the grid widens past an edge, the other
seeds run at the choice, an interrupted study resumes, and `prge summarize` reports the arm
from its runs' own files."""
from __future__ import annotations

import json
import statistics

import pytest

from runtime_driver.commands.cli import main
from runtime_driver.commands.study import check_train_args, choose_lr, final_validation_loss, widened


def test_the_lr_of_lowest_validation_loss_is_chosen_and_its_edge_named():
    assert choose_lr({1e-3: 0.5, 3e-3: 0.4, 1e-2: 0.45}) == (3e-3, None)
    assert choose_lr({1e-3: 0.3, 3e-3: 0.4}) == (1e-3, "low")
    assert choose_lr({1e-3: 0.5, 3e-3: 0.4}) == (3e-3, "high")
    assert choose_lr({1e-3: 0.5}) == (1e-3, None)  # one value: no edge to widen
    assert widened([1e-3, 3e-3], "low") == pytest.approx(1e-3 / 3)
    assert widened([3e-3, 1e-3, 1e-2], "high") == 0.0333333  # the lr its run is given and named by


def test_the_study_owns_lr_seed_and_out():
    check_train_args(["--method", "prge", "--steps", "3"])
    for owned in (["--lr", "1e-3"], ["--seed=1"], ["--out", "x"], ["--resume"]):
        with pytest.raises(ValueError, match="sets --lr, --seed, --out, --resume itself"):
            check_train_args(["--steps", "3", *owned])


def test_a_study_chooses_on_validation_runs_every_seed_and_resumes(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    arm = tmp_path / "spsa-arm"
    train_args = ["--model", str(tiny_model_dir("llama")), "--data", str(tiny_data_dir), "--seq-len", "16", "--q", "2",
                  "--rank", "4", "--steps", "3", "--batch", "2", "--eval-every", "3", "--eval-examples", "8",
                  "--test-examples", "8", "--threads", "1"]
    study_args = ["study", "--out", str(arm), "--lrs", "0.05,0.5", "--seeds", "0,1", "--jobs", "2", "--max-widen", "1", "--"]
    assert main(study_args + train_args) == 0
    study = json.loads((arm / "study.json").read_text())

    first_seed = {run.name: final_validation_loss(run) for run in arm.glob("lr*-seed0") if run.is_dir()}
    assert 2 <= len(first_seed) <= 3  # the grid, and one value beyond it if the choice sat on an edge
    chosen = study["selection"]["chosen_lr"]
    assert min(first_seed, key=first_seed.get) == f"lr{chosen:g}-seed0"
    assert study["runs"] == [f"lr{chosen:g}-seed0", f"lr{chosen:g}-seed1"]
    assert sorted(run.name for run in arm.glob("lr*-seed1") if run.is_dir()) == [f"lr{chosen:g}-seed1"]
    assert f"lr {chosen:g}" in capsys.readouterr().out

    # A second invocation finds every run finished and trains nothing again.
    stamps = {p: p.stat().st_mtime_ns for p in arm.glob("*/summary.json")}
    assert main(study_args + train_args) == 0
    assert {p: p.stat().st_mtime_ns for p in arm.glob("*/summary.json")} == stamps
    capsys.readouterr()
    assert main(study_args + train_args + ["--eps", "1e-3"]) == 2  # another arm's arguments: not in this folder
    assert "run with other `prge train` arguments" in capsys.readouterr().err

    assert main(["summarize", str(arm), "--plot", str(tmp_path / "curves.png")]) == 0
    table = capsys.readouterr().out
    accuracies = [json.loads((arm / run / "summary.json").read_text())["test"]["accuracy"] for run in study["runs"]]
    row = next(line for line in table.splitlines() if line.startswith("| spsa-arm |"))
    assert row.split(" | ")[2] == "spsa"
    assert f"| {statistics.fmean(accuracies):.3f} ± {statistics.stdev(accuracies):.3f} |" in row
    assert "| 0,1 |" in row and "| 24 |" in row  # forward rows of one run: 3 steps of 2q*b = 8
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["summarize", str(arm), str(arm / study["runs"][0])]) == 2  # an arm beside a plain run
    assert "some of these are `prge study` arms and some are not" in capsys.readouterr().err


def test_a_failed_run_stops_the_study_naming_its_log(tmp_path, capsys):
    arm = tmp_path / "arm"
    assert main(["study", "--out", str(arm), "--lrs", "1e-3", "--seeds", "0", "--", "--model", str(tmp_path / "no-model"),
                 "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "lr0.001-seed0: `prge train` failed" in err and str(arm / "lr0.001-seed0.log") in err
    assert "no-model" in (arm / "lr0.001-seed0.log").read_text()
    assert json.loads((arm / "study.json").read_text())["selection"] is None
    assert main(["summarize", str(arm)]) == 2
    assert "unfinished `prge study`" in capsys.readouterr().err
