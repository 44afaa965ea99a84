"""First-order LoRA-FA through ExecuTorch's training extension (`prge export --first-order`,
`prge train --engine executorch --method fo`) against eager first-order SGD: same batches,
same numbers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.contract.manifest import MANIFEST_FILE, ManifestError
from export.contract.methods import ExportShapes
from models.causal_lm import AdapterConfig, ModelError
from models.peft_io import load_peft_adapter
from models.tasks.folder import load_folder_spec
from runtime_driver.checkpoint import OPTIMIZER_FILE, CheckpointError
from runtime_driver.first_order_engine import ExecuTorchFirstOrder
from runtime_driver.run import RunConfig, run_training
from runtime_driver.train import TrainConfig, first_order_optimizer, first_order_step

BATCH = 4
SEQ_LEN = 16  # the tiny batches' prompt length (tests/conftest.py)


@pytest.fixture(scope="module")
def fo_program(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    from runtime_driver.commands.cli import main

    out = tmp_path_factory.mktemp("fo") / "program"
    assert main(["export", "--first-order", "--model", str(tiny_model_dir("llama")), "--data", str(tiny_data_dir),
                 "--batch", str(BATCH), "--seq-len", str(SEQ_LEN), "--rank", "4", "--out", str(out)]) == 0
    return out


def test_steps_match_eager_sgd(fo_program, tiny_step, tiny_batch, randomize_adapter):
    """Loss, logits and the adapter after each SGD step agree with torch autograd + torch.optim.SGD
    from the same random start (B = 0 would hide a misplaced slot)."""
    engine = ExecuTorchFirstOrder(fo_program)
    assert engine.manifest["delegation"]["first_order_step"]["delegated_nodes"] > 0  # XNNPACK runs the linears
    step = tiny_step(q=1)
    start = randomize_adapter(step, seed=3)
    engine.set_adapter(start)
    assert torch.equal(engine.get_adapter(), start)
    optimizer = first_order_optimizer(step, "sgd", 0.5)
    for k in range(4):
        ids, mask, labels = tiny_batch(BATCH, seed=k)
        with torch.no_grad():
            eager_logits = step.eval_logits(ids, mask)
        torch.testing.assert_close(engine.eval_logits(ids, mask), eager_logits, rtol=1e-5, atol=1e-5)
        et_loss = engine.first_order_step(ids, mask, labels, lr=0.5)
        eager_loss = first_order_step(step, optimizer, ids, mask, labels)
        assert et_loss == pytest.approx(eager_loss, rel=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(engine.get_adapter(), step.flat_adapter(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(engine.get_adapter(), start)  # the steps moved B


def _run(tmp_path: Path, name: str, tiny_data_dir, resume: bool = False, checkpoint_every: int = 0, **run) -> dict:
    train = TrainConfig(method="fo", steps=6, batch_size=BATCH, lr=0.3, optimizer="sgd", eval_every=3, eval_examples=8,
                        checkpoint_every=checkpoint_every)
    cfg = RunConfig(data=str(tiny_data_dir), out=str(tmp_path / name), seq_len=SEQ_LEN, test_examples=8,
                    adapter=AdapterConfig(rank=4), train=train, **run)
    return run_training(cfg, resume=resume, quiet=True)


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def test_a_run_matches_the_eager_run(fo_program, tiny_model_dir, tiny_data_dir, tmp_path):
    """`prge train --engine executorch --method fo` and the eager first-order SGD run of the same
    settings take the same steps, evaluate the same and write the same PEFT adapter."""
    et = _run(tmp_path, "et", tiny_data_dir, engine="executorch", program=str(fo_program))
    eager = _run(tmp_path, "eager", tiny_data_dir, engine="eager", model=str(tiny_model_dir("llama")))
    assert et["engine"] == "executorch" and et["method"] == "fo"
    assert _losses(tmp_path / "et") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-5)
    assert len(_losses(tmp_path / "et")) == 6
    assert et["test"]["accuracy"] == eager["test"]["accuracy"]
    assert et["test"]["loss"] == pytest.approx(eager["test"]["loss"], rel=1e-5)
    engine = ExecuTorchFirstOrder(fo_program)
    adapters = [load_peft_adapter(tmp_path / run / "adapter", engine.slots, 4, engine.adapter.a_seed) for run in ("et", "eager")]
    torch.testing.assert_close(adapters[0], adapters[1], rtol=1e-5, atol=1e-6)
    assert adapters[0].abs().max() > 0
    from runtime_driver.commands.summarize import describe

    assert describe(tmp_path / "et")["method"] == "first-order LoRA-FA (SGD, ExecuTorch training extension)"
    assert describe(tmp_path / "eager")["method"] == "first-order LoRA-FA (SGD)"


def test_an_interrupted_run_resumes_to_the_same_adapter(fo_program, tiny_data_dir, tmp_path, stop_after_step):
    """Stopped after step 4 with a checkpoint at step 3, then `--resume`: the same losses from
    step 3 on and the same adapter, bit for bit, as a run never stopped (SGD: B and the step are
    the whole state)."""
    program = {"engine": "executorch", "program": str(fo_program)}
    _run(tmp_path, "whole", tiny_data_dir, **program)

    with stop_after_step(4):
        _run(tmp_path, "resumed", tiny_data_dir, checkpoint_every=3, **program)
    _run(tmp_path, "resumed", tiny_data_dir, resume=True, checkpoint_every=3, **program)
    assert _losses(tmp_path / "resumed")[3:] == _losses(tmp_path / "whole")[3:]
    assert len(_losses(tmp_path / "resumed")) == 6  # the steps after the checkpoint are logged once
    engine = ExecuTorchFirstOrder(fo_program)
    whole, resumed = (load_peft_adapter(tmp_path / run / "adapter", engine.slots, 4, engine.adapter.a_seed)
                      for run in ("whole", "resumed"))
    assert torch.equal(whole, resumed)
    assert not (tmp_path / "resumed" / "ckpt" / OPTIMIZER_FILE).exists()  # SGD: B is the whole state


def _adam_run(tmp_path, name, tiny_model_dir, tiny_data_dir, **train):
    cfg = RunConfig(model=str(tiny_model_dir("llama")), data=str(tiny_data_dir), out=str(tmp_path / name), seq_len=SEQ_LEN,
                    test_examples=8, adapter=AdapterConfig(rank=4),
                    train=TrainConfig(method="fo", optimizer="adam", steps=6, batch_size=BATCH, lr=3e-2, eval_every=3,
                                      eval_examples=8, checkpoint_every=3))
    return run_training(cfg, **train, quiet=True)


def test_an_interrupted_adam_run_resumes_to_the_same_adapter(tiny_model_dir, tiny_data_dir, tmp_path, stop_after_step):
    """Eager first order with Adam (the study's first-order arm): its checkpoint holds Adam's
    moments and step count beside B, so a run stopped after step 4 and resumed from its step-3
    checkpoint takes the same steps, bit for bit, as one never stopped. Without the moments the
    resumed steps would differ (Adam's first step after a reset is lr * sign(grad))."""
    _adam_run(tmp_path, "whole", tiny_model_dir, tiny_data_dir)
    with stop_after_step(4):
        _adam_run(tmp_path, "resumed", tiny_model_dir, tiny_data_dir)
    saved = load_file(str(tmp_path / "resumed" / "ckpt" / OPTIMIZER_FILE))
    assert saved["0.step"].item() == 3 and saved["0.exp_avg_sq"].abs().max() > 0
    _adam_run(tmp_path, "resumed", tiny_model_dir, tiny_data_dir, resume=True)
    assert _losses(tmp_path / "resumed")[3:] == _losses(tmp_path / "whole")[3:]
    assert len(_losses(tmp_path / "resumed")) == 6
    whole, resumed = (load_file(str(tmp_path / run / "ckpt" / "adapter.safetensors"))["adapter"] for run in ("whole", "resumed"))
    assert torch.equal(whole, resumed) and whole.abs().max() > 0


def test_an_adam_checkpoint_without_its_moments_is_refused(tiny_model_dir, tiny_data_dir, tmp_path, stop_after_step):
    """A checkpoint whose optimizer file is missing, unreadable or not this adapter's Adam state
    is refused, naming the file, before any step: the run's log is left as it was."""
    with stop_after_step(4):
        _adam_run(tmp_path, "run", tiny_model_dir, tiny_data_dir)
    ckpt = tmp_path / "run" / "ckpt"
    moments = load_file(str(ckpt / OPTIMIZER_FILE))
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    (ckpt / OPTIMIZER_FILE).unlink()
    with pytest.raises(CheckpointError, match="no adam state"):
        _adam_run(tmp_path, "run", tiny_model_dir, tiny_data_dir, resume=True)
    save_file({k: v for k, v in moments.items() if k != "0.exp_avg"}, str(ckpt / OPTIMIZER_FILE))
    with pytest.raises(CheckpointError, match=f"{OPTIMIZER_FILE}: not the adam state"):
        _adam_run(tmp_path, "run", tiny_model_dir, tiny_data_dir, resume=True)
    save_file({**moments, "0.exp_avg": moments["0.exp_avg"][:1]}, str(ckpt / OPTIMIZER_FILE))
    with pytest.raises(CheckpointError, match="0.exp_avg is"):
        _adam_run(tmp_path, "run", tiny_model_dir, tiny_data_dir, resume=True)
    (ckpt / OPTIMIZER_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="unreadable optimizer state"):
        _adam_run(tmp_path, "run", tiny_model_dir, tiny_data_dir, resume=True)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_bench_times_it_beside_a_prge_program(fo_program, tiny_program, tmp_path, capsys):
    """`prge bench --programs` takes a first-order program: its whole step (forward, backward,
    SGD) beside P-RGE's train_step, and its peak RSS in a worker of its own."""
    from runtime_driver.commands.cli import main

    out = tmp_path / "bench.json"
    prge = tiny_program()
    assert main(["bench", "--programs", str(prge), str(fo_program), "--reps", "2", "--threads", "1", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["programs"][str(fo_program)]
    assert row["method"] == "first-order (SGD)" and row["rows_per_step"] == BATCH
    assert row["train_step_ms"] > 0 and row["peak_rss_train_step_mb"] > 0
    assert row["eval_logits_ms"] is None and row["step_overhead"] is None  # no plain forward in the program
    assert f"| {fo_program} | first-order (SGD) | {BATCH} | none | - |" in capsys.readouterr().out


def test_refused_inputs(fo_program, tiny_program, tiny_model_dir, tiny_completion_data_dir, tiny_data_dir, tmp_path):
    from export.first_order import export_first_order

    with pytest.raises(ModelError, match="classification"):  # before any tracing
        export_first_order(tiny_model_dir("llama"), load_folder_spec(tiny_completion_data_dir), AdapterConfig(rank=4),
                           ExportShapes(BATCH, SEQ_LEN, BATCH), tmp_path / "never", progress=lambda _: None)
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="SGD only"):
        train = TrainConfig(method="fo", optimizer="adam", batch_size=BATCH, steps=1)
        run_training(RunConfig(data=str(tiny_data_dir), out=str(tmp_path / "adam"), engine="executorch",
                               program=str(fo_program), train=train), quiet=True)
    with pytest.raises(ManifestError, match="prge export --first-order"):  # a P-RGE program is not a first-order one
        ExecuTorchFirstOrder(tiny_program())
    with pytest.raises(ManifestError, match="train_step"):  # nor the other way round
        train = TrainConfig(method="prge", batch_size=BATCH, steps=1)
        run_training(RunConfig(data=str(tiny_data_dir), out=str(tmp_path / "prge"), engine="executorch",
                               program=str(fo_program), train=train), quiet=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in fo_program.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((bad / MANIFEST_FILE).read_text())
    manifest["parameters"] = manifest["parameters"][:-1]
    (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="parameters"):
        ExecuTorchFirstOrder(bad)
