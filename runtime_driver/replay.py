"""`prge replay RUN_DIR`: rebuild a zeroth-order run's adapter (or weights) from its log alone.

A P-RGE update is a pure function of (adapter, seed, g, lr): the noise is regenerated from the
seed. So the initial adapter plus the logged (seed, g, lr) of every step determine the final
adapter, with no data and no model forward. Replaying a run and finding its saved adapter (and
its checkpoint) bit for bit is how a run is audited: the log is complete and the engine applied
exactly the updates it logged. A full-parameter MeZO run replays the same way from the base
model's weights (read from the model folder its config names), tensor by tensor.

The log also holds the adapter after every step, for free: replaying to step N rebuilds the
adapter as it was then (say the step of the lowest validation loss, which a long run may pass
long before its end) with nothing stored but the log.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from export.contract.manifest import slots_from_json, weight_slots_from_json
from export.contract.methods import update_scalars
from models.model_folder import WEIGHTS_FILE, ModelFolderError, read_weights
from models.peft_io import (CONFIG_FILE, AdapterFileError, PeftAdapterConfig, load_peft_adapter, read_adapter_config,
                            save_peft_adapter)
from prge.estimators import updated_adapter
from prge.full_mezo import Draw, plan_draws, updated_weights
from prge.noise import NOISE_KINDS, stream_keys
from runtime_driver.checkpoint import load_checkpoint
from runtime_driver.metrics import read_metrics

# config.json["adapter_layout"]["initial"]: an adapter run starts from LoRA-FA's B = 0, a
# full-parameter run (layout kind FULL_WEIGHTS) from the base model's weights.
INITIAL_ZEROS = "zeros"
INITIAL_BASE_MODEL = "base-model"
FULL_WEIGHTS = "full-weights"


class ReplayError(ValueError):
    pass


@dataclass
class ReplayResult:
    steps: int  # updates replayed
    adapter: Tensor  # the replayed flat B after all of them
    compared: dict[str, dict[str, Any]]  # saved artifact -> {"step", "identical", "max_abs_diff"}

    @property
    def identical(self) -> bool:
        return all(c["identical"] for c in self.compared.values())


BEST = "best"  # `prge replay --step best`: the step of the lowest validation loss


def apply_logged_update(adapter: Tensor, seed: int, g: list[float], lr: float, noise: str = "gaussian") -> Tensor:
    """One step's update exactly as train_step folds it in: the same scalar tensors (g and lr in
    float32, as the program receives them) through the same update function and noise."""
    return updated_adapter(adapter, *update_scalars(seed, g, lr), noise).to(torch.float32)


def apply_logged_update_to_weights(weights: list[Tensor], draws: tuple[Draw, ...], seed: int, g: list[float], lr: float,
                                   noise: str = "gaussian") -> list[Tensor]:
    """A full-parameter step's update exactly as FullMeZOStep folds it in, draw by draw (draws:
    plan_draws of the run's weight slots)."""
    seed_t, g_t, lr_t = update_scalars(seed, g, lr)
    new = dict(updated_weights(weights, draws, stream_keys(seed_t), g_t, lr_t, noise))
    return [new[k] for k in range(len(weights))]


