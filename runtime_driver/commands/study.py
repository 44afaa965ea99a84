"""`prge study`: one arm of a learning-rate-tuned, multi-seed comparison (issue 16's protocol).

An arm is one way to train (the `prge train` arguments after `--`, e.g. `--method prge
--estimator fzoo --q 4 --batch 4 --steps 150 --eval-every 25`). The study
  1. trains the first seed at every learning rate of the grid,
  2. chooses the lr whose run ends with the lowest validation loss (accuracy on a few hundred
     validation examples moves by a standard error of ~3 points, loss is the steadier signal;
     the test split is evaluated by every run but never read here),
  3. widens the grid while the choice sits at its edge (the next value one grid ratio further
     out, at most `max_widen` times), so a grid that was too narrow shows instead of deciding,
  4. trains the other seeds at the chosen lr.
Every run is its own `prge train` process (`--jobs` of them at once), in OUT/lr<lr>-seed<seed>,
started with --resume: an interrupted study continues where it stopped, finished runs are
kept. OUT/study.json records the arm's arguments from the start (a second arm is refused the
folder) and, once every seed has run, the grid, every lr's validation loss, the choice and the runs at
it; `prge summarize OUT...` turns arms into the table and the validation-curve PNG.
"""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from models.console import say
from models.files import write_json_atomic
from runtime_driver.metrics import read_metrics

# The study sets these itself for every run.
_STUDY_OWNS = ("--lr", "--seed", "--out", "--resume")


def run_dir(out: Path, lr: float, seed: int) -> Path:
    return out / f"lr{lr:g}-seed{seed}"


def final_validation_loss(run: Path) -> float:
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r.get("type") == "eval" and r.get("split") == "validation"]
    if not evals:
        raise ValueError(f"{run}: no validation evals to choose an lr by (give the arm --eval-every > 0)")
    return evals[-1]["loss"]


def choose_lr(losses: dict[float, float]) -> tuple[float, str | None]:
    """The lr of lowest final validation loss, and the side of the grid it sits on, if any
    ("low" or "high"; None inside the grid, or for a grid of one value)."""
    grid = sorted(losses)
    best = min(grid, key=lambda lr: losses[lr])
    if len(grid) < 2:
        return best, None
    return best, "low" if best == grid[0] else "high" if best == grid[-1] else None


def widened(grid: list[float], side: str) -> float:
    """The next lr beyond the grid's edge, one ratio of the two values at that edge further,
    to the 6 significant digits a run is given and named by (f"{lr:g}")."""
    grid = sorted(grid)
    lr = grid[0] * grid[0] / grid[1] if side == "low" else grid[-1] * grid[-1] / grid[-2]
    return float(f"{lr:g}")


def check_train_args(train_args: list[str]) -> None:
    owned = [a for a in train_args if a.split("=")[0] in _STUDY_OWNS]
    if owned:
        raise ValueError(f"prge study sets {', '.join(_STUDY_OWNS)} itself; remove {' '.join(owned)} from the arm's arguments")


def _claim(out: Path, train_args: list[str], seeds: list[int]) -> None:
    """Record the arm's arguments before its first run, so a folder never mixes runs of two
    arms: a later invocation with other arguments is refused (more seeds are fine)."""
    record = out / "study.json"
    if record.is_file():
        earlier = json.loads(record.read_text())["train_args"]
        if earlier != train_args:
            raise ValueError(f"{record}: this arm was run with other `prge train` arguments ({' '.join(earlier)}); "
                             "give the new arm its own --out")
        return
    write_json_atomic(record, {"train_args": train_args, "seeds": seeds, "selection": None, "runs": []})


def _train(train_args: list[str], out: Path, lr: float, seed: int) -> Path:
    run = run_dir(out, lr, seed)
    if (run / "summary.json").is_file():
        return run  # finished by an earlier invocation
    run.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "runtime_driver.commands.cli", "train", *train_args,
               "--lr", f"{lr:g}", "--seed", str(seed), "--out", str(run), "--resume"]
    say(f"{run}: training (progress in {run}.log)")
    with open(f"{run}.log", "a") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not (run / "summary.json").is_file():
        raise RuntimeError(f"{run}: `prge train` failed (exit {done.returncode}); its output is in {run}.log")
    say(f"{run}: done, final validation loss {final_validation_loss(run):.4f}")
    return run


def run_study(out: str | Path, train_args: list[str], lrs: list[float], seeds: list[int], jobs: int = 1,
              max_widen: int = 2) -> dict[str, Any]:
    check_train_args(train_args)
    if not lrs or not seeds:
        raise ValueError("a study needs at least one lr (--lrs) and one seed (--seeds)")
    out = Path(out)
    _claim(out, train_args, seeds)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        def train_all(pairs: list[tuple[float, int]]) -> list[Path]:
            return list(pool.map(lambda pair: _train(train_args, out, *pair), pairs))

        grid, first_seed = sorted(set(lrs)), seeds[0]
        losses = {lr: final_validation_loss(run) for lr, run in zip(grid, train_all([(lr, first_seed) for lr in grid]))}
        best, edge = choose_lr(losses)
        for _ in range(max_widen):
            if edge is None:
                break
            lr = widened(list(losses), edge)
            losses[lr] = final_validation_loss(train_all([(lr, first_seed)])[0])
            best, edge = choose_lr(losses)
        runs = train_all([(best, seed) for seed in seeds])
    study = {
        "train_args": train_args, "seeds": seeds,
        "selection": {"criterion": f"lowest final validation loss, seed {first_seed}",
                      "validation_loss": {f"{lr:g}": losses[lr] for lr in sorted(losses)},
                      "chosen_lr": best, "at_grid_edge": edge},
        "runs": [run.name for run in runs],
    }
    write_json_atomic(out / "study.json", study)
    return study


def parse_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lrs {text!r}: expected comma-separated numbers, e.g. 1e-3,3e-3,1e-2") from None


def parse_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def describe_choice(study: dict[str, Any]) -> str:
    sel = study["selection"]
    grid = ", ".join(f"{lr}: {loss:.4f}" for lr, loss in sel["validation_loss"].items())
    # Widening may have stopped at --max-widen (0: never widened): either way the best may lie beyond.
    note = f" (at the grid's {sel['at_grid_edge']} edge: a wider grid may choose another lr)" if sel["at_grid_edge"] else ""
    return f"lr {sel['chosen_lr']:g}{note}; final validation loss by lr: {grid}; runs: {', '.join(study['runs'])}"
