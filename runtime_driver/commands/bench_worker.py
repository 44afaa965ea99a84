"""One memory measurement in a process of its own: `python -m runtime_driver.commands.bench_worker MODE ...`.

Peak RSS is a per-process high-water mark, so each engine gets a fresh interpreter that loads
only what that engine needs, runs a couple of steps and reports its own VmHWM (exec starts a
fresh address space, so nothing of the parent is counted). Modes:
  executorch-prge   ExecuTorch program, `train_step` only (no eager model is ever built; a
                    full-parameter program: every method, its weights set as a run sets them)
  executorch-infer  ExecuTorch program, `eval_logits` only (inference over the same rows)
  executorch-fo     first-order program (ExecuTorch's training extension): forward, backward, SGD
  eager-prge        PRGEStep.train_step in PyTorch under no_grad
  eager-fo          first-order LoRA-FA: autograd into B, SGD (the backprop reference); with
                    --fo-micro-batch and --checkpointing, the lean way a user would run it:
                    gradients accumulated over micro-batches, activations recomputed
Prints one JSON object on stdout: the peak (vm_hwm_mb) and, for the executorch modes, the
resident set and the peak so far after each phase (imports, program load, each step; a
full-parameter program's weights read and set), which says where the peak comes from.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models import console  # noqa: E402

MODES = ("executorch-prge", "executorch-infer", "executorch-fo", "eager-prge", "eager-fo")
IMPORTED = "imports (Python, torch, the runtime)"  # the first memory phase: before any program is loaded


def _status_mb(*fields: str) -> list[float]:
    """The fields' values in /proc/self/status, in MiB, read at one time."""
    with open("/proc/self/status", encoding="ascii") as f:
        found = {k: int(v.split()[0]) / 1024 for k, _, v in (line.partition(":") for line in f) if k in fields}
    missing = [f for f in fields if f not in found]
    if missing:
        raise RuntimeError(f"no {', '.join(missing)} in /proc/self/status")
    return [found[f] for f in fields]


def vm_hwm_mb() -> float:
    """This process's peak resident set size (VmHWM) in MiB."""
    return _status_mb("VmHWM")[0]


class MemoryPhases:
    """The process's resident set (VmRSS) and its peak so far (VmHWM), in MiB, after each phase
    of a worker's run: which phase raised the peak, and what stays resident after it. Linux
    updates VmHWM lazily (a reading can be below an earlier one, measured: 386.7 after 387.0),
    so the peak so far is the largest reading yet. The resident set is also split into its
    anonymous pages (allocations: arenas, packed weights, tensors) and its file pages (mapped
    files: libraries, a memory-mapped program), which tells a copy from a mapping."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.peak_mb = 0.0

    def mark(self, phase: str) -> None:
        rss, hwm, anon, file = _status_mb("VmRSS", "VmHWM", "RssAnon", "RssFile")
        self.peak_mb = max(self.peak_mb, hwm, rss)
        self.rows.append({"phase": phase, "rss_mb": round(rss, 1), "peak_mb": round(self.peak_mb, 1),
                          "anon_mb": round(anon, 1), "file_mb": round(file, 1)})


def random_batch(rows: int, seq_len: int, vocab: int, num_labels: int, seed: int = 0, targets: bool = False):
    """Token ids drawn uniformly (timing and memory do not depend on content: shapes are static).
    targets: a completion program's labels, a target token at every position."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=g, dtype=torch.int64)
    mask = torch.ones(rows, seq_len, dtype=torch.int64)
    if targets:
        return ids, mask, torch.randint(0, vocab, (rows, seq_len), generator=g, dtype=torch.int64)
    labels = torch.randint(0, num_labels, (rows,), generator=g, dtype=torch.int64)
    return ids, mask, labels


def plain_forward(manifest: dict) -> tuple[str, int, bool]:
    """(method, vocab, completion) of a program's plain forward beside train_step: label-word
    logits, or a completion program's eval losses (its labels are per-position targets); vocab
    bounds the random token ids (any valid ids will do)."""
    from export.contract.manifest import SIDE, program_kind
    from prge.step import COMPLETION

    completion = manifest["task"]["loss"] == COMPLETION
    vocab = max(manifest["task"]["label_token_ids"] or [manifest["shapes"]["vocab_size"] - 1]) + 1
    if program_kind(manifest) == SIDE:  # a side-tuning device's whole job is this forward
        return "side_features", vocab, False
    return ("eval_losses" if completion else "eval_logits"), vocab, completion


def _run_executorch_first_order(args, phases: MemoryPhases) -> None:
    from runtime_driver.engines import set_runtime_threads
    from runtime_driver.first_order_engine import ExecuTorchFirstOrder

    set_runtime_threads(args.threads)
    phases.mark(IMPORTED)
    engine = ExecuTorchFirstOrder(args.program)
    phases.mark("program loaded")
    _, vocab, _ = plain_forward(engine.manifest)
    batch = random_batch(engine.batch_size, engine.seq_len, vocab, len(engine.manifest["task"]["label_token_ids"]))
    for i in range(args.steps):
        engine.first_order_step(*batch, lr=1e-3)
        phases.mark(f"step {i + 1}")


