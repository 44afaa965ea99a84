"""The training loops on the tiny model and task: metrics, resume, faults, baselines, run files, CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from models.causal_lm import AdapterConfig, load_tokenizer
from models.peft_io import load_peft_adapter, save_peft_adapter
from models.tasks.folder import load_folder_spec, load_task
from prge.estimators import step_seed
from runtime_driver.checkpoint import CheckpointError, load_checkpoint
from runtime_driver.commands.cli import main
from runtime_driver.engines import EagerPRGE, EagerSequential
from runtime_driver.evaluate import evaluate
from runtime_driver.metrics import read_metrics
from runtime_driver.run import RunConfig, eager_engine, run_training
from runtime_driver.train import TrainConfig, TrainingDiverged, train_first_order, train_zero_order

SEQ_LEN = 16
Q = 2


def eager_evaluator(step, split):
    """Validation accuracy/loss of the step's current (clean) adapter."""

    def run() -> dict[str, float]:
        with torch.no_grad():
            return evaluate(step.eval_logits, split, 16, fixed_batch=False)

    return run


@pytest.fixture(scope="module")
def task(tiny_model_dir, tiny_data_dir):
    return load_task(load_folder_spec(tiny_data_dir), load_tokenizer(tiny_model_dir("llama")), tiny_data_dir)


@pytest.fixture(scope="module")
def splits(task):
    return {name: task.split(name, SEQ_LEN) for name in ("train", "validation", "test")}


@pytest.fixture
def make_engine(tiny_model_dir, task):
    """A fresh eager engine over the llama PRGEStep (B = 0), as a new process would build it."""

    def make(q: int = Q, method: str = "prge"):
        return eager_engine(tiny_model_dir("llama"), AdapterConfig(num_queries=q, rank=4), task.label_ids, SEQ_LEN, method)

    return make


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, lr=0.05, eps=1e-2, eval_every=3, eval_examples=24, seed=3)
    return TrainConfig(**{**base, **kw})


def _zo(engine, splits, cfg, run_dir, resume=False):
    step = engine.step if hasattr(engine, "step") else engine.inner.step
    return train_zero_order(
        engine, splits["train"], eager_evaluator(step, splits["validation"]), cfg, run_dir, num_labels=2, resume=resume,
        quiet=True,
    )


def _train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("type") == "train"]


def _deterministic(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("time", "step_ms")}


class Wrapped:
    """An engine that delegates to an EagerPRGE, records the adapter each train_step starts
    from, and can fail or return non-finite losses at chosen steps (identified by seed)."""

    def __init__(self, engine: EagerPRGE, cfg: TrainConfig, crash_at=(), nan_at=(), inf_at=(), blowup_at=()) -> None:
        self.inner = engine
        self.num_queries = self.inner.num_queries
        self.step_of_seed = {step_seed(cfg.seed, t): t for t in range(cfg.steps)}
        self.crash_at, self.nan_at, self.inf_at = set(crash_at), set(nan_at), set(inf_at)
        self.blowup_at = set(blowup_at)  # steps whose losses come back 1000x larger (finite)
        self.start_adapter: dict[int, torch.Tensor] = {}

    def train_step(self, input_ids, attention_mask, labels, prev_seed, new_seed, prev_g, lr, eps):
        t = self.step_of_seed[new_seed]
        if t in self.crash_at:
            raise RuntimeError(f"simulated crash at step {t}")
        self.start_adapter[t] = self.inner.get_adapter()
        losses = self.inner.train_step(input_ids, attention_mask, labels, prev_seed, new_seed, prev_g, lr, eps)
        if t in self.nan_at:
            losses = torch.full_like(losses, float("nan"))
        if t in self.inf_at:
            losses = losses.clone()
            losses[1] = float("inf")
        if t in self.blowup_at:
            losses = losses * 1000.0
        return losses

    def __getattr__(self, name):  # apply_update, eval_logits, get_adapter, set_adapter
        return getattr(self.inner, name)


