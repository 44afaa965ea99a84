"""The training loops: zeroth-order (P-RGE, MeZO) over any engine, and first-order LoRA-FA.

Zeroth-order step t (the update is folded into the next call):
    losses_t = engine.train_step(batch_t, prev_seed=seed_{t-1}, new_seed=seed_t,
                                 prev_g=g_{t-1}, lr=lr_{t-1}, eps)
    g_t      = judge(losses_t): (L+ - L-) / (2 eps), or zeros on a fault   (judge.py)
The update of the last step stays pending (PendingUpdate) until the next train_step applies
it; before an eval, a checkpoint or the end it is flushed alone, so the adapter evaluated or
saved is the true current one. The native driver runs the same loop in the same pieces
(android_harness/src/train_loop.cpp).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from models.console import say
from models.tasks.batches import TokenizedSplit, batch_indices
from prge.estimators import step_seed
from prge.schedules import learning_rate
from prge.step import PRGEStep
from runtime_driver.checkpoint import (OPTIMIZER_FILE, Checkpoint, CheckpointError, find_checkpoint_dir, load_checkpoint,
                                      save_checkpoint)
from runtime_driver.engines import Engine
from runtime_driver.failpoints import reached
from runtime_driver.judge import StepJudge
from runtime_driver.metrics import MetricsLog

METHODS = ("prge", "mezo", "fo", "mezo-full")


# Quantized bases train with a larger eps by default: rounding activations per token adds a
# jitter to every loss difference, and its share of g grows as 1/eps; the noise-floor study
# (BENCHMARKS.md, "A quantized frozen base") found g closest to float32's slope at 1e-1.
QUANTIZED_EPS = 1e-1


@dataclass
class TrainConfig:
    method: str = "prge"  # prge: 2q copies in one forward; mezo: 2q sequential forwards; fo: backprop;
    # mezo-full: MeZO on every weight (no adapter), + and - rows in one forward
    steps: int = 200  # optimizer steps
    batch_size: int = 4  # b: examples per perturbed copy (a P-RGE forward runs 2q*b sequences)
    lr: float = 1e-3  # learning rate (SGD step on B)
    eps: float = 1e-2  # perturbation scale (zeroth-order only); default_eps() for a quantized base
    schedule: str = "constant"  # lr schedule: constant | linear
    seed: int = 0  # run seed: data order and all noise seeds derive from it
    eval_every: int = 50  # validation eval every N steps (0: only at the end)
    eval_examples: int = 500  # validation examples used by periodic evals
    checkpoint_every: int = 0  # checkpoint every N steps into run/ckpt (0: never)
    optimizer: str = "sgd"  # first-order only: sgd | adam
    max_bad_steps: int = 10  # consecutive faulty steps (non-finite, degenerate or diverged losses) before training stops
    diverge_factor: float = 10.0  # a step's mean loss above this x the baseline is a fault (0: off; judge.py)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed by this configuration."""
        keep = ("method", "steps", "batch_size", "lr", "eps", "schedule", "seed", "optimizer")
        return {k: v for k, v in asdict(self).items() if k in keep}


def default_eps(scheme: str) -> float:
    """The eps a base quantized with `scheme` (models/quantize.py) trains with by default."""
    return TrainConfig.eps if scheme == "none" else QUANTIZED_EPS


class TrainingDiverged(RuntimeError):
    pass


Evaluator = Callable[[], dict[str, float]]


@dataclass(frozen=True)
class Due:
    """What happens after a step, when `done` steps are done."""

    eval: bool
    checkpoint: bool  # if the judge is not in a fault streak (the last checkpoint stays the last good state)

    @property
    def flush(self) -> bool:  # the pending update must be in the adapter before an eval or a checkpoint
        return self.eval or self.checkpoint


def due_after(done: int, cfg: TrainConfig) -> Due:
    """Periodic evals and checkpoints, plus both at the end (when they are on at all: the final
    eval always, a final checkpoint only when checkpointing)."""
    last = done == cfg.steps
    return Due(
        eval=(cfg.eval_every > 0 and done % cfg.eval_every == 0) or last,
        checkpoint=cfg.checkpoint_every > 0 and (done % cfg.checkpoint_every == 0 or last),
    )


@dataclass
class PendingUpdate:
    """The last step's update, not yet in the adapter: the next train_step folds it in, or
    flush applies it alone."""

    num_queries: int
    seed: int = 0
    lr: float = 0.0
    g: list[float] = field(init=False)  # zeros: nothing pending

    def __post_init__(self) -> None:
        self.g = [0.0] * self.num_queries

    def set(self, seed: int, g: list[float], lr: float) -> None:
        self.seed, self.g, self.lr = seed, g, lr

    def flush(self, engine: Engine) -> None:
        engine.apply_update(self.seed, self.g, self.lr)
        self.g = [0.0] * self.num_queries  # applied: the next train_step must not apply it again


