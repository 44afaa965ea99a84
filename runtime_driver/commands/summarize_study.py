"""`prge summarize` of `prge study` arms: test accuracy over seeds at each arm's validation-chosen
lr (mean, sample standard deviation, range), and a PNG of the validation curves against forward
rows (mean over seeds, the band their range). Every figure comes from the arms' study.json and
their runs' own files, read by summarize.describe.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from runtime_driver.commands.plots import ValidationCurve, plot_validation_curves
from runtime_driver.commands.study import describe_choice
from runtime_driver.federation.settings import forward_rows

COLUMNS = ("arm", "method", "estimator", "steps", "forward rows", "lr (chosen on validation)", "seeds",
           "test acc mean ± sd", "test acc range", "test loss mean", "median ms/step", "train wall s (mean)")


def is_study(path: str | Path) -> bool:
    return (Path(path) / "study.json").is_file()


def read_study(path: str | Path) -> dict[str, Any]:
    study = json.loads((Path(path) / "study.json").read_text())
    if study["selection"] is None:
        raise ValueError(f"{path}: an unfinished `prge study` (no lr chosen yet); run its command again to finish it")
    return study


FORWARD_ROWS_AXIS = "forward rows (sequences; first order also runs them backward)"


def forward_rows_per_step(row: dict[str, Any]) -> int:
    """Sequences a step runs forward: 2q copies of b examples for zeroth order, b for first order
    (which also runs them backward)."""
    return forward_rows(1, row["q"], row["b"]) if isinstance(row["q"], int) else row["b"]


def _mean_curve(runs: list[dict[str, Any]], index: int) -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) over the seeds of the curve's `index` field (1 accuracy, 2 loss),
    at the steps every seed evaluated."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for point in run["curve"]:
            if point[index] is not None:
                by_step.setdefault(point[0], []).append(point[index])
    return [(step, statistics.fmean(v), min(v), max(v)) for step, v in sorted(by_step.items()) if len(v) == len(runs)]


def arm_row(path: Path, study: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    first = runs[0]
    accuracies = [r["test acc"] for r in runs]
    rows = forward_rows_per_step(first)
    return {
        "arm": path.name, "method": first["method"], "estimator": first["estimator"], "steps": first["steps"],
        "forward rows": f"{rows * first['steps']:,}", "lr (chosen on validation)": f"{study['selection']['chosen_lr']:g}",
        "seeds": ",".join(str(s) for s in study["seeds"]),
        "test acc mean ± sd": f"{statistics.fmean(accuracies):.3f} ± {statistics.stdev(accuracies):.3f}" if len(runs) > 1
        else f"{accuracies[0]:.3f}",
        "test acc range": f"{min(accuracies):.3f}-{max(accuracies):.3f}",
        "test loss mean": f"{statistics.fmean(r['test loss'] for r in runs):.3f}",
        "median ms/step": f"{statistics.median(r['median ms/step'] for r in runs):.0f}",
        "train wall s (mean)": f"{statistics.fmean(r['train wall s'] for r in runs):.0f}",
        "rows per step": rows,
    }


def summarize_studies(arms: list[tuple[Path, dict[str, Any], list[dict[str, Any]]]], plot: Path | None) -> str:
    """arms: (folder, study.json, the described runs at its chosen lr, one per seed)."""
    table = [arm_row(*arm) for arm in arms]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in table]
    lines += ["", "Learning rate (seed of the choice, lowest final validation loss):"]
    lines += [f"- `{path.name}`: {describe_choice(study)}" for path, study, _ in arms]
    lines += ["", "Validation, mean over seeds (step: accuracy / loss):"]
    curves = [(_mean_curve(runs, 1), _mean_curve(runs, 2)) for _, _, runs in arms]
    for (path, _, _), (accuracy, loss) in zip(arms, curves):
        points = (f"{a[0]}: {a[1]:.3f} / {b[1]:.3f}" for a, b in zip(accuracy, loss))
        lines.append(f"- `{path.name}`: " + ", ".join(points))
    if plot:
        _plot([path.name for path, _, _ in arms], table, curves, plot)
        lines += ["", f"Curves: {plot}"]
    return "\n".join(lines)


def _plot(names: list[str], table: list[dict[str, Any]], curves: list[tuple[list, list]], out_png: Path) -> None:
    """curves: each arm's (accuracy, loss) _mean_curve."""
    lines = []
    for name, row, (accuracy, loss) in zip(names, table, curves):
        lines.append(ValidationCurve(
            f"{name} (lr {row['lr (chosen on validation)']})", [step * row["rows per step"] for step, *_ in accuracy],
            [c[1] for c in accuracy], [c[1] for c in loss],
            accuracy_range=([c[2] for c in accuracy], [c[3] for c in accuracy]),
            loss_range=([c[2] for c in loss], [c[3] for c in loss])))
    plot_validation_curves(lines, FORWARD_ROWS_AXIS, out_png,
                           ylabel_note=" (mean over seeds; band: range)")