def _read_layout(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    try:
        config = json.loads(path.read_text())
        layout = config["adapter_layout"]
        full = layout.get("kind") == FULL_WEIGHTS
        numel = int(layout["numel"])
        slots = weight_slots_from_json(layout["slots"]) if full else slots_from_json(layout["slots"])
        base_model = config["base_model"] if full else None
        noise = layout.get("noise", "gaussian")  # runs from before estimators were a choice: Gaussian
    except FileNotFoundError:
        raise ReplayError(f"{path}: not found (is {run_dir} a prge run directory?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise ReplayError(f"{path}: no usable adapter_layout ({type(e).__name__}: {e}); "
                          "runs written before replay support cannot be replayed") from None
    if config.get("train", {}).get("method") == "fo":
        raise ReplayError(f"{run_dir}: a first-order run; only zeroth-order runs are defined by (seed, g)")
    if layout.get("initial") != (INITIAL_BASE_MODEL if full else INITIAL_ZEROS):
        raise ReplayError(f"{path}: unknown initial adapter {layout.get('initial')!r}")
    if noise not in NOISE_KINDS:
        raise ReplayError(f"{path}: adapter_layout.noise {noise!r} is none of {', '.join(NOISE_KINDS)}")
    return {"numel": numel, "slots": slots, "noise": noise, "full": full, "base_model": base_model}


def _train_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    rows = [r for r in read_metrics(path) if isinstance(r, dict) and r.get("type") == "train"]
    if not rows:
        raise ReplayError(f"{path}: no training steps logged")
    for expected, row in enumerate(rows):
        where = f"{path}: train row {expected + 1}"
        if row.get("step") != expected:
            raise ReplayError(f"{where}: step {row.get('step')!r}, expected {expected} (a gap or a duplicate)")
        seed, g, lr = row.get("seed"), row.get("g"), row.get("lr")
        if not isinstance(seed, int) or not isinstance(g, list) or not all(isinstance(x, (int, float)) for x in g):
            raise ReplayError(f"{where}: needs an integer seed and a list of numbers g")
        if not isinstance(lr, (int, float)) or len(g) != len(rows[0]["g"]):
            raise ReplayError(f"{where}: needs a number lr and as many g values as step 0")
    return rows


def _compare(replayed: Tensor, saved: Tensor, step: int) -> dict[str, Any]:
    same_shape = replayed.shape == saved.shape
    return {
        "step": step,
        "identical": bool(same_shape and torch.equal(replayed, saved)),
        "max_abs_diff": float((replayed - saved).abs().max()) if same_shape else None,
    }


def best_validation_step(run_dir: str | Path) -> tuple[int, float]:
    """(step, loss) of the run's validation eval with the lowest loss (the earliest of equals;
    step 0 is the zero-shot adapter, B = 0). Chosen on validation only: the test split, evaluated
    once at the end, plays no part."""
    path = Path(run_dir) / "metrics.jsonl"
    evals = [(r["loss"], r["step"]) for r in read_metrics(path)
             if r.get("type") == "eval" and r.get("split", "validation") == "validation"
             and isinstance(r.get("loss"), (int, float)) and isinstance(r.get("step"), int)]
    if not evals:
        raise ReplayError(f"{path}: no validation evals logged; --step {BEST} needs them")
    loss, step = min(evals)
    return step, float(loss)


def replay_run(run_dir: str | Path, until: int | None = None) -> ReplayResult:
    """Replay the logged steps from B = 0 (the first `until` of them; None: all); compare with the
    run's checkpoint and final adapter (whichever exist and were taken at a replayed step)."""
    run_dir = Path(run_dir)
    layout = _read_layout(run_dir)
    rows = _train_rows(run_dir)
    ckpt = load_checkpoint(run_dir / "ckpt") if (run_dir / "ckpt").exists() else None
    if ckpt is not None and ckpt.step > len(rows):
        raise ReplayError(f"{run_dir / 'ckpt'}: checkpoint at step {ckpt.step} but only {len(rows)} steps are logged")
    if until is not None and not 0 <= until <= len(rows):
        raise ReplayError(f"{run_dir / 'metrics.jsonl'}: the adapter after step {until} asked, but {len(rows)} steps are logged")
    to_the_end = until is None or until == len(rows)  # only then is the final adapter one to compare with
    rows = rows[:until]
    if layout["full"]:
        return _replay_full(run_dir, layout, rows, ckpt, to_the_end, must_compare=until is None)
    adapter = torch.zeros(layout["numel"], dtype=torch.float32)
    compared: dict[str, dict[str, Any]] = {}
    for done, row in enumerate(rows, start=1):
        adapter = apply_logged_update(adapter, row["seed"], row["g"], row["lr"], layout["noise"])
        if ckpt is not None and done == ckpt.step:
            compared["ckpt"] = _compare(adapter, ckpt.adapter, done)
    final_dir = run_dir / "adapter"
    if (final_dir / CONFIG_FILE).is_file() and to_the_end:
        peft = _final_adapter_config(run_dir)
        saved = load_peft_adapter(final_dir, layout["slots"], peft.rank, peft.a_seed)
        compared["adapter"] = _compare(adapter, saved, len(rows))
    if not compared and until is None:
        raise ReplayError(f"{run_dir}: nothing to compare with (no adapter/ and no ckpt/)")
    return ReplayResult(len(rows), adapter, compared)


def _final_adapter_config(run_dir: Path) -> PeftAdapterConfig:
    try:
        return read_adapter_config(run_dir / "adapter")
    except AdapterFileError as e:
        raise ReplayError(str(e)) from None


class ReplayedPeftWriter:
    """Writes a replayed adapter as a PEFT folder with the header (rank, alpha, targets, A's seed,
    base model) of the run's own final adapter, so only a finished adapter run's. Made before
    the replay, so a run without that header is refused before minutes of replaying."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        layout = _read_layout(self.run_dir)
        if layout["full"]:
            raise ReplayError(f"{self.run_dir}: a full-parameter run has no adapter; write its flat weights with --out")
        self.slots = layout["slots"]
        self.header = _final_adapter_config(self.run_dir)

    def write(self, adapter: Tensor, out_dir: str | Path) -> Path:
        h = self.header
        return save_peft_adapter(out_dir, self.slots, adapter, rank=h.rank, alpha=h.alpha, a_seed=h.a_seed, targets=h.targets,
                                 base_model=h.base_model, fan_in_fan_out=h.fan_in_fan_out)


def _replay_full(run_dir: Path, layout: dict[str, Any], rows: list[dict[str, Any]], ckpt, to_the_end: bool,
                 must_compare: bool) -> ReplayResult:
    """replay_run for a full-parameter run: from the base model's weights; compared with the
    checkpoint's flat weights and the saved model folder (run/model)."""
    slots = layout["slots"]
    names = [s.name for s in slots]

    def weights_of(folder: str | Path, what: str) -> list[Tensor]:
        try:
            found = read_weights(folder, names)
        except (ModelFolderError, OSError) as e:
            raise ReplayError(f"{run_dir}: {what}: {e}") from None
        return [found[n] for n in names]

    weights = weights_of(layout["base_model"], "the base model's weights are needed to replay a full-parameter run")
    draws = plan_draws(slots)
    compared: dict[str, dict[str, Any]] = {}
    for done, row in enumerate(rows, start=1):
        weights = apply_logged_update_to_weights(weights, draws, row["seed"], row["g"], row["lr"], layout["noise"])
        if ckpt is not None and done == ckpt.step:
            compared["ckpt"] = _compare(_flat(weights), ckpt.adapter, done)
    final = run_dir / "model"
    if (final / WEIGHTS_FILE).is_file() and to_the_end:
        compared["model"] = _compare(_flat(weights), _flat(weights_of(final, "the saved model folder")), len(rows))
    if not compared and must_compare:
        raise ReplayError(f"{run_dir}: nothing to compare with (no model/ and no ckpt/)")
    return ReplayResult(len(rows), _flat(weights), compared)


def _flat(weights: list[Tensor]) -> Tensor:
    return torch.cat([w.reshape(-1) for w in weights])