class _Progress:
    """The tqdm bar, metrics log and periodic evals shared by both loops."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, start_step: int, evaluator: Evaluator, quiet: bool) -> None:
        self.cfg = cfg
        self.evaluator = evaluator
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step)
        self.bar = tqdm(total=cfg.steps, initial=start_step, desc=cfg.method, unit="step", disable=quiet, dynamic_ncols=True)
        self.started = time.perf_counter()
        self.last_accuracy: float | None = None
        self.last_validation: dict[str, float] = {}
        self.step_ms: list[float] = []

    def log_step(self, row: dict[str, Any], loss: float) -> None:
        row["time"] = round(time.perf_counter() - self.started, 4)
        self.metrics.write(row)
        postfix = {"loss": f"{loss:.4f}"}
        if self.last_accuracy is not None:
            postfix["val_acc"] = f"{self.last_accuracy:.3f}"
        elif "loss" in self.last_validation:  # a completion task: no accuracy until it decodes
            postfix["val_loss"] = f"{self.last_validation['loss']:.4f}"
        self.bar.set_postfix(postfix)
        self.bar.update(1)

    def eval_at_start(self, start_step: int) -> None:
        """A fresh run with periodic evals starts with one at step 0: the zero-shot baseline on
        the same validation examples, so the curve shows what training added."""
        if start_step == 0 and self.cfg.eval_every > 0:
            self.run_eval(0)

    def run_eval(self, done_steps: int) -> dict[str, float]:
        result = self.evaluator()
        self.last_validation = result
        self.last_accuracy = result.get("accuracy")
        self.metrics.write({"type": "eval", "step": done_steps, "split": "validation", **result})
        return result

    def summary(self, steps_run: int) -> dict[str, Any]:
        return {
            "steps_run": steps_run,
            "median_step_ms": float(torch.tensor(self.step_ms).median()) if self.step_ms else None,
            "last_validation_accuracy": self.last_accuracy,
            **({"last_validation_loss": self.last_validation["loss"]} if self.last_accuracy is None and self.last_validation else {}),
            "wall_s": time.perf_counter() - self.started,
        }

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()


def zero_order_fingerprint(cfg: TrainConfig, engine: Engine, extra: dict[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint of this run records and a resume must match."""
    return {**cfg.fingerprint(), **(extra or {}), "num_queries": engine.num_queries,
            "estimator": engine.estimator.name, "prng": engine.estimator.prng_version}


def resumable_checkpoint(run_dir: Path, fingerprint: dict[str, Any]) -> Checkpoint | None:
    """run_dir/ckpt, checked to be of this configuration; None when no checkpoint was written yet
    (a run killed before its first one simply starts over: that is what resuming means)."""
    if find_checkpoint_dir(run_dir / "ckpt") is None:
        return None
    ckpt = load_checkpoint(run_dir / "ckpt")
    recorded = ckpt.state.get("fingerprint", {})
    if not isinstance(recorded, dict):
        recorded = {}
    if recorded != fingerprint:
        diff = sorted(k for k in set(fingerprint) | set(recorded) if fingerprint.get(k) != recorded.get(k))
        raise CheckpointError(
            f"{run_dir / 'ckpt'}: checkpoint is from another configuration (differs in {', '.join(diff)})"
        )
    return ckpt