# ---- metrics -------------------------------------------------------------------------------
def test_metrics_rows(make_engine, splits, tmp_path):
    cfg = _cfg()
    summary = _zo(make_engine(), splits, cfg, tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in rows if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(cfg.steps))
    for t, r in enumerate(train):
        assert {"step", "seed", "g", "losses", "lr", "eps", "step_ms", "time"} <= set(r)
        assert r["seed"] == step_seed(cfg.seed, t)
        assert len(r["g"]) == Q and len(r["losses"]) == 2 * Q
        assert all(isinstance(x, float) for x in r["g"] + r["losses"])
        assert r["lr"] == cfg.lr and r["eps"] == cfg.eps and "fault" not in r
        # g is recomputable from the logged losses
        for i in range(Q):
            assert r["g"][i] == pytest.approx((r["losses"][i] - r["losses"][Q + i]) / (2 * cfg.eps), rel=1e-6)
    evals = [r for r in rows if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]  # step 0: the zero-shot baseline
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["split"] == "validation" for r in evals)
    assert summary["steps_run"] == cfg.steps and summary["bad_steps"] == 0
    assert summary["last_validation_accuracy"] == evals[-1]["accuracy"]


# ---- checkpoints and resume ----------------------------------------------------------------
@pytest.fixture
def uninterrupted(make_engine, splits, tmp_path):
    """An 8-step run with a checkpoint every 4 steps, run to completion."""
    cfg = _cfg(steps=8, checkpoint_every=4, eval_every=4)
    engine = make_engine()
    _zo(engine, splits, cfg, tmp_path / "A")
    return cfg, tmp_path / "A", engine.get_adapter()


def test_resume_equals_uninterrupted(uninterrupted, make_engine, splits, tmp_path):
    cfg, dir_a, final_a = uninterrupted
    dir_b = tmp_path / "B"
    crashing = Wrapped(make_engine(), cfg, crash_at={6})
    with pytest.raises(RuntimeError, match="simulated crash"):
        _zo(crashing, splits, cfg, dir_b)
    assert load_checkpoint(dir_b / "ckpt").step == 4
    assert [r["step"] for r in _train_rows(dir_b)] == list(range(6))  # 4 and 5 will be redone

    resumed = make_engine()  # a new process: fresh model, B = 0 until the checkpoint is loaded
    summary = _zo(resumed, splits, cfg, dir_b, resume=True)
    assert summary["steps_run"] == 4
    assert torch.equal(resumed.get_adapter(), final_a)
    assert not torch.equal(final_a, torch.zeros_like(final_a))
    rows_a, rows_b = _train_rows(dir_a), _train_rows(dir_b)
    assert [r["step"] for r in rows_b] == list(range(cfg.steps))
    assert [_deterministic(r) for r in rows_b] == [_deterministic(r) for r in rows_a]
    ckpt_a, ckpt_b = load_checkpoint(dir_a / "ckpt"), load_checkpoint(dir_b / "ckpt")
    assert ckpt_a.step == ckpt_b.step == cfg.steps
    assert torch.equal(ckpt_a.adapter, ckpt_b.adapter) and torch.equal(ckpt_b.adapter, final_a)


def test_resume_keeps_eval_rows(uninterrupted, make_engine, splits, tmp_path):
    cfg, dir_a, _ = uninterrupted
    dir_b = tmp_path / "B"
    crashing = Wrapped(make_engine(), cfg, crash_at={6})
    with pytest.raises(RuntimeError):
        _zo(crashing, splits, cfg, dir_b)
    _zo(make_engine(), splits, cfg, dir_b, resume=True)
    evals = lambda d: [(r["step"], r["accuracy"]) for r in read_metrics(d / "metrics.jsonl") if r["type"] == "eval"]  # noqa: E731
    assert [step for step, _ in evals(dir_a)] == [0, 4, 8]
    assert evals(dir_b) == evals(dir_a)


def test_resume_with_other_config_is_refused(uninterrupted, make_engine, splits):
    cfg, dir_a, _ = uninterrupted
    metrics_before = (dir_a / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=r"differs in lr\b"):
        _zo(make_engine(), splits, _cfg(steps=8, checkpoint_every=4, eval_every=4, lr=0.1), dir_a, resume=True)
    with pytest.raises(CheckpointError, match=r"differs in num_queries\b"):
        _zo(make_engine(q=3), splits, cfg, dir_a, resume=True)
    assert (dir_a / "metrics.jsonl").read_text() == metrics_before


