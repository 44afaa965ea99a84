"""Training curves as a PNG: loss and validation accuracy against steps."""
from __future__ import annotations

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


def plot_run(metrics_path: Path, out_png: Path, title: str, test_accuracy: dict[int, float] | None = None) -> Path:
    """Loss per step (raw and smoothed) and validation accuracy per eval; test_accuracy maps a
    step to a held-out test accuracy (e.g. before and after training) drawn as markers."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers or in CI
    import matplotlib.pyplot as plt

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
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _mean_loss(row: dict[str, Any]) -> float:
    if "loss" in row:  # first-order rows
        return row["loss"]
    finite = [x for x in row["losses"] if x is not None]
    return sum(finite) / len(finite) if finite else float("nan")
