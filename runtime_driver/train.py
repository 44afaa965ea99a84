"""The training loops: zeroth-order (P-RGE, MeZO) over any executor, and first-order LoRA-FA.

Zeroth-order step t (the update is folded into the next call):
    losses_t = executor.train_step(batch_t, prev_seed=seed_{t-1}, new_seed=seed_t,
                                   prev_g=g_{t-1}, lr=lr_{t-1}, eps)
    g_t      = (L+ - L-) / (2 eps)
Before an eval, a checkpoint or the end, the pending update is applied with apply_update, so
the adapter evaluated or saved is the true current one.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from prge.estimators import projected_grads, step_seed
from prge.noise import PRNG_VERSION
from prge.schedules import learning_rate
from prge.step import PRGEStep
from runtime_driver.batches import TokenizedSplit, batch_indices
from models.cache import say
from prge.failpoints import reached
from runtime_driver.checkpoint import CheckpointError, find_checkpoint_dir, load_checkpoint, save_checkpoint
from runtime_driver.metrics import MetricsLog

METHODS = ("prge", "mezo", "fo")


@dataclass
class TrainConfig:
    method: str = "prge"  # prge: 2q copies in one forward; mezo: 2q sequential forwards; fo: backprop
    steps: int = 200  # optimizer steps
    batch_size: int = 4  # b: examples per perturbed copy (a P-RGE forward runs 2q*b sequences)
    lr: float = 1e-3  # learning rate (SGD step on B)
    eps: float = 1e-2  # perturbation scale (zeroth-order only)
    schedule: str = "constant"  # lr schedule: constant | linear
    seed: int = 0  # run seed: data order and all noise seeds derive from it
    eval_every: int = 50  # validation eval every N steps (0: only at the end)
    eval_examples: int = 500  # validation examples used by periodic evals
    checkpoint_every: int = 0  # checkpoint every N steps into run/ckpt (0: never)
    optimizer: str = "sgd"  # first-order only: sgd | adam
    max_bad_steps: int = 10  # consecutive faulty steps (non-finite or diverged loss) before training stops
    diverge_factor: float = 10.0  # a step's mean loss above this x the first step's is a fault (0: off)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed by this configuration."""
        keep = ("method", "steps", "batch_size", "lr", "eps", "schedule", "seed", "optimizer")
        return {k: v for k, v in asdict(self).items() if k in keep}


class TrainingDiverged(RuntimeError):
    pass


Evaluator = Callable[[], dict[str, float]]


class _Progress:
    """The tqdm bar, metrics log and periodic evals shared by both loops."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, start_step: int, evaluator: Evaluator, quiet: bool) -> None:
        self.cfg = cfg
        self.evaluator = evaluator
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step)
        self.bar = tqdm(total=cfg.steps, initial=start_step, desc=cfg.method, unit="step", disable=quiet, dynamic_ncols=True)
        self.started = time.perf_counter()
        self.last_accuracy: float | None = None

    def log_step(self, row: dict[str, Any], loss: float) -> None:
        row["time"] = round(time.perf_counter() - self.started, 4)
        self.metrics.write(row)
        postfix = {"loss": f"{loss:.4f}"}
        if self.last_accuracy is not None:
            postfix["val_acc"] = f"{self.last_accuracy:.3f}"
        self.bar.set_postfix(postfix)
        self.bar.update(1)

    def eval_due(self, done_steps: int) -> bool:
        every = self.cfg.eval_every
        return (every > 0 and done_steps % every == 0) or done_steps == self.cfg.steps

    def eval_at_start(self, start_step: int) -> None:
        """A fresh run with periodic evals starts with one at step 0: the zero-shot baseline on
        the same validation examples, so the curve shows what training added."""
        if start_step == 0 and self.cfg.eval_every > 0:
            self.run_eval(0)

    def run_eval(self, done_steps: int) -> dict[str, float]:
        result = self.evaluator()
        self.last_accuracy = result["accuracy"]
        self.metrics.write({"type": "eval", "step": done_steps, "split": "validation", **result})
        return result

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()


def zero_order_fingerprint(cfg: TrainConfig, executor, extra: dict[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint of this run records and a resume must match."""
    return {**cfg.fingerprint(), **(extra or {}), "num_queries": executor.num_queries, "prng": PRNG_VERSION}