def test_resume_without_checkpoint_starts_over(uninterrupted, make_engine, splits, tmp_path):
    # A run killed before its first checkpoint: resuming runs it from step 0, over its old log.
    cfg, _, final_a = uninterrupted
    run_dir = tmp_path / "C"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"type": "train", "step": 0}\n{"type": "tr')
    engine = make_engine()
    _zo(engine, splits, cfg, run_dir, resume=True)
    assert torch.equal(engine.get_adapter(), final_a)
    assert [r["step"] for r in _train_rows(run_dir)] == list(range(cfg.steps))


# ---- non-finite losses ---------------------------------------------------------------------
def test_non_finite_steps_are_skipped(make_engine, splits, tmp_path):
    cfg = _cfg(steps=6, eval_every=0)
    ex = Wrapped(make_engine(), cfg, nan_at={2}, inf_at={3})
    summary = _zo(ex, splits, cfg, tmp_path)
    rows = _train_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(6))
    for r in rows:
        if r["step"] in (2, 3):
            assert r["fault"] == "non-finite loss" and r["g"] == [0.0] * Q
        else:
            assert "fault" not in r and all(x is not None for x in r["losses"])
    assert rows[2]["losses"] == [None] * (2 * Q)
    assert rows[3]["losses"][1] is None and all(isinstance(x, float) for i, x in enumerate(rows[3]["losses"]) if i != 1)
    assert summary["bad_steps"] == 2
    s = ex.start_adapter  # s[t]: the adapter train_step t started from (before its folded update)
    assert not torch.equal(s[3], s[2])  # step 2 applied step 1's update
    assert torch.equal(s[4], s[3]) and torch.equal(s[5], s[4])  # steps 2 and 3 changed nothing
    assert not torch.equal(ex.get_adapter(), s[5])


def test_diverged_run_stops_with_checkpoint_intact(make_engine, splits, tmp_path):
    cfg = _cfg(steps=12, checkpoint_every=4, eval_every=0, max_bad_steps=3)
    ex = Wrapped(make_engine(), cfg, nan_at=set(range(5, 12)))
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        _zo(ex, splits, cfg, tmp_path)
    assert [r["step"] for r in _train_rows(tmp_path)] == list(range(8))
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.step == 4 and ckpt.state["next_seed"] == step_seed(cfg.seed, 4)
    # The checkpoint is the adapter after 4 steps, which step 4 started from (no pending update).
    assert torch.equal(ckpt.adapter, ex.start_adapter[4])
    assert not torch.equal(ckpt.adapter, torch.zeros_like(ckpt.adapter))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")) == []


def test_diverging_loss_stops_with_checkpoint_intact(make_engine, splits, tmp_path):
    cfg = _cfg(steps=12, checkpoint_every=4, eval_every=0, max_bad_steps=3)
    ex = Wrapped(make_engine(), cfg, blowup_at={5, 6, 7, 8})
    with pytest.raises(TrainingDiverged, match="3 steps in a row had a diverged loss"):
        _zo(ex, splits, cfg, tmp_path)
    rows = _train_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(8))
    assert all("diverged loss" in r["fault"] and r["g"] == [0.0] * Q for r in rows[5:])
    assert all("fault" not in r for r in rows[:5])
    assert torch.equal(load_checkpoint(tmp_path / "ckpt").adapter, ex.start_adapter[4])


def test_single_loss_spike_is_skipped_not_fatal(make_engine, splits, tmp_path):
    cfg = _cfg(steps=6, eval_every=0, max_bad_steps=3)
    ex = Wrapped(make_engine(), cfg, blowup_at={2})
    summary = _zo(ex, splits, cfg, tmp_path)
    assert summary["bad_steps"] == 1 and summary["steps_run"] == 6
    assert torch.equal(ex.start_adapter[4], ex.start_adapter[3])  # step 2's update was skipped


# ---- baselines -----------------------------------------------------------------------------
def test_mezo_engine_matches_prge(make_engine, splits, tmp_path):
    cfg = _cfg(steps=5, eval_every=0)
    prge, mezo = make_engine(), make_engine(method="mezo")
    assert type(prge) is EagerPRGE and type(mezo) is EagerSequential
    _zo(prge, splits, cfg, tmp_path / "prge")
    _zo(mezo, splits, cfg, tmp_path / "mezo")
    a, b = prge.get_adapter(), mezo.get_adapter()
    assert float(a.abs().max()) > 1e-3
    assert float((a - b).norm() / a.norm()) < 1e-5


