"""A whole training run: resolve inputs, build the engine, train, evaluate, write run/ files.

run/ holds config.json, metrics.jsonl, ckpt/ (if checkpointing), adapter/ (PEFT) and
summary.json. The eager engine builds the PRGEStep from the model folder; the ExecuTorch
engine needs only an export folder (program, manifest, tokenizer) and the data.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from models.cache import say
from export.manifest import slots_from_json, slots_to_json
from models.causal_lm import AdapterConfig, build_step, load_tokenizer
from models.peft_io import load_peft_adapter, save_peft_adapter
from prge.step import AdapterSlot
from runtime_driver.batches import TokenizedSplit
from runtime_driver.data import TaskSpec
from runtime_driver.evaluate import evaluate
from runtime_driver.executors import EagerPRGE, EagerSequential
from runtime_driver.replay import INITIAL_ZEROS
from runtime_driver.train import TrainConfig, check_resumable, train_first_order, train_zero_order, zero_order_fingerprint
from runtime_driver.workspace import Task, load_task, resolve_data_dir, resolve_model_dir

EVAL_BATCH = 16  # rows per eager eval forward


@dataclass
class RunConfig:
    model: str | None = None  # HF model folder, eager engine (None: the default model)
    program: str | None = None  # export folder, executorch engine
    data: str | None = None  # task folder (None: the default movie-review task)
    out: str = "runs/train"  # run directory
    engine: str = "eager"  # eager | executorch
    seq_len: int = 64  # prompt length in tokens, eager engine (the program fixes its own)
    test_examples: int | None = None  # cap on test examples in the final eval (None: all, 0: none)
    eval_before: bool = False  # also evaluate the test split before training (zero-shot)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class Engine:
    """What a run needs from an engine, whichever it is."""

    executor: Any  # EagerPRGE / EagerSequential / ExecuTorchPRGE (None for first-order)
    eval_logits: Callable
    eval_batch_size: int
    fixed_eval_batch: bool
    task: Task
    seq_len: int
    slots: tuple[AdapterSlot, ...]
    adapter: AdapterConfig  # rank, alpha, targets, a_seed as used
    base_model: str
    model_type: str
    step: Any = None  # the eager PRGEStep (first-order training needs it)
    program_sha256: str | None = None  # the .pte's, executorch engine: checkpoints are tied to it


def _eager_engine(cfg: RunConfig, data_dir: Path) -> Engine:
    model_dir = resolve_model_dir(cfg.model)
    task = load_task(model_dir, data_dir, cfg.adapter.loss)
    cfg.adapter.loss = task.spec.loss
    step = build_step(model_dir, cfg.adapter, task.label_ids)
    executor = {"prge": EagerPRGE, "mezo": EagerSequential}.get(cfg.train.method, lambda s: None)(step)

    def eval_logits(ids, mask):
        with torch.no_grad():
            return step.eval_logits(ids, mask)

    return Engine(executor, eval_logits, EVAL_BATCH, False, task, cfg.seq_len, step.slots, cfg.adapter,
                  str(model_dir.resolve()), step.body.backbone.config.model_type, step)


def _executorch_engine(cfg: RunConfig, data_dir: Path) -> Engine:
    from runtime_driver.executorch_engine import ExecuTorchPRGE

    if cfg.train.method != "prge":
        raise ValueError(f"the executorch engine runs P-RGE programs; --method {cfg.train.method} is eager-only")
    if not cfg.program:
        raise ValueError("--engine executorch needs --program DIR (the output of `prge export`)")
    executor = ExecuTorchPRGE(cfg.program)
    m = executor.manifest
    if cfg.train.batch_size != executor.batch_size:
        raise ValueError(f"--batch {cfg.train.batch_size} differs from the program's batch {executor.batch_size} (fixed at export)")
    task = program_task(executor.program_dir, m, data_dir)
    return Engine(executor, executor.eval_logits, executor.eval_batch_size, True, task, executor.seq_len,
                  slots_from_json(m["adapter"]["slots"]), program_adapter_config(m), m["model"]["path"],
                  m["model"]["model_type"], program_sha256=m["program"]["pte"]["sha256"])


def _layout_hash(slots: tuple[AdapterSlot, ...]) -> str:
    """Identifies the adapter layout (modules, shapes, A streams): a checkpoint's flat B only
    means something in the layout it was trained in."""
    return hashlib.sha256(json.dumps(slots_to_json(slots)).encode()).hexdigest()[:16]


def program_task(program_dir: Path, manifest: dict[str, Any], data_dir: Path) -> Task:
    """The task exactly as the program was exported for: its template, label ids, tokenizer."""
    t = manifest["task"]
    spec = TaskSpec(t["template"], dict(zip(t["labels"], t["label_words"])), t["loss"])
    return Task(spec, t["label_token_ids"], load_tokenizer(program_dir), data_dir)


def program_adapter_config(manifest: dict[str, Any]) -> AdapterConfig:
    a = manifest["adapter"]
    return AdapterConfig(num_queries=int(manifest["num_queries"]), rank=a["rank"], alpha=a["alpha"], targets=a["targets"],
                         loss=manifest["task"]["loss"], a_seed=a["a_seed"], adapted=[s["name"] for s in a["slots"]],
                         micro_batch=manifest["shapes"].get("micro_batch"))


def build_engine(cfg: RunConfig, data_dir: Path) -> Engine:
    if cfg.engine == "eager":
        return _eager_engine(cfg, data_dir)
    if cfg.engine == "executorch":
        return _executorch_engine(cfg, data_dir)
    raise ValueError(f"unknown engine {cfg.engine!r}")


def save_adapter(run_dir: Path, engine: Engine, flat_b: torch.Tensor) -> Path:
    a = engine.adapter
    return save_peft_adapter(
        run_dir / "adapter", engine.slots, flat_b, rank=a.rank, alpha=a.alpha, a_seed=a.a_seed,
        targets=a.targets, base_model=engine.base_model, fan_in_fan_out=engine.model_type == "gpt2",
    )


def run_training(cfg: RunConfig, resume: bool = False, quiet: bool = False, progress=say) -> dict[str, Any]:
    """Train with cfg.engine and cfg.train.method; evaluate on validation during and test after."""
    data_dir = resolve_data_dir(cfg.data, progress=progress)
    engine = build_engine(cfg, data_dir)
    task, t = engine.task, cfg.train
    # Read and check all data before anything is written: bad input leaves no half-made run.
    splits = {
        "train": task.split("train", engine.seq_len),
        "validation": task.split("validation", engine.seq_len, limit=t.eval_examples),
        "test": task.split("test", engine.seq_len, limit=cfg.test_examples),
    }
    run_dir = Path(cfg.out)
    fingerprint = {"model": engine.base_model, "seq_len": engine.seq_len, "adapter_layout": _layout_hash(engine.slots),
                   **({"program_sha256": engine.program_sha256} if engine.program_sha256 else {})}
    if resume and t.method != "fo":  # a checkpoint that cannot be resumed fails before anything is written
        check_resumable(t, run_dir, zero_order_fingerprint(t, engine.executor, fingerprint))
    run_dir.mkdir(parents=True, exist_ok=True)
    # The layout lets `prge replay` rebuild the adapter from the log without the model.
    layout = {"numel": sum(s.numel for s in engine.slots), "slots": slots_to_json(engine.slots), "initial": INITIAL_ZEROS}
    write_json_atomic(run_dir / "config.json", {**asdict(cfg), "data_dir": str(data_dir), "base_model": engine.base_model,
                                                "adapter_layout": layout})

    def evaluate_split(split: TokenizedSplit) -> dict[str, float]:
        return evaluate(engine.eval_logits, split, engine.eval_batch_size, engine.fixed_eval_batch)

    summary: dict[str, Any] = {"engine": cfg.engine, "method": t.method}
    if cfg.eval_before and len(splits["test"]) and not resume:
        progress("Evaluating the test split before training ...")
        summary["test_before"] = evaluate_split(splits["test"])
    evaluator = lambda: evaluate_split(splits["validation"])  # noqa: E731
    if t.method == "fo":
        if engine.step is None:
            raise ValueError("first-order training is eager-only")
        summary.update(train_first_order(engine.step, splits["train"], evaluator, t, run_dir, quiet=quiet))
        flat_b = engine.step.get_adapter()
    else:
        summary.update(train_zero_order(engine.executor, splits["train"], evaluator, t, run_dir, resume, fingerprint, quiet))
        flat_b = engine.executor.get_adapter()
    if len(splits["test"]):  # --test-examples 0 while tuning: test data stays untouched
        summary["test"] = evaluate_split(splits["test"])
    summary["truncated_train_texts"] = splits["train"].truncated
    save_adapter(run_dir, engine, flat_b)
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def evaluate_eager(
    model: str | None, data: str | None, split: str, seq_len: int, limit: int | None, adapter_dir: str | None = None
) -> dict[str, float]:
    """Accuracy on a split of the base model (zero-shot, B = 0) or of a saved prge PEFT adapter."""
    model_dir = resolve_model_dir(model)
    task = load_task(model_dir, resolve_data_dir(data))
    adapter = AdapterConfig(num_queries=1, loss=task.spec.loss)
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