def check_resumable(cfg: TrainConfig, run_dir: Path, fingerprint: dict[str, Any]) -> tuple[int, torch.Tensor | None, dict]:
    """(next step, adapter, state) from run_dir/ckpt; (0, None, {}) when no checkpoint was written
    yet (a run killed before its first one simply starts over: that is what resuming means)."""
    if find_checkpoint_dir(run_dir / "ckpt") is None:
        return 0, None, {}
    ckpt = load_checkpoint(run_dir / "ckpt")
    expected = fingerprint
    recorded = ckpt.state.get("fingerprint", {})
    if not isinstance(recorded, dict):
        recorded = {}
    if recorded != expected:
        diff = sorted(k for k in set(expected) | set(recorded) if expected.get(k) != recorded.get(k))
        raise CheckpointError(
            f"{run_dir / 'ckpt'}: checkpoint is from another configuration (differs in {', '.join(diff)})"
        )
    return ckpt.step, ckpt.adapter, ckpt.state


def _loss_fault(losses: torch.Tensor, mean_loss: float, first_loss: float | None, diverge_factor: float) -> str | None:
    """Why a step's losses (mean_loss: their float64 mean) must not update the adapter, or None
    when they are fine."""
    if not math.isfinite(mean_loss):
        return "non-finite loss"
    if bool((losses == losses[0]).all()):
        # Measured: an exploded adapter (lr 1e30) saturates the model into identical finite
        # losses, so g is exactly 0 forever and training would go on silently doing nothing.
        return "degenerate loss (all 2q losses equal: the perturbations change nothing)"
    if diverge_factor > 0 and first_loss is not None and mean_loss > diverge_factor * max(first_loss, 1e-8):
        return f"diverged loss (mean {mean_loss:.4g} > {diverge_factor:g} x first step's {first_loss:.4g})"
    return None


