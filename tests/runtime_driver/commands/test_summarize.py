"""`prge summarize`: the accuracy table comes from the runs' own files, row by row."""
from __future__ import annotations

import json
import shutil

from models.causal_lm import AdapterConfig
from runtime_driver.commands import summarize as summarize_module
from runtime_driver.commands.cli import main
from runtime_driver.run import RunConfig, run_training
from runtime_driver.train import TrainConfig


def test_table_rows_are_the_runs_files(tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch):
    model = str(tiny_model_dir("llama"))
    runs = {}
    for method, lr in (("prge", 0.05), ("fo", 1e-2)):
        train = TrainConfig(method=method, steps=3, batch_size=2, lr=lr, eval_every=3, eval_examples=8, optimizer="adam")
        runs[method] = tmp_path / f"bench-{method}"
        run_training(RunConfig(model=model, data=str(tiny_data_dir), out=str(runs[method]), seq_len=16, test_examples=8,
                               adapter=AdapterConfig(num_queries=2, rank=4), train=train), quiet=True, progress=lambda _: None)
    assert main(["eval", "--model", model, "--data", str(tiny_data_dir), "--seq-len", "16", "--limit", "8"]) == 0
    zero_shot = tmp_path / "zero-shot-test.json"
    zero_shot.write_text(capsys.readouterr().out)

    assert main(["summarize", str(zero_shot), str(runs["prge"]), str(runs["fo"])]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"run", "zero-shot-test", "bench-prge", "bench-fo"}
    zs = json.loads(zero_shot.read_text())
    assert f"| {zs['accuracy']:.3f} | {zs['loss']:.3f} |" in rows["zero-shot-test"]
    for method, run in runs.items():
        summary = json.loads((run / "summary.json").read_text())
        assert f"| {summary['test']['accuracy']:.3f} | {summary['test']['loss']:.3f} |" in rows[run.name]
    assert "P-RGE (q=2" in rows["bench-prge"] and "| 0.05 | 0.01 |" in rows["bench-prge"]
    assert "first-order LoRA-FA (Adam)" in rows["bench-fo"] and "| 0.01 | - |" in rows["bench-fo"]
    curves = [line for line in table if line.startswith("- `bench-")]
    assert len(curves) == 2 and all("0: " in line and "3: " in line for line in curves)
    assert "transformers" in table[-1] and "peft" in table[-1]  # the versions the runs recorded

    # --plot draws the runs' validation curves against forward rows: P-RGE runs 2q*b = 8 rows a
    # step, first order b = 2 (and backward); the zero-shot row has no curve.
    png = tmp_path / "curves.png"
    assert main(["summarize", str(zero_shot), str(runs["prge"]), str(runs["fo"]), "--plot", str(png)]) == 0
    assert capsys.readouterr().out.endswith(f"Curves: {png}\n") and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = []
    monkeypatch.setattr(summarize_module, "plot_validation_curves", lambda curves, *_: drawn.extend(curves))
    assert main(["summarize", str(zero_shot), str(runs["prge"]), str(runs["fo"]), "--plot", str(png)]) == 0
    capsys.readouterr()
    assert [(c.label, c.x) for c in drawn] == [("bench-prge (lr 0.05)", [0, 24]), ("bench-fo (lr 0.01)", [0, 6])]
    evals = [json.loads(line) for line in (runs["prge"] / "metrics.jsonl").read_text().splitlines()]
    assert drawn[0].loss == [r["loss"] for r in evals if r.get("type") == "eval"]

    # Runs of the same name from two folders (two arms of a study) are told apart by their folders.
    shutil.copytree(runs["prge"], tmp_path / "other-arm" / runs["prge"].name)
    assert main(["summarize", str(runs["prge"]), str(tmp_path / "other-arm" / runs["prge"].name)]) == 0
    names = [line.split(" | ")[0].lstrip("| ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert names[1:] == [f"{tmp_path.name}/bench-prge", "other-arm/bench-prge"]


def test_a_run_without_a_test_split_is_refused(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "tuning"
    train = TrainConfig(steps=1, batch_size=2, eval_every=0, eval_examples=4)
    run_training(RunConfig(model=str(tiny_model_dir("llama")), data=str(tiny_data_dir), out=str(run), seq_len=16,
                           test_examples=0, adapter=AdapterConfig(num_queries=2, rank=4), train=train), quiet=True,
                 progress=lambda _: None)
    assert main(["summarize", str(run)]) == 2
    assert "evaluated no test split" in capsys.readouterr().err