def _run_executorch_full_mezo(args, phases: MemoryPhases) -> None:
    """A full-parameter program holds no weights until its engine sets them from the export
    folder, so it is measured the way a run holds it: every method loaded, the weights set."""
    from runtime_driver.engines import ExecuTorchFullMeZO, set_runtime_threads

    set_runtime_threads(args.threads)
    phases.mark(IMPORTED)
    engine = ExecuTorchFullMeZO(args.program, on_phase=phases.mark)
    _, vocab, _ = plain_forward(engine.manifest)
    batch = random_batch(engine.batch_size, engine.seq_len, vocab, len(engine.manifest["task"]["label_token_ids"]))
    for i in range(args.steps):
        engine.train_step(*batch, i, i + 1, [0.1], 1e-5, 1e-3)
        phases.mark(f"step {i + 1}")


def _run_executorch(args, phases: MemoryPhases) -> None:
    from export.contract.manifest import FULL_MEZO, program_kind, read_manifest
    from export.contract.methods import step_scalars
    from runtime_driver.engines import ExecuTorchProgram, set_runtime_threads

    set_runtime_threads(args.threads)
    # The manifest first: the worker loads only the method it measures (its RSS is the figure).
    manifest = read_manifest(args.program)
    if args.mode == "executorch-prge" and program_kind(manifest) == FULL_MEZO:
        return _run_executorch_full_mezo(args, phases)
    phases.mark(IMPORTED)
    forward, vocab, completion = plain_forward(manifest)
    method = "train_step" if args.mode == "executorch-prge" else forward
    program = ExecuTorchProgram(args.program, methods=(method,))
    phases.mark(f"program loaded ({method})")
    manifest = program.manifest
    q, b, t = manifest.get("num_queries", 1), manifest["shapes"]["batch_size"], manifest["shapes"]["seq_len"]
    num_labels = len(manifest["task"]["label_token_ids"])
    if method == "train_step":
        ids, mask, labels = random_batch(b, t, vocab, num_labels, targets=completion)
        for i in range(args.steps):
            program.run(method, [ids, mask, labels, *step_scalars(i, i + 1, [0.1] * q, 1e-3, 1e-2)])
            phases.mark(f"step {i + 1}")
    else:
        rows = manifest["shapes"].get("eval_batch_size", b)  # a side-tuning program has one batch size
        ids, mask, labels = random_batch(rows, t, vocab, num_labels, targets=completion)
        for i in range(args.steps):
            program.run(method, [ids, mask, labels] if completion else [ids, mask])
            phases.mark(f"{method} {i + 1}")


def _run_eager(args) -> None:
    import torch

    from models.causal_lm import AdapterConfig
    from runtime_driver.run import eager_engine
    from runtime_driver.train import enable_activation_checkpointing, first_order_optimizer, first_order_step

    torch.set_num_threads(args.threads)
    label_ids = [int(x) for x in args.label_ids.split(",")]
    engine = eager_engine(Path(args.model), AdapterConfig(num_queries=args.q, micro_batch=args.micro_batch or None),
                          label_ids, args.seq_len)
    vocab = engine.step.vocab_size
    ids, mask, labels = random_batch(args.b, args.seq_len, vocab, len(label_ids))
    if args.mode == "eager-prge":
        for i in range(args.steps):
            engine.train_step(ids, mask, labels, i, i + 1, [0.1] * args.q, 1e-3, 1e-2)
        return
    if args.checkpointing:
        enable_activation_checkpointing(engine.step)
    optimizer = first_order_optimizer(engine.step, "sgd", 1e-3)
    for _ in range(args.steps):
        first_order_step(engine.step, optimizer, ids, mask, labels, micro_batch=args.fo_micro_batch or None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime_driver.commands.bench_worker")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--program", help="export folder (executorch modes)")
    parser.add_argument("--model", help="model folder (eager modes)")
    parser.add_argument("--label-ids", help="comma-separated label token ids (eager modes)")
    parser.add_argument("--q", type=int, default=4)
    parser.add_argument("--b", type=int, default=8, help="examples per perturbed copy (first-order: the batch)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=0, help="eager P-RGE: rows per forward pass (0: one pass)")
    parser.add_argument("--fo-micro-batch", type=int, default=0,
                        help="first-order: rows per backward, gradients accumulated (0: one pass)")
    parser.add_argument("--checkpointing", action="store_true", help="first-order: activation checkpointing")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    console.configure(verbose=False)  # a failed worker's stderr tail must show its error, not noise
    began = time.perf_counter()
    phases = MemoryPhases()
    if args.mode == "executorch-fo":
        _run_executorch_first_order(args, phases)
    elif args.mode.startswith("executorch"):
        _run_executorch(args, phases)
    else:
        _run_eager(args)
    print(json.dumps({"mode": args.mode, "vm_hwm_mb": round(max(vm_hwm_mb(), phases.peak_mb), 1),
                      "wall_s": round(time.perf_counter() - began, 2),
                      "phases": phases.rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
