"""Curves as PNGs: a run's training loss and validation accuracy against steps, and the
validation curves of several runs (federations, study arms) against forward rows."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime_driver.metrics import read_metrics


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers or in CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: Path, dpi: int) -> Path:
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    _pyplot().close(fig)
    return out_png


@dataclass(frozen=True)
class ValidationCurve:
    """One line of plot_validation_curves; the ranges, if given, are drawn as a band around it."""

    label: str
    x: list[float]
    accuracy: list[float]
    loss: list[float]
    accuracy_range: tuple[list[float], list[float]] | None = None
    loss_range: tuple[list[float], list[float]] | None = None


def plot_validation_curves(curves: list[ValidationCurve], xlabel: str, out_png: Path, ylabel_note: str = "") -> Path:
    """Validation accuracy and loss of several runs, side by side, against a shared x."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(12, 4.5))
    for curve in curves:
        for ax, values, band in ((axes[0], curve.accuracy, curve.accuracy_range), (axes[1], curve.loss, curve.loss_range)):
            line, = ax.plot(curve.x, values, "o-", markersize=3, label=curve.label)
            if band is not None:
                ax.fill_between(curve.x, *band, color=line.get_color(), alpha=0.15)
    for ax, name in zip(axes, ("validation accuracy", "validation loss")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name + ylabel_note)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_png, dpi=120)


def plot_run(metrics_path: Path, out_png: Path, title: str, test_accuracy: dict[int, float] | None = None) -> Path:
    """Loss per step (raw and smoothed) and validation accuracy per eval; test_accuracy maps a
    step to a held-out test accuracy (e.g. before and after training) drawn as markers."""
    plt = _pyplot()
    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("type") == "train"]
    evals = [r for r in rows if r.get("type") == "eval"]
    steps = [r["step"] for r in train]
    losses = [_mean_loss(r) for r in train]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, losses, color="0.75", linewidth=0.8, label="per step")
    ax_loss.plot(steps, _moving_average(losses, 20), color="C0", label="moving average (20)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (mean over 2q copies)")
    ax_loss.legend()
    ax_acc.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", color="C1", label="validation")
    if test_accuracy:
        steps_, values = zip(*sorted(test_accuracy.items()))
        ax_acc.plot(steps_, values, "s--", color="C2", label="test (held out)")
        for step, value in zip(steps_, values):
            ax_acc.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(6, -12), color="C2")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_png, dpi=110)


def _mean_loss(row: dict[str, Any]) -> float:
    if "loss" in row:  # first-order rows
        return row["loss"]
    finite = [x for x in row["losses"] if x is not None]
    return sum(finite) / len(finite) if finite else float("nan")
