"""`prge summarize` of `prge federate` runs: the table of BENCHMARKS.md "Many phones" (traffic
per client per round, test accuracy at equal forward passes) and a PNG of validation accuracy
against forward passes. Every figure comes from the runs' own files: federation.json (the
settings), summary.json, and rounds.jsonl (federations) or metrics.jsonl (the centralized run).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runtime_driver.commands.plots import ValidationCurve, plot_validation_curves
from runtime_driver.metrics import read_metrics

COLUMNS = ("run", "method", "clients", "shards", "rounds x local steps", "forward rows", "bytes up / client / round",
           "bytes down / client / round", "test acc", "test loss")


def is_federation_run(path: str | Path) -> bool:
    return (Path(path) / "federation.json").is_file()


def _method(settings: dict[str, Any]) -> str:
    if settings["method"] == "prge":
        return f"federated P-RGE (seeds and scalars, {settings['aggregate']})"
    if settings["method"] == "fedavg":
        return "FedAvg of the adapter (Flower's strategy)"
    return "centralized P-RGE (one device, all rows)"


def _curve(path: Path, settings: dict[str, Any], summary: dict[str, Any]) -> list[tuple[int, float, float]]:
    """(forward rows so far, validation accuracy, validation loss) at each validation."""
    if settings["method"] == "centralized":
        rows_per_step = summary["forward_rows"] // max(1, summary["steps_run"])
        return [(r["step"] * rows_per_step, r["accuracy"], r["loss"]) for r in read_metrics(path / "metrics.jsonl")
                if r.get("type") == "eval" and r.get("accuracy") is not None]
    points, steps = [], 0  # (steps so far, accuracy, loss); forward rows once the total is known
    for r in read_metrics(path / "rounds.jsonl"):
        steps += len(r["clients"]) * settings["local_steps"]
        if "accuracy" in r.get("metrics", {}):
            points.append((steps, r["metrics"]["accuracy"], r["metrics"]["loss"]))
    rows_per_step = summary["forward_rows"] // max(1, steps)
    return [(n * rows_per_step, accuracy, loss) for n, accuracy, loss in points]


def describe_federation(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    settings = json.loads((path / "federation.json").read_text())
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path}: not found (is {path} a finished `prge federate` run?)")
    summary = json.loads(summary_path.read_text())
    if "test" not in summary:
        raise ValueError(f"{path}: the run evaluated no test split (--test-examples 0)")
    traffic = summary["bytes_per_client_round"]
    central = settings["method"] == "centralized"
    return {
        "run": path.name, "method": _method(settings), "clients": "-" if central else settings["clients"],
        "shards": "-" if central else ("by label" if settings["non_iid"] else "IID"),
        "rounds x local steps": f"{summary['steps_run']} steps" if central else f"{settings['rounds']} x {settings['local_steps']}",
        "forward rows": summary["forward_rows"],
        "bytes up / client / round": "-" if central else f"{traffic['up']:,.0f}",
        "bytes down / client / round": "-" if central else f"{traffic['down']:,.0f}",
        "test acc": f"{summary['test']['accuracy']:.3f}", "test loss": f"{summary['test']['loss']:.3f}",
        "curve": _curve(path, settings, summary),
    }


def summarize_federation(paths: list[str], plot: Path | None = None) -> str:
    rows = [describe_federation(p) for p in paths]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    lines += ["", "Validation (forward rows: accuracy / loss):"]
    lines += [f"- `{row['run']}`: " + ", ".join(f"{n:,}: {a:.3f} / {loss:.3f}" for n, a, loss in row["curve"])
              for row in rows if row["curve"]]
    if plot is not None:
        _plot(rows, plot)
        lines += ["", f"Plot: {plot}"]
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], out_png: Path) -> None:
    curves = []
    for row in rows:
        if row["curve"]:
            x, accuracy, loss = (list(values) for values in zip(*row["curve"]))
            curves.append(ValidationCurve(row["run"], x, accuracy, loss))
    plot_validation_curves(curves, "forward rows (all clients)", out_png)
