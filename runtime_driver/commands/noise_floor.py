"""`prge bench --noise-floor`: how far a quantized base bends zeroth-order estimates, per eps.

A projected gradient g = (L(B + eps z) - L(B - eps z)) / (2 eps) subtracts two nearby losses.
With a quantized base, activations are rounded to int8 on the fly at every call, so the loss
is a slightly jagged function of B: below some eps the difference is rounding, not slope; above
some eps it is a secant, not the slope, in any precision. For each program (exports of one
model and shapes, float32 first) and each eps, this runs the same train_step calls (same batch,
same seeds, B = 0, no update folded in) and compares g with the reference slope: the float32
program's g at the smallest eps of the grid, for the same directions:

- deviation: median over directions of |g - g_slope| / median |g_slope|. For float32 it grows
  with eps (curvature); for a quantized base it also grows as eps shrinks (rounding, ~1/eps).
  The eps where it is smallest is that program's best eps;
- repeat spread: the largest difference between two identical calls (the same inputs twice),
  i.e. whether the runtime is deterministic; nonzero would be noise no eps could average away.

Only ExecuTorch programs are measured: this is what training on the device sees.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from models.console import say
from prge.estimators import projected_grads, step_seed

DEFAULT_EPS_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def _g(engine, batch, seed: int, eps: float) -> torch.Tensor:
    """The q projected gradients of one train_step at B = 0 (no pending update: g = 0, lr = 0)."""
    q = engine.num_queries
    losses = engine.train_step(*batch, 0, seed, [0.0] * q, 0.0, eps)
    return torch.tensor(projected_grads(losses.tolist(), eps), dtype=torch.float64)  # the plain slope, whatever the estimator


def noise_floor(program_dirs: list[str], data: str | None = None, eps_grid: tuple[float, ...] = DEFAULT_EPS_GRID,
                directions: int = 16, threads: int = 2) -> dict[str, Any]:
    from models.tasks.batches import batch_indices
    from models.tasks.folder import resolve_data_dir
    from runtime_driver.engines import ExecuTorchPRGE, set_runtime_threads
    from runtime_driver.run import program_task

    set_runtime_threads(threads)
    engines = [ExecuTorchPRGE(p) for p in program_dirs]
    first = engines[0]
    shapes = {(e.num_queries, e.batch_size, e.seq_len) for e in engines}
    if len(shapes) != 1:
        raise ValueError(f"--noise-floor: the programs must share q, b and seq-len; they have {sorted(shapes)}")
    if len({e.manifest["model"]["weights_sha256"] for e in engines}) != 1:
        raise ValueError("--noise-floor: the programs must be exports of the same model weights")
    task = program_task(first.program_dir, first.manifest, resolve_data_dir(data))
    train = task.split("train", first.seq_len)
    batch = train.rows(batch_indices(len(train), first.batch_size, 0, 0))
    calls = -(-directions // first.num_queries)  # each call gives q directions
    seeds = [step_seed(0, t) for t in range(calls)]  # each engine starts at B = 0 (ExecuTorchPRGE sets it)

    # Every program's g at every eps first; the slope is the first (float32) program's g at the
    # smallest eps, and every deviation is measured against it.
    smallest = min(eps_grid)
    gs: dict[str, dict[float, torch.Tensor]] = {}
    repeats: dict[str, float] = {}
    for path, engine in zip(program_dirs, engines):
        say(f"Noise floor of {path} ({engine.adapter.quantize}) over {len(eps_grid)} eps x "
            f"{calls * engine.num_queries} directions ...")
        gs[path] = {eps: torch.cat([_g(engine, batch, s, eps) for s in seeds]) for eps in eps_grid}
        # The first call again, identical inputs: any difference is noise no eps averages away.
        again = _g(engine, batch, seeds[0], smallest)
        repeats[path] = float((again - gs[path][smallest][: engine.num_queries]).abs().max())
    slope = gs[program_dirs[0]][smallest]
    scale = statistics.median(slope.abs().tolist())
    if scale == 0:
        raise ValueError("--noise-floor: the float32 program's g is 0 for every direction (is the loss constant?)")
    rows: dict[str, dict[str, Any]] = {}
    for path, engine in zip(program_dirs, engines):
        per_eps = {f"{eps:g}": {"median_abs_g": round(statistics.median(g.abs().tolist()), 6),
                                "deviation": round(statistics.median((g - slope).abs().tolist()) / scale, 6)}
                   for eps, g in gs[path].items()}
        best = min(per_eps, key=lambda e: per_eps[e]["deviation"])
        rows[path] = {"scheme": engine.adapter.quantize, "repeat_spread": repeats[path], "eps": per_eps,
                      "best_eps": float(best)}
    return {"directions": calls * first.num_queries, "batch_rows": first.batch_size, "eps_grid": list(eps_grid),
            "programs": rows}


def format_noise_floor(result: dict[str, Any]) -> str:
    eps = [f"{e:g}" for e in result["eps_grid"]]
    lines = ["| program | base | repeat spread | " + " | ".join(f"eps {e}" for e in eps) + " | best eps |",
             "|" + "---|" * (len(eps) + 4)]
    for path, row in result["programs"].items():
        cells = [f"{row['eps'][e]['deviation']:.3f}" for e in eps]
        lines.append(f"| {Path(path).name} | {row['scheme']} | {row['repeat_spread']:.1e} | " + " | ".join(cells)
                     + f" | {row['best_eps']:g} |")
    lines.append("")
    lines.append(f"Cells: median |g - g_slope| / median |g_slope| over the same directions; g_slope: the first program's "
                 f"g at eps {min(result['eps_grid']):g}.")
    return "\n".join(lines)
