"""The training-curve PNG is drawn from metrics.jsonl, torn last line included."""
from __future__ import annotations

import json

from runtime_driver.commands.plots import plot_run


def test_plot_run_writes_a_png(tmp_path):
    rows = [{"type": "eval", "step": 0, "split": "validation", "accuracy": 0.7, "loss": 0.6}]
    rows += [{"type": "train", "step": t, "losses": [0.6 - 0.01 * t, 0.61, None, 0.6]} for t in range(10)]
    rows += [{"type": "eval", "step": 10, "split": "validation", "accuracy": 0.8, "loss": 0.5}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"type": "tra')  # killed mid-write
    png = plot_run(metrics, tmp_path / "out" / "curve.png", "test", test_accuracy={0: 0.7, 10: 0.82})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000  # two panels with lines, not an empty canvas
