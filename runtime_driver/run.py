"""A whole training run: resolve inputs, build the engine, train, evaluate, write run/ files.

run/ holds config.json, metrics.jsonl, ckpt/ (if checkpointing), adapter/ (PEFT; a
full-parameter run writes model/, a Hugging Face model folder, instead) and summary.json.
The eager engine builds the PRGEStep from the model folder; the ExecuTorch
engine needs only an export folder (program, manifest, tokenizer) and the data.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from export.contract.manifest import (layout_hash, package_versions, slots_to_json, task_spec, weight_layout_hash,
                                      weight_slots_to_json)
from models.causal_lm import DEFAULT_COMPLETION_LEN, AdapterConfig, build_full_mezo_step, build_step, load_tokenizer
from models.console import say
from models.files import write_json_atomic
from models.model_folder import save_model_folder
from models.peft_io import load_peft_adapter, read_adapter_config, save_peft_adapter
from models.sources.packaged import resolve_model_dir
from models.tasks.folder import Task, load_folder_spec, load_task, resolve_data_dir
from prge.full_mezo import FULL_MEZO_LOSSES, flat_numel, named_weights
from runtime_driver.engines import EagerFullMeZO, EagerPRGE, EagerSequential, Engine, ExecuTorchFullMeZO, ExecuTorchPRGE
from runtime_driver.evaluate import completion_loss, evaluate, generation_metrics
from runtime_driver.failpoints import reached
from runtime_driver.first_order_engine import ExecuTorchFirstOrder
from runtime_driver.replay import FULL_WEIGHTS, INITIAL_BASE_MODEL, INITIAL_ZEROS
from runtime_driver.train import (FirstOrderResume, TrainConfig, first_order_fingerprint, first_order_loop,
                                  first_order_resume_point, resumable_checkpoint, train_first_order, train_zero_order,
                                  zero_order_fingerprint)


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


def eager_engine(model_dir: Path, adapter: AdapterConfig, label_ids: list[int], seq_len: int,
                 method: str = "prge") -> EagerPRGE:
    """The eager engine of a method (first-order runs train its step with autograd)."""
    if method == "mezo-full":
        # Checked before the model loads (FullMeZOStep would refuse it too, later).
        if (adapter.loss or "classification") not in FULL_MEZO_LOSSES:
            raise ValueError(f"--method mezo-full trains label-word tasks; this task's loss is {adapter.loss!r}")
        adapter.num_queries = 1  # recorded as run: MeZO draws one direction a step
        return EagerFullMeZO(build_full_mezo_step(model_dir, label_ids, adapter.loss or "classification"), model_dir, seq_len)
    step = build_step(model_dir, adapter, label_ids)
    return (EagerSequential if method == "mezo" else EagerPRGE)(step, model_dir, adapter, seq_len)


def build_engine(cfg: RunConfig, data_dir: Path) -> tuple[Engine, Task]:
    if cfg.engine == "eager":
        model_dir = resolve_model_dir(cfg.model)
        task = load_task(load_folder_spec(data_dir, cfg.adapter.loss), load_tokenizer(model_dir), data_dir,
                         cfg.adapter.completion_len)
        cfg.adapter.loss = task.spec.loss
        return eager_engine(model_dir, cfg.adapter, task.label_ids, cfg.seq_len, cfg.train.method), task
    if cfg.engine != "executorch":
        raise ValueError(f"unknown engine {cfg.engine!r}")
    if cfg.train.method not in ("prge", "fo", "mezo-full"):
        raise ValueError(f"the executorch engine runs P-RGE, first-order and full-parameter programs; "
                         f"--method {cfg.train.method} is eager-only")
    if not cfg.program:
        raise ValueError("--engine executorch needs --program DIR (the output of `prge export`)")
    if cfg.train.method == "fo":
        if cfg.train.optimizer != "sgd":
            raise ValueError(f"--optimizer {cfg.train.optimizer}: ExecuTorch's training extension has SGD only")
        engine = ExecuTorchFirstOrder(cfg.program)
    elif cfg.train.method == "mezo-full":
        engine = ExecuTorchFullMeZO(cfg.program)
    else:
        engine = ExecuTorchPRGE(cfg.program)
    if cfg.train.batch_size != engine.batch_size:
        raise ValueError(f"--batch {cfg.train.batch_size} differs from the program's batch {engine.batch_size} (fixed at export)")
    return engine, program_task(engine.program_dir, engine.manifest, data_dir)


def program_task(program_dir: Path, manifest: dict[str, Any], data_dir: Path) -> Task:
    """The task exactly as the program was exported for: its template, label ids, tokenizer."""
    return Task(task_spec(manifest), manifest["task"]["label_token_ids"], load_tokenizer(program_dir), data_dir,
                manifest["shapes"].get("completion_len"))


def split_evaluator(engine: Engine, task: Task):
    """split, final -> the held-out metrics of the task's kind: accuracy and loss of the label
    words, or completion loss and perplexity, plus (final) greedy exact match and token F1."""

    def evaluate_split(split, final: bool = False) -> dict[str, float]:
        if not task.is_completion:
            return evaluate(engine.eval_logits, split, engine.eval_batch_size, engine.fixed_eval_batch)
        result = completion_loss(engine, split)
        if final:  # decoding costs up to completion_len forwards per batch: not at every validation
            result.update(generation_metrics(engine, split, task.tokenizer))
        return result

    return evaluate_split


def save_adapter(run_dir: Path, engine: Engine, flat_b: torch.Tensor) -> Path:
    a = engine.adapter
    return save_peft_adapter(
        run_dir / "adapter", engine.slots, flat_b, rank=a.rank, alpha=a.alpha, a_seed=a.a_seed,
        targets=a.targets, base_model=engine.base_model, fan_in_fan_out=engine.model_type == "gpt2",
        on_written=lambda: reached("adapter-tmp-written"),
    )


def run_training(cfg: RunConfig, resume: bool = False, quiet: bool = False, progress=say) -> dict[str, Any]:
    """Train with cfg.engine and cfg.train.method; evaluate on validation during and test after."""
    data_dir = resolve_data_dir(cfg.data, progress=progress)
    engine, task = build_engine(cfg, data_dir)
    t = cfg.train
    # Read and check all data before anything is written: bad input leaves no half-made run.
    splits = {
        "train": task.split("train", engine.seq_len),
        "validation": task.split("validation", engine.seq_len, limit=t.eval_examples),
        "test": task.split("test", engine.seq_len, limit=cfg.test_examples),
    }
    run_dir = Path(cfg.out)
    full = t.method == "mezo-full"
    fingerprint = {"model": engine.base_model, "seq_len": engine.seq_len,
                   "adapter_layout": weight_layout_hash(engine.slots) if full else layout_hash(engine.slots),
                   **({"program_sha256": engine.program_sha256} if engine.program_sha256 else {})}
    # A checkpoint that cannot be resumed fails before anything is written.
    resume_point = FirstOrderResume()
    if resume and t.method == "fo":
        resume_point = first_order_resume_point(t, run_dir, fingerprint)
    elif resume:
        resumable_checkpoint(run_dir, zero_order_fingerprint(t, engine, fingerprint))
    run_dir.mkdir(parents=True, exist_ok=True)
    # The layout lets `prge replay` rebuild the adapter from the log without the model.
    if full:  # replay starts from the base model's weights
        layout = {"kind": FULL_WEIGHTS, "numel": flat_numel(engine.slots), "slots": weight_slots_to_json(engine.slots),
                  "initial": INITIAL_BASE_MODEL, "noise": engine.estimator.noise}
    else:
        layout = {"numel": sum(s.numel for s in engine.slots), "slots": slots_to_json(engine.slots), "initial": INITIAL_ZEROS,
                  **({} if t.method == "fo" else {"noise": engine.estimator.noise})}
    write_json_atomic(run_dir / "config.json", {**asdict(cfg), "data_dir": str(data_dir), "base_model": engine.base_model,
                                                "adapter_layout": layout})

    evaluate_split = split_evaluator(engine, task)
    summary: dict[str, Any] = {"engine": cfg.engine, "method": t.method, "versions": package_versions()}
    if cfg.eval_before and len(splits["test"]) and not resume:
        progress("Evaluating the test split before training ...")
        summary["test_before"] = evaluate_split(splits["test"], final=True)
    evaluator = lambda: evaluate_split(splits["validation"])  # noqa: E731
    if t.method == "fo" and cfg.engine == "executorch":
        if resume_point.adapter is not None:  # the program's SGD has no state of its own
            engine.set_adapter(resume_point.adapter)
        summary.update(first_order_loop(engine.first_order_step, engine.get_adapter, splits["train"], evaluator, t, run_dir,
                                        quiet, resume_point.start, first_order_fingerprint(t, fingerprint)))
    elif t.method == "fo":
        summary.update(train_first_order(engine.step, splits["train"], evaluator, t, run_dir, quiet, resume_point,
                                         first_order_fingerprint(t, fingerprint)))
    else:
        # A completion task has no guessing floor for the divergence check (ln 1 = 0: the baseline alone sets it).
        num_labels = 1 if task.is_completion else len(task.spec.labels)
        summary.update(train_zero_order(engine, splits["train"], evaluator, t, run_dir, num_labels, resume,
                                        fingerprint, quiet))
    if len(splits["test"]):  # --test-examples 0 while tuning: test data stays untouched
        summary["test"] = evaluate_split(splits["test"], final=True)
    summary["truncated_train_texts"] = splits["train"].truncated
    if full:
        save_model_folder(run_dir / "model", named_weights(engine.slots, engine.get_adapter()), engine.base_model)
    else:
        save_adapter(run_dir, engine, engine.get_adapter())
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def evaluate_adapter(model: str | None, data: str | None, split: str, seq_len: int, limit: int | None,
                     adapter_dir: str | None = None, completion_len: int = DEFAULT_COMPLETION_LEN) -> dict[str, float]:
    """The held-out metrics (split_evaluator) of the base model (zero-shot, B = 0) or of a saved
    prge PEFT adapter on a split."""
    model_dir = resolve_model_dir(model)
    data_dir = resolve_data_dir(data)
    task = load_task(load_folder_spec(data_dir), load_tokenizer(model_dir), data_dir, completion_len)
    adapter = AdapterConfig(num_queries=1, loss=task.spec.loss, completion_len=completion_len)
    if adapter_dir:
        peft = read_adapter_config(adapter_dir)
        adapter.rank, adapter.alpha, adapter.targets, adapter.a_seed = peft.rank, peft.alpha, peft.targets, peft.a_seed
    engine = eager_engine(model_dir, adapter, task.label_ids, seq_len)
    if adapter_dir:
        engine.set_adapter(load_peft_adapter(adapter_dir, engine.slots, adapter.rank, adapter.a_seed))
    return split_evaluator(engine, task)(task.split(split, seq_len, limit=limit), final=True)