def train_zero_order(
    engine: Engine,
    train: TokenizedSplit,
    evaluator: Evaluator,
    cfg: TrainConfig,
    run_dir: Path,
    num_labels: int,
    resume: bool = False,
    extra_fingerprint: dict[str, Any] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run cfg.steps zeroth-order steps with engine; returns a summary dict."""
    fingerprint = zero_order_fingerprint(cfg, engine, extra_fingerprint)
    ckpt = resumable_checkpoint(run_dir, fingerprint) if resume else None
    if resume and ckpt is None:
        say(f"{run_dir / 'ckpt'}: no checkpoint yet; starting from step 0")
    start = ckpt.step if ckpt else 0
    if ckpt:
        engine.set_adapter(ckpt.adapter)
    judge = StepJudge(cfg.eps, engine.estimator.normalize, cfg.diverge_factor, num_labels, cfg.max_bad_steps,
                      baseline_losses=list(ckpt.state.get("baseline_losses", [])) if ckpt else [])
    pending = PendingUpdate(engine.num_queries)
    progress = _Progress(cfg, run_dir, start, evaluator, quiet)
    progress.eval_at_start(start)
    try:
        for t in range(start, cfg.steps):
            seed = step_seed(cfg.seed, t)
            lr = learning_rate(cfg.schedule, cfg.lr, t, cfg.steps)
            ids, mask, labels = train.rows(batch_indices(len(train), cfg.batch_size, t, cfg.seed))
            began = time.perf_counter()
            losses = engine.train_step(ids, mask, labels, pending.seed, seed, pending.g, pending.lr, cfg.eps)
            progress.step_ms.append((time.perf_counter() - began) * 1000)
            verdict = judge.judge(losses)
            row: dict[str, Any] = {"type": "train", "step": t, "seed": seed, "lr": lr, "eps": cfg.eps}
            if verdict.fault:
                row["fault"] = verdict.fault
            row.update(g=verdict.g, losses=verdict.losses, step_ms=round(progress.step_ms[-1], 3))
            finite = [x for x in verdict.losses if x is not None]
            progress.log_step(row, sum(finite) / len(finite) if finite else math.nan)
            if judge.must_stop:
                raise TrainingDiverged(
                    f"{judge.bad_in_a_row} steps in a row had a {verdict.fault} (last at step {t}); "
                    f"lower --lr or --eps. The last checkpoint ({run_dir / 'ckpt'}) is intact."
                )
            reached("after-step", t)
            pending.set(seed, verdict.g, lr)
            done = t + 1
            due = due_after(done, cfg)
            if due.flush:
                pending.flush(engine)
            if due.eval:
                progress.run_eval(done)
            if due.checkpoint and judge.bad_in_a_row == 0:
                state = {"step": done, "next_seed": step_seed(cfg.seed, done), "data_position": done * cfg.batch_size,
                         **judge.state(), "fingerprint": fingerprint}
                save_checkpoint(run_dir / "ckpt", engine.get_adapter(), state)
    finally:
        progress.close()
    return {**progress.summary(cfg.steps - start), "bad_steps": judge.bad_total}


# ---- first order ---------------------------------------------------------------------------
def first_order_step(step: PRGEStep, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, labels: torch.Tensor, micro_batch: int | None = None) -> float:
    """One optimizer step on B of the batch's mean loss, its gradient accumulated over pieces of
    at most micro_batch rows (the memory-lean way a user would run backprop); returns the loss."""
    rows = input_ids.shape[0]
    size = micro_batch or rows
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for start in range(0, rows, size):
        piece = slice(start, start + size)
        loss = step.per_example_loss(input_ids[piece], attention_mask[piece], labels[piece]).sum() / rows
        loss.backward()
        total += loss.item()
    optimizer.step()
    return total


def enable_activation_checkpointing(step: PRGEStep) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (Hugging Face's checkpointing; non-reentrant, so it needs no inputs that require grad). HF
    checkpoints only modules in training mode; prge's layers have no dropout, so the numbers
    are the same as in eval mode."""
    step.body.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    step.train()


# The named state tensors each optimizer keeps per parameter (torch.optim's names): what a
# first-order checkpoint must hold beside B for a resumed run to take the same steps.
OPTIMIZER_STATE = {"sgd": (), "adam": ("step", "exp_avg", "exp_avg_sq")}


def first_order_optimizer(step: PRGEStep, name: str, lr: float) -> torch.optim.Optimizer:
    """SGD or Adam on every adapter's B, which it makes trainable (requires_grad)."""
    params = [layer.lora_B for layer in step.adapter_layers]
    for p in params:
        p.requires_grad_(True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; expected sgd or adam")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's state as flat named tensors, "{parameter index}.{name}" (Adam: step,
    exp_avg, exp_avg_sq of every B; SGD: none). The optimizer's own tensors, not copies: the
    checkpoint serializes them at once."""
    return {f"{index}.{name}": value
            for index, per_param in optimizer.state_dict()["state"].items() for name, value in per_param.items()}


def restore_optimizer(optimizer: torch.optim.Optimizer, name: str, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Put optimizer_tensors' output back, after checking it is the state of this optimizer over
    these parameters (anything else is a CheckpointError naming the file)."""
    params = optimizer.param_groups[0]["params"]
    expected = {f"{i}.{n}" for i in range(len(params)) for n in OPTIMIZER_STATE[name]}
    if set(tensors) != expected:
        wrong = sorted(set(tensors) ^ expected)[:3]
        raise CheckpointError(f"{where}: not the {name} state of this adapter's {len(params)} B matrices (keys {wrong} ...)")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, field_name = key.split(".", 1)
        shape = () if field_name == "step" else tuple(params[int(index)].shape)
        if tuple(value.shape) != shape or value.dtype != torch.float32:
            raise CheckpointError(f"{where}: {key} is {value.dtype} {list(value.shape)}, expected float32 {list(shape)}")
        state.setdefault(int(index), {})[field_name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


@dataclass(frozen=True)
class FirstOrderResume:
    """Where a first-order run goes on from: its next step, and B and the optimizer's state when a
    checkpoint holds them (None: from the start)."""

    start: int = 0
    adapter: torch.Tensor | None = None
    optimizer: dict[str, torch.Tensor] | None = None


def train_first_order(
    step: PRGEStep,
    train: TokenizedSplit,
    evaluator: Evaluator,
    cfg: TrainConfig,
    run_dir: Path,
    quiet: bool = False,
    resume: FirstOrderResume = FirstOrderResume(),
    fingerprint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """First-order LoRA-FA (autograd on B only): the accuracy reference for the ZO methods.
    resume: first_order_resume_point's when resuming."""
    if resume.adapter is not None:  # before B requires grad: a plain in-place write
        with torch.no_grad():
            step.set_adapter(resume.adapter)
    optimizer = first_order_optimizer(step, cfg.optimizer, cfg.lr)
    if resume.optimizer is not None:
        restore_optimizer(optimizer, cfg.optimizer, resume.optimizer, run_dir / "ckpt" / OPTIMIZER_FILE)

    def take_step(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, lr: float) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr
        return first_order_step(step, optimizer, ids, mask, labels)

    try:
        return first_order_loop(take_step, lambda: step.flat_adapter().detach().clone(), train, evaluator, cfg, run_dir,
                                quiet, resume.start, fingerprint, lambda: optimizer_tensors(optimizer))
    finally:
        for layer in step.adapter_layers:
            layer.lora_B.requires_grad_(False)


def first_order_fingerprint(cfg: TrainConfig, extra: dict[str, Any] | None) -> dict[str, Any]:
    """What a first-order checkpoint records and a resume must match."""
    return {**cfg.fingerprint(), **(extra or {})}


def first_order_resume_point(cfg: TrainConfig, run_dir: Path, extra: dict[str, Any] | None) -> FirstOrderResume:
    """Where a first-order run's checkpoint lets it go on (from the start when there is none yet,
    said so). SGD's whole state is B; an optimizer with state (Adam) needs its tensors too."""
    ckpt = resumable_checkpoint(run_dir, first_order_fingerprint(cfg, extra))
    if ckpt is None:
        say(f"{run_dir / 'ckpt'}: no checkpoint yet; starting from step 0")
        return FirstOrderResume()
    if OPTIMIZER_STATE[cfg.optimizer] and ckpt.optimizer is None:
        raise CheckpointError(f"{run_dir / 'ckpt'}: no {cfg.optimizer} state beside the adapter; cannot resume exactly")
    return FirstOrderResume(ckpt.step, ckpt.adapter, ckpt.optimizer if OPTIMIZER_STATE[cfg.optimizer] else None)


def first_order_loop(
    take_step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], float],
    get_adapter: Callable[[], torch.Tensor],
    train: TokenizedSplit,
    evaluator: Evaluator,
    cfg: TrainConfig,
    run_dir: Path,
    quiet: bool = False,
    start: int = 0,
    fingerprint: dict[str, Any] | None = None,
    get_optimizer_state: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Steps start..cfg.steps-1 of a first-order run, each take_step(ids, mask, labels, lr) -> loss
    (the eager optimizer, or an ExecuTorch first-order program's SGD), with the same batches,
    schedule, metrics and evals as every other method. B, the optimizer's state
    (get_optimizer_state: Adam's moments; SGD has none) and the step are the whole state (the
    data order is a function of the step): a checkpoint holds them, and a resumed run (start, B
    and the optimizer's state from first_order_resume_point, set by the caller) takes the same
    steps as an uninterrupted one. fingerprint: first_order_fingerprint, recorded in each checkpoint."""
    progress = _Progress(cfg, run_dir, start, evaluator, quiet)
    with torch.no_grad():
        progress.eval_at_start(start)
    try:
        for t in range(start, cfg.steps):
            lr = learning_rate(cfg.schedule, cfg.lr, t, cfg.steps)
            ids, mask, labels = train.rows(batch_indices(len(train), cfg.batch_size, t, cfg.seed))
            began = time.perf_counter()
            loss = take_step(ids, mask, labels, lr)
            progress.step_ms.append((time.perf_counter() - began) * 1000)
            progress.log_step({"type": "train", "step": t, "lr": lr, "loss": loss, "step_ms": round(progress.step_ms[-1], 3)}, loss)
            reached("after-step", t)
            due = due_after(t + 1, cfg)
            if due.eval:
                with torch.no_grad():
                    progress.run_eval(t + 1)
            if due.checkpoint:
                save_checkpoint(run_dir / "ckpt", get_adapter(),
                                {"step": t + 1, "data_position": (t + 1) * cfg.batch_size, "fingerprint": fingerprint or {}},
                                get_optimizer_state() if get_optimizer_state else {})
    finally:
        progress.close()
    return progress.summary(cfg.steps - start)
