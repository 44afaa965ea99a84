"""A whole training run: resolve inputs, build the engine, train, evaluate, write run/ files."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.causal_lm import AdapterConfig, build_step
from models.peft_io import load_peft_adapter, save_peft_adapter
from prge.step import PRGEStep
from runtime_driver.batches import TokenizedSplit
from runtime_driver.evaluate import evaluate
from runtime_driver.executors import EagerPRGE, EagerSequential
from runtime_driver.train import TrainConfig, train_first_order, train_zero_order
from runtime_driver.workspace import Task, load_task, resolve_data_dir, resolve_model_dir

EVAL_BATCH = 16  # rows per eager eval forward


@dataclass
class RunConfig:
    model: str | None = None  # HF model folder (None: the default model)
    data: str | None = None  # task folder (None: the default movie-review task)
    out: str = "runs/train"  # run directory
    engine: str = "eager"  # eager | executorch
    seq_len: int = 64  # prompt length in tokens (left-padded / truncated)
    test_examples: int | None = None  # cap on test examples in the final eval (None: all)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def eager_evaluator(step: PRGEStep, split: TokenizedSplit):
    def run() -> dict[str, float]:
        with torch.no_grad():
            return evaluate(step.eval_logits, split, EVAL_BATCH, fixed_batch=False)

    return run


def save_adapter(run_dir: Path, step: PRGEStep, flat_b: torch.Tensor, adapter: AdapterConfig, model_dir: Path) -> Path:
    model_type = step.body.backbone.config.model_type
    return save_peft_adapter(
        run_dir / "adapter",
        step.slots,
        flat_b,
        rank=adapter.rank,
        alpha=adapter.alpha,
        a_seed=adapter.a_seed,
        targets=adapter.targets,
        base_model=str(model_dir.resolve()),
        fan_in_fan_out=model_type == "gpt2",
    )


def run_eager_training(cfg: RunConfig, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train with the eager engine (prge, mezo or fo) and evaluate on validation and test."""
    model_dir = resolve_model_dir(cfg.model)
    data_dir = resolve_data_dir(cfg.data)
    task = load_task(model_dir, data_dir, cfg.adapter.loss)
    cfg.adapter.loss = task.spec.loss
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    step = build_step(model_dir, cfg.adapter, task.label_ids)
    splits = _splits(task, cfg)
    write_json_atomic(run_dir / "config.json", {**asdict(cfg), "model_dir": str(model_dir), "data_dir": str(data_dir)})
    evaluator = eager_evaluator(step, splits["validation"])
    t = cfg.train
    if t.method == "fo":
        summary = train_first_order(step, splits["train"], evaluator, t, run_dir, quiet=quiet)
    else:
        executor = EagerPRGE(step) if t.method == "prge" else EagerSequential(step)
        summary = train_zero_order(executor, splits["train"], evaluator, t, run_dir, resume=resume, quiet=quiet)
    if len(splits["test"]):  # --test-examples 0 while tuning: test data stays untouched
        with torch.no_grad():
            summary["test"] = evaluate(step.eval_logits, splits["test"], EVAL_BATCH, fixed_batch=False)
    summary["truncated_train_texts"] = splits["train"].truncated
    save_adapter(run_dir, step, step.get_adapter(), cfg.adapter, model_dir)
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def _splits(task: Task, cfg: RunConfig) -> dict[str, TokenizedSplit]:
    return {
        "train": task.split("train", cfg.seq_len),
        "validation": task.split("validation", cfg.seq_len, limit=cfg.train.eval_examples),
        "test": task.split("test", cfg.seq_len, limit=cfg.test_examples),
    }


def evaluate_eager(
    model: str | None, data: str | None, split: str, seq_len: int, limit: int | None, adapter_dir: str | None = None
) -> dict[str, float]:
    """Accuracy on a split of the base model (zero-shot, B = 0) or of a saved prge PEFT adapter."""
    model_dir = resolve_model_dir(model)
    task = load_task(model_dir, resolve_data_dir(data))
    adapter = AdapterConfig(num_queries=1)
    if adapter_dir:
        peft_config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        adapter.rank, adapter.alpha = peft_config["r"], peft_config["lora_alpha"]
        adapter.targets = peft_config["target_modules"]
        adapter.a_seed = peft_config.get("prge", {}).get("a_seed", adapter.a_seed)
    step = build_step(model_dir, adapter, task.label_ids)
    if adapter_dir:
        step.set_adapter(load_peft_adapter(adapter_dir, step.slots, adapter.rank, adapter.a_seed))
    with torch.no_grad():
        return evaluate(step.eval_logits, task.split(split, seq_len, limit=limit), EVAL_BATCH, fixed_batch=False)
