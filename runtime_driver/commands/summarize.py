"""`prge summarize`: the accuracy table (markdown) of finished runs, as BENCHMARKS.md shows it
(for a completion task: loss, perplexity, exact match and token F1; for `prge federate` runs,
summarize_federation.py's table).

Each argument is a run directory of `prge train` (config.json, summary.json, metrics.jsonl) or
the JSON that `prge eval` prints (a zero-shot row). Every figure comes from those files; the
versions the runs recorded are printed under the table. --plot draws the runs' validation
curves against forward rows, as a study's arms are drawn.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runtime_driver.commands.plots import ValidationCurve, plot_validation_curves
from runtime_driver.commands.summarize_federation import is_federation_run, summarize_federation
from runtime_driver.commands.summarize_study import FORWARD_ROWS_AXIS, forward_rows_per_step, is_study, read_study, summarize_studies
from runtime_driver.metrics import read_metrics

COLUMNS = ("run", "method", "q", "b", "steps", "lr", "eps", "test acc", "test loss", "median ms/step", "train wall s")
# Runs of a completion task (prompt -> completion): no accuracy; perplexity and greedy-decoded matches.
COMPLETION_COLUMNS = ("run", "method", "q", "b", "steps", "lr", "eps", "test loss", "test ppl", "exact match", "token F1",
                      "median ms/step", "train wall s")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (is {path.parent} a finished `prge train` run?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _method(train: dict[str, Any], q: int, engine: str) -> str:
    if train["method"] == "prge":
        return f"P-RGE (q={q}, +/- in one batch)"
    if train["method"] == "mezo":
        return f"MeZO-style (q={q}, sequential)"
    if train["method"] == "mezo-full":
        return "full-parameter MeZO (+/- in one batch)"
    through = ", ExecuTorch training extension" if engine == "executorch" else ""
    return f"first-order LoRA-FA ({train['optimizer'].upper() if train['optimizer'] == 'sgd' else 'Adam'}{through})"


def describe(path: str | Path) -> dict[str, Any]:
    """One table row (and validation curve) from a run directory or a `prge eval` JSON file."""
    path = Path(path)
    if path.is_file():
        result = _read_json(path)
        if result.get("adapter") is not None:
            raise ValueError(f"{path}: an evaluation of an adapter; give its run directory instead")
        return {"run": path.stem, "method": "zero-shot (B = 0)", **_test_metrics(result), "curve": [], "versions": None}
    config, summary = _read_json(path / "config.json"), _read_json(path / "summary.json")
    train, q = config["train"], config["adapter"]["num_queries"]
    if "test" not in summary:
        raise ValueError(f"{path}: the run evaluated no test split (--test-examples 0)")
    zeroth = train["method"] != "fo"
    curve = [(r["step"], r.get("accuracy"), r["loss"]) for r in read_metrics(path / "metrics.jsonl") if r.get("type") == "eval"]
    return {
        "run": path.name, "method": _method(train, q, config.get("engine", "eager")), "q": q if zeroth else "-", "b": train["batch_size"],
        "steps": train["steps"], "lr": train["lr"], "eps": train["eps"] if zeroth else "-",
        "estimator": config["adapter"].get("estimator", "spsa") if zeroth else "-",
        **_test_metrics(summary["test"]),
        "median ms/step": summary["median_step_ms"], "train wall s": summary["wall_s"],
        "curve": curve, "versions": summary.get("versions"),
    }


def _test_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The table's cells of a held-out evaluation: accuracy, or a completion task's metrics."""
    return {"completion": "perplexity" in result, "test acc": result.get("accuracy"), "test loss": result["loss"],
            "test ppl": result.get("perplexity"), "exact match": result.get("exact_match"), "token F1": result.get("token_f1")}


_FORMATS = {"test acc": "{:.3f}", "test loss": "{:.3f}", "test ppl": "{:.2f}", "exact match": "{:.3f}",
            "token F1": "{:.3f}", "median ms/step": "{:.0f}", "train wall s": "{:.0f}", "lr": "{:g}", "eps": "{:g}"}


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and column in _FORMATS:
        return _FORMATS[column].format(value)
    return str(value)


def summarize(paths: list[str], plot: str | None = None) -> str:
    of_kind = {"`prge federate` runs": [is_federation_run(p) for p in paths], "`prge study` arms": [is_study(p) for p in paths]}
    for kind, matches in of_kind.items():
        if any(matches) and not all(matches):
            raise ValueError(f"some of these are {kind} and some are not; summarize each kind on its own")
    if all(of_kind["`prge federate` runs"]):
        return summarize_federation(paths, Path(plot) if plot else None)
    if all(of_kind["`prge study` arms"]):
        arms = [(Path(p), read_study(p)) for p in paths]
        return summarize_studies([(path, study, [describe(path / run) for run in study["runs"]]) for path, study in arms],
                                 Path(plot) if plot else None)
    rows = [describe(p) for p in paths]
    names = [row["run"] for row in rows]
    if len(set(names)) < len(names):  # e.g. the same lr and seed in two arms of a study: name their folders too
        for row, p in zip(rows, paths):
            row["run"] = f"{Path(p).parent.name}/{row['run']}"
    kinds = {row["completion"] for row in rows}
    if len(kinds) > 1:
        raise ValueError("these are runs of a label-word task and of a completion task; summarize each kind on its own")
    completion = kinds == {True}
    columns = COMPLETION_COLUMNS if completion else COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c, row.get(c, "-")) for c in columns) + " |")
    lines.append("")
    lines.append("Validation (step: loss):" if completion else "Validation (step: accuracy / loss):")
    for row in rows:
        if row["curve"]:
            points = (f"{s}: {loss:.3f}" if completion else f"{s}: {a:.3f} / {loss:.3f}" for s, a, loss in row["curve"])
            lines.append(f"- `{row['run']}`: " + ", ".join(points))
    versions = {json.dumps(r["versions"], sort_keys=True) for r in rows if r["versions"]}
    lines.append("")
    lines.append("Versions: " + ("; ".join(sorted(versions)) if versions else "not recorded by these runs"))
    if plot:
        _plot_runs(rows, completion, Path(plot))
        lines += ["", f"Curves: {plot}"]
    return "\n".join(lines)


def _plot_runs(rows: list[dict[str, Any]], completion: bool, out_png: Path) -> None:
    """The training runs' validation curves against forward rows, as a study's arms are drawn
    (zero-shot rows have none)."""
    if completion:
        raise ValueError("--plot draws label-word runs (validation accuracy and loss); a completion run's curve is in the table")
    runs = [row for row in rows if row["curve"]]
    if not runs:
        raise ValueError("--plot: none of these runs evaluated the validation split along the way")
    plot_validation_curves([ValidationCurve(f"{row['run']} (lr {row['lr']:g})",
                                            [step * forward_rows_per_step(row) for step, _, _ in row["curve"]],
                                            [a for _, a, _ in row["curve"]], [loss for _, _, loss in row["curve"]])
                            for row in runs], FORWARD_ROWS_AXIS, out_png)
