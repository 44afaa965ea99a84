"""A real numerical blow-up through the ExecuTorch program (not a mocked loss): the faulty steps
are logged with g = 0, training stops with a clear message, and the last good checkpoint is
intact and still replays from the log."""
from __future__ import annotations

from runtime_driver.checkpoint import load_checkpoint
from runtime_driver.commands.cli import main
from runtime_driver.metrics import read_metrics
from runtime_driver.replay import replay_run


def test_exploding_lr_stops_training_with_last_good_checkpoint(tiny_program, tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--engine", "executorch", "--program", str(tiny_program("llama")), "--data", str(tiny_data_dir),
                 "--out", str(run), "--steps", "10", "--batch", "2", "--lr", "1e30", "--seed", "2",
                 "--checkpoint-every", "1", "--max-bad-steps", "3", "--eval-every", "0", "--test-examples", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "3 steps in a row had a" in err and "lower --lr or --eps" in err and "Traceback" not in err
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "fault" not in rows[0] and all(r["fault"] and r["g"] == [0.0, 0.0] for r in rows[1:])
    # Step 0 was healthy (checkpoint after it); no checkpoint was taken during the fault streak.
    assert load_checkpoint(run / "ckpt").step == 1
    result = replay_run(run)
    assert result.compared["ckpt"] == {"step": 1, "identical": True, "max_abs_diff": 0.0}
    assert not (run / "adapter").exists()  # no final adapter from a failed run
