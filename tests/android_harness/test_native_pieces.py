"""The native driver's pieces against their Python twins, case by case: the program contract
(contract.hpp vs export/contract/methods.py), the step judge (judge.cpp vs runtime_driver/judge.py),
and the schedule of seeds, learning rates, evals and checkpoints (schedule.cpp vs prge/ and
runtime_driver/train.py). The whole loop's equality is test_native_driver.py."""
from __future__ import annotations

import json
import math
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from export.contract.manifest import MANIFEST_VERSION
from export.contract.methods import (COMPLETION_TRAINING_METHODS, CONTRACT_VERSION, GENERATION_METHODS, OUTPUTS,
                                     TRAINING_METHODS, inputs_of)
from native_helpers import ROOT
from prge.estimators import step_seed
from prge.step import COMPLETION
from prge.schedules import learning_rate
from runtime_driver.judge import StepJudge
from runtime_driver.train import TrainConfig, due_after

CONTRACT_HPP = ROOT / "android_harness" / "src" / "contract.hpp"


def _cpp_arg(arg) -> str:
    dims = ", ".join(f'"{d}"' for d in arg.shape)
    return f'{{"{arg.name}", "{arg.dtype}", {{{dims}}}}}'


def _cpp_table(methods: tuple[str, ...], loss: str) -> str:
    """A table of contract.hpp as export/contract/methods.py defines it for programs of this loss."""
    lines = []
    for name in methods:
        lines.append(f'      {{"{name}",')
        inputs = inputs_of(name, loss)
        if not inputs:
            lines.append("       {},")
        for i, arg in enumerate(inputs):
            lines.append(("       {" if i == 0 else "        ") + _cpp_arg(arg) + ("}," if i == len(inputs) - 1 else ","))
        lines.append(f"       {_cpp_arg(OUTPUTS[name])}}},")
    return "\n".join(lines)


def test_the_native_contract_is_the_python_contract():
    text = CONTRACT_HPP.read_text()
    tables = [part.split("\n  };", 1)[0] for part in text.split("static const std::vector<Method> methods = {\n")[1:]]
    expected = [_cpp_table(TRAINING_METHODS, "classification"), _cpp_table(COMPLETION_TRAINING_METHODS, COMPLETION),
                _cpp_table(GENERATION_METHODS, "lm")]
    for table, want in zip(tables, expected, strict=True):
        assert table == want, f"update the table in {CONTRACT_HPP} to:\n{want}"
    assert f"constexpr int kVersion = {CONTRACT_VERSION};" in text
    assert f"constexpr int kManifestVersion = {MANIFEST_VERSION};" in text


@pytest.fixture(scope="module")
def pieces(native_binary) -> Path:
    return native_binary.parent / "prge-native-pieces"


def _ask(pieces: Path, requests: list[dict]) -> list[dict]:
    done = subprocess.run([str(pieces)], input="".join(json.dumps(r) + "\n" for r in requests),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _loss_sequences(rng: random.Random, q: int, steps: int) -> list[list[float]]:
    """Losses as a run meets them: a drifting level, noise, hard batches, spikes, NaN, inf,
    all-equal (saturated) steps, and blow-ups that last."""
    level, out = rng.uniform(0.05, 3.0), []
    for t in range(steps):
        level = max(1e-4, level * rng.uniform(0.9, 1.08))
        losses = [level * rng.uniform(0.5, 1.5) for _ in range(2 * q)]
        kind = rng.random()
        if kind < 0.05:
            losses[rng.randrange(2 * q)] = math.nan
        elif kind < 0.08:
            losses[rng.randrange(2 * q)] = rng.choice([math.inf, -math.inf])
        elif kind < 0.12:
            losses = [losses[0]] * (2 * q)
        elif kind < 0.2:
            losses = [x * rng.choice([3.0, 30.0, 1000.0]) for x in losses]
        if t > steps * 0.8 and rng.random() < 0.5:
            losses = [x * 1e4 for x in losses]
        out.append([float(np.float32(x)) for x in losses])
    return out


def test_the_native_judge_is_the_python_judge(pieces):
    """Both judges, plain and normalized g (prge/estimators.py), on the same losses: same bits."""
    rng = random.Random(0)
    requests, expected = [], []
    for case in range(60):
        q = rng.choice([1, 2, 4])
        settings = {"eps": rng.choice([1e-3, 1e-2, 0.05]), "normalize": rng.random() < 0.5,
                    "diverge_factor": rng.choice([0.0, 3.0, 10.0]),
                    "num_labels": rng.choice([2, 3, 7]), "max_bad_steps": rng.choice([1, 3, 10])}
        steps = _loss_sequences(rng, q, rng.randint(5, 60))
        bits = [np.array(s, dtype=np.float32).view(np.uint32).tolist() for s in steps]
        requests.append({"piece": "judge", **settings, "losses_bits": bits})
        judge = StepJudge(**settings)
        verdicts = []
        for losses in steps:
            v = judge.judge(torch.tensor(losses, dtype=torch.float32))
            verdicts.append({"g": v.g, "fault": v.fault or "", "mean_loss": v.mean_loss if math.isfinite(v.mean_loss) else None,
                             "must_stop": judge.must_stop})
        expected.append({"verdicts": verdicts, "baseline_losses": judge.baseline_losses})
    answers = _ask(pieces, requests)
    assert len(answers) == len(expected)
    faults = set()
    for case, (got, want) in enumerate(zip(answers, expected)):
        for step, (g, w) in enumerate(zip(got["verdicts"], want["verdicts"])):
            assert g == w, f"case {case} step {step}: native {g} vs python {w}"
            faults.add(w["fault"].split(" (")[0])
        assert got["baseline_losses"] == want["baseline_losses"], case
    # The cases reach every rule, so the agreement means something.
    assert faults == {"", "non-finite loss", "degenerate loss", "diverged loss"}


def test_the_native_schedule_is_the_python_schedule(pieces):
    grid = [(steps, every, ckpt) for steps in (1, 7, 20) for every in (0, 1, 3, 50) for ckpt in (0, 2, 7)]
    requests = [{"piece": "due", "steps": s, "eval_every": e, "checkpoint_every": c} for s, e, c in grid]
    requests += [{"piece": "step_seed", "run_seed": seed, "steps": 50} for seed in (0, 1, 4, 2**31 - 1, 2**32 - 1)]
    requests += [{"piece": "learning_rate", "schedule": kind, "lr": 3e-3, "steps": 37} for kind in ("constant", "linear")]
    answers = iter(_ask(pieces, requests))
    for steps, every, ckpt in grid:
        cfg = TrainConfig(steps=steps, eval_every=every, checkpoint_every=ckpt)
        want = [[d.eval, d.checkpoint] for d in (due_after(done, cfg) for done in range(1, steps + 1))]
        assert next(answers)["due"] == want, (steps, every, ckpt)
    for seed in (0, 1, 4, 2**31 - 1, 2**32 - 1):
        assert next(answers)["seeds"] == [step_seed(seed, t) for t in range(50)]
    for kind in ("constant", "linear"):
        assert next(answers)["lrs"] == [learning_rate(kind, 3e-3, t, 37) for t in range(37)]
