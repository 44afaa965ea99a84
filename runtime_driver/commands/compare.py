"""`prge compare`: the ExecuTorch program against the eager reference, same seeds and data.

Two comparisons, because g = (L+ - L-) / (2 eps) turns a 1e-7 loss rounding difference into
~1e-5 in g, so engines left to run free drift apart slowly however correct both are:
  * teacher forcing: both engines are fed the eager engine's g sequence. Losses must agree
    per step and copy, and the final adapters within 1e-5 relative.
  * free running: each engine feeds back its own g; final adapters and held-out accuracy are
    reported side by side (statistical agreement, not equality); a completion task reports its
    held-out loss.
A full-parameter MeZO program (`prge export --mezo-full`) is compared the same way, its weights
(from the base model's) in place of the adapter.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from export.contract.manifest import FULL_MEZO, ManifestError, model_weights_hash, program_kind, read_manifest
from models.causal_lm import build_full_mezo_step, build_step
from models.tasks.batches import batch_indices
from prge.estimators import projected_grads, step_seed
from runtime_driver.engines import (EagerFullMeZO, EagerPRGE, ExecuTorchFullMeZO, ExecuTorchPRGE,
                                    program_adapter_config)
from runtime_driver.run import program_task, split_evaluator

TEACHER_FORCED_REL_TOL = 1e-5


def _relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(a.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def _engines(model_dir: Path, program_dir: Path) -> tuple[EagerPRGE, ExecuTorchPRGE]:
    """The program's engine and its eager twin, built from the settings the manifest records."""
    m = read_manifest(program_dir)
    if model_weights_hash(model_dir) != m["model"]["weights_sha256"]:
        raise ManifestError(f"{program_dir}: exported from other weights than {model_dir}")
    if program_kind(m) == FULL_MEZO:
        et = ExecuTorchFullMeZO(program_dir)
        step = build_full_mezo_step(model_dir, m["task"]["label_token_ids"], m["task"]["loss"])
        return EagerFullMeZO(step, model_dir, et.seq_len), et
    et = ExecuTorchPRGE(program_dir)
    adapter = program_adapter_config(m)
    quantization = m["model"].get("quantization") or {}
    if adapter.quantize != "none" and "embedding" not in quantization:
        # Quantized programs from before int8 embeddings: today's eager twin would not match them.
        raise ManifestError(f"{program_dir}: a {adapter.quantize} program exported by an older prge (float32 "
                            "embedding); export it again to compare it")
    step = build_step(model_dir, adapter, m["task"]["label_token_ids"], rewrites=m["model"].get("rewrites", True))
    return EagerPRGE(step, model_dir, adapter, et.seq_len), et


def compare_engines(
    model_dir: Path, program_dir: Path, data_dir: Path, steps: int, lr: float, eps: float, seed: int = 0,
    eval_examples: int = 64,
) -> dict[str, Any]:
    eager, et = _engines(model_dir, program_dir)
    m = et.manifest
    initial = eager.get_adapter()  # B = 0, or a full-parameter program's base weights
    task = program_task(et.program_dir, m, data_dir)
    train = task.split("train", et.seq_len)
    held_out = task.split("validation", et.seq_len, limit=eval_examples)
    q = et.num_queries

    def run(feed_eager_g: bool) -> dict[str, Any]:
        for engine_ in (eager, et):
            engine_.set_adapter(initial)
        prev = {"eager": [0.0] * q, "et": [0.0] * q}
        prev_seed, prev_lr, max_loss_diff = 0, 0.0, 0.0
        times = {"eager": [], "et": []}
        for t in range(steps):
            seed_t = step_seed(seed, t)
            ids, mask, labels = train.rows(batch_indices(len(train), et.batch_size, t, seed))
            began = time.perf_counter()
            loss_e = eager.train_step(ids, mask, labels, prev_seed, seed_t, prev["eager"], prev_lr, eps)
            times["eager"].append((time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            loss_r = et.train_step(ids, mask, labels, prev_seed, seed_t, prev["et"], prev_lr, eps)
            times["et"].append((time.perf_counter() - began) * 1000)
            max_loss_diff = max(max_loss_diff, float((loss_e - loss_r).abs().max()))
            g_e = projected_grads(loss_e.tolist(), eps, et.estimator.normalize)
            g_r = projected_grads(loss_r.tolist(), eps, et.estimator.normalize)
            prev = {"eager": g_e, "et": g_e if feed_eager_g else g_r}
            prev_seed, prev_lr = seed_t, lr
        eager.apply_update(prev_seed, prev["eager"], prev_lr)
        et.apply_update(prev_seed, prev["et"], prev_lr)
        return {
            "max_loss_diff": max_loss_diff,
            "adapter_eager": eager.get_adapter(),
            "adapter_et": et.get_adapter(),
            "eager_ms": statistics.median(times["eager"]),
            "et_ms": statistics.median(times["et"]),
        }

    forced = run(feed_eager_g=True)
    free = run(feed_eager_g=False)
    metric = "loss" if task.is_completion else "accuracy"  # a completion task's held-out metric is its loss
    held_out_eager = split_evaluator(eager, task)(held_out)[metric]
    held_out_et = split_evaluator(et, task)(held_out)[metric]
    rel = _relative_diff(forced["adapter_eager"], forced["adapter_et"])
    return {
        "steps": steps,
        "num_queries": q,
        "batch_size": et.batch_size,
        "seq_len": et.seq_len,
        "lr": lr,
        "eps": eps,
        "max_loss_diff": max(forced["max_loss_diff"], free["max_loss_diff"]),
        "teacher_forced_max_loss_diff": forced["max_loss_diff"],
        "teacher_forced_max_rel_diff": rel,
        "teacher_forced_ok": rel <= TEACHER_FORCED_REL_TOL,
        "free_running": {
            "adapter_max_rel_diff": _relative_diff(free["adapter_eager"], free["adapter_et"]),
            "adapter_norm_eager": float(free["adapter_eager"].norm()),
            "adapter_norm_et": float(free["adapter_et"].norm()),
            "held_out_examples": len(held_out),
            f"held_out_{metric}_eager": held_out_eager,
            f"held_out_{metric}_et": held_out_et,
        },
        "et_ms_per_step": statistics.median([forced["et_ms"], free["et_ms"]]),
        "eager_ms_per_step": statistics.median([forced["eager_ms"], free["eager_ms"]]),
    }