def train_zero_order(
    executor,
    train: TokenizedSplit,
    evaluator: Evaluator,
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool = False,
    extra_fingerprint: dict[str, Any] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run cfg.steps zeroth-order steps with executor; returns a summary dict."""
    fingerprint = zero_order_fingerprint(cfg, executor, extra_fingerprint)
    start, adapter, state = check_resumable(cfg, run_dir, fingerprint) if resume else (0, None, {})
    if resume and adapter is None:
        say(f"{run_dir / 'ckpt'}: no checkpoint yet; starting from step 0")
    if adapter is not None:
        executor.set_adapter(adapter)
    # The divergence baseline is the first step's mean loss, kept in checkpoints so a resumed
    # run judges divergence exactly as the uninterrupted one would.
    first_loss: float | None = state.get("first_loss")
    q = executor.num_queries
    progress = _Progress(cfg, run_dir, start, evaluator, quiet)
    progress.eval_at_start(start)
    prev_seed, prev_g, prev_lr = 0, [0.0] * q, 0.0
    bad_in_a_row, bad_total, step_ms = 0, 0, []
    try:
        for t in range(start, cfg.steps):
            seed = step_seed(cfg.seed, t)
            lr = learning_rate(cfg.schedule, cfg.lr, t, cfg.steps)
            ids, mask, labels = train.rows(batch_indices(len(train), cfg.batch_size, t, cfg.seed))
            began = time.perf_counter()
            losses = executor.train_step(ids, mask, labels, prev_seed, seed, prev_g, prev_lr, cfg.eps)
            step_ms.append((time.perf_counter() - began) * 1000)
            row: dict[str, Any] = {"type": "train", "step": t, "seed": seed, "lr": lr, "eps": cfg.eps}
            mean_loss = float(losses.to(torch.float64).mean())
            fault = _loss_fault(losses, mean_loss, first_loss, cfg.diverge_factor)
            if first_loss is None and fault is None:
                first_loss = mean_loss
            if fault is None:
                g = projected_grads(losses.to(torch.float64), cfg.eps).tolist()
                bad_in_a_row = 0
            else:  # a numerical fault: skip this step's update rather than poison B
                g = [0.0] * q
                bad_in_a_row, bad_total = bad_in_a_row + 1, bad_total + 1
                row["fault"] = fault
            losses_list = [x if math.isfinite(x) else None for x in losses.tolist()]
            row.update(g=g, losses=losses_list, step_ms=round(step_ms[-1], 3))
            finite = [x for x in losses_list if x is not None]
            progress.log_step(row, sum(finite) / len(finite) if finite else float("nan"))
            if bad_in_a_row >= cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"{bad_in_a_row} steps in a row had a {fault} (last at step {t}); "
                    f"lower --lr or --eps. The last checkpoint ({run_dir / 'ckpt'}) is intact."
                )
            reached("after-step", t)
            prev_seed, prev_g, prev_lr = seed, g, lr
            done = t + 1
            ckpt_due = cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0
            if progress.eval_due(done) or ckpt_due or done == cfg.steps:
                executor.apply_update(prev_seed, prev_g, prev_lr)
                prev_g = [0.0] * q
            if progress.eval_due(done):
                progress.run_eval(done)
            # No checkpoint during a fault streak: the last one stays the last good state.
            if (ckpt_due or (cfg.checkpoint_every > 0 and done == cfg.steps)) and bad_in_a_row == 0:
                state = {
                    "step": done,
                    "next_seed": step_seed(cfg.seed, done),
                    "data_position": done * cfg.batch_size,
                    "first_loss": first_loss,
                    "fingerprint": fingerprint,
                }
                save_checkpoint(run_dir / "ckpt", executor.get_adapter(), state)
    finally:
        progress.close()
    return {
        "steps_run": cfg.steps - start,
        "bad_steps": bad_total,
        "median_step_ms": float(torch.tensor(step_ms).median()) if step_ms else None,
        "last_validation_accuracy": progress.last_accuracy,
        "wall_s": time.perf_counter() - progress.started,
    }


def train_first_order(
    step: PRGEStep,
    train: TokenizedSplit,
    evaluator: Evaluator,
    cfg: TrainConfig,
    run_dir: Path,
    quiet: bool = False,
) -> dict[str, Any]:
    """First-order LoRA-FA (autograd on B only): the accuracy reference for the ZO methods."""
    params = [layer.lora_B for layer in step.adapter_layers]
    for p in params:
        p.requires_grad_(True)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr)
    elif cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=cfg.lr)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected sgd or adam")
    progress = _Progress(cfg, run_dir, 0, evaluator, quiet)
    with torch.no_grad():
        progress.eval_at_start(0)
    step_ms = []
    try:
        for t in range(cfg.steps):
            lr = learning_rate(cfg.schedule, cfg.lr, t, cfg.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ids, mask, labels = train.rows(batch_indices(len(train), cfg.batch_size, t, cfg.seed))
            began = time.perf_counter()
            loss = step.per_example_loss(ids, mask, labels).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_ms.append((time.perf_counter() - began) * 1000)
            progress.log_step({"type": "train", "step": t, "lr": lr, "loss": loss.item(), "step_ms": round(step_ms[-1], 3)}, loss.item())
            if progress.eval_due(t + 1):
                with torch.no_grad():
                    progress.run_eval(t + 1)
    finally:
        for p in params:
            p.requires_grad_(False)
        progress.close()
    return {
        "steps_run": cfg.steps,
        "median_step_ms": float(torch.tensor(step_ms).median()) if step_ms else None,
        "last_validation_accuracy": progress.last_accuracy,
        "wall_s": time.perf_counter() - progress.started,
    }