def test_first_order_lowers_training_loss(make_engine, splits, tmp_path):
    train = splits["train"]
    step = make_engine().step

    def loss() -> float:
        with torch.no_grad():
            return float(step.per_example_loss(train.input_ids, train.attention_mask, train.labels).mean())

    before = loss()
    cfg = _cfg(method="fo", steps=30, lr=3e-2, optimizer="adam", eval_every=0)
    summary = train_first_order(step, train, eager_evaluator(step, splits["validation"]), cfg, tmp_path, quiet=True)
    after = loss()
    assert after < before - 0.1, (before, after)
    assert summary["steps_run"] == 30
    assert not any(layer.lora_B.requires_grad for layer in step.adapter_layers)
    rows = _train_rows(tmp_path)
    assert len(rows) == 30 and all("loss" in r for r in rows)


# ---- a whole run and its PEFT adapter ------------------------------------------------------
def _last_position_logits(model, ids, mask, label_ids):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1, label_ids]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_run_writes_files_and_a_peft_adapter(family, tiny_model_dir, tiny_data_dir, tiny_step, tiny_batch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, run_dir = tiny_model_dir(family), tmp_path / "run"
    cfg = RunConfig(
        model=str(model_dir), data=str(tiny_data_dir), out=str(run_dir), seq_len=SEQ_LEN,
        adapter=AdapterConfig(num_queries=Q, rank=4),
        train=_cfg(steps=3, lr=0.5, eval_every=0, checkpoint_every=3),
    )
    summary = run_training(cfg, quiet=True)
    for name in ("config.json", "metrics.jsonl", "summary.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["steps"] == 3 and config["model"] == str(model_dir)
    peft_config = json.loads((run_dir / "adapter/adapter_config.json").read_text())
    assert peft_config["fan_in_fan_out"] == (family == "gpt2") and peft_config["r"] == 4

    step = tiny_step(family, q=Q, rank=4)
    flat = load_peft_adapter(run_dir / "adapter", step.slots, rank=4, a_seed=step_a_seed(step))
    assert torch.equal(flat, load_checkpoint(run_dir / "ckpt").adapter)  # the trained adapter, exactly
    step.set_adapter(flat)

    ids, mask, _ = tiny_batch(4, family=family)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    label_ids = step.label_token_ids
    base_logits = _last_position_logits(base, ids, mask, label_ids)
    peft_model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    peft_logits = _last_position_logits(peft_model, ids, mask, label_ids)
    with torch.no_grad():
        ours = step.eval_logits(ids, mask)
    torch.testing.assert_close(peft_logits, ours, atol=1e-5, rtol=0)
    assert float((peft_logits - base_logits).abs().max()) > 1e-3  # the adapter is not a no-op


def step_a_seed(step) -> int:
    seeds = {layer.a_seed for layer in step.adapter_layers}
    assert len(seeds) == 1
    return seeds.pop()


def test_peft_adapter_round_trip(tiny_step, randomize_adapter, tmp_path):
    step = tiny_step(q=1, rank=4)
    flat = randomize_adapter(step, seed=11)
    a_seed = step_a_seed(step)
    save_peft_adapter(tmp_path / "adapter", step.slots, flat, rank=4, alpha=16.0, a_seed=a_seed,
                      targets=["q_proj", "v_proj"], base_model="tiny")
    assert torch.equal(load_peft_adapter(tmp_path / "adapter", step.slots, rank=4, a_seed=a_seed), flat)


# ---- the CLI -------------------------------------------------------------------------------
def _cli_train(model_dir, data_dir, out, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
            "--steps", "3", "--batch", "2", "--q", "2", "--rank", "4", "--seq-len", str(SEQ_LEN),
            "--eval-every", "0", "--eval-examples", "8", "--test-examples", "8", *extra]


def test_cli_train(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    assert main(_cli_train(tiny_model_dir(), tiny_data_dir, tmp_path / "run")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps_run"] == 3
    assert len(_train_rows(tmp_path / "run")) == 3
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()


def test_cli_bad_target(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    code = main(_cli_train(tiny_model_dir(), tiny_data_dir, tmp_path / "run", "--targets", "nonexistent"))
    err = capsys.readouterr().err
    assert code == 2
    assert "error" in err and "'nonexistent'" in err and "q_proj" in err
    assert "Traceback" not in err


def test_cli_bad_label(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    lines = (data / "train.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"text": "the movie was fine .", "label": "neutral"})
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    code = main(_cli_train(tiny_model_dir(), data, tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data / 'train.jsonl'}:3:" in err and "neutral" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written for bad input
