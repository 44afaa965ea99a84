"""A full-parameter MeZO program (`prge export --mezo-full`) through the ExecuTorch runtime, on
the tiny model: it starts from the base weights (stored once beside it), its steps equal eager's (the same g fed to
both: weights bit for bit, losses within float rounding), a whole run replays and resumes
exactly, its memory plan keeps each draw of noise short-lived, and programs of the other kinds are refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import prge.full_mezo as full_mezo
from export.contract.manifest import ManifestError
from export.contract.memory_plan import MUTABLE_BUFFERS, planned_arenas
from export.contract.methods import ExportShapes, step_scalars, update_scalars
from models.causal_lm import build_full_mezo_step
from runtime_driver.commands.cli import main
from runtime_driver.engines import ExecuTorchFullMeZO, ExecuTorchPRGE
from runtime_driver.run import RunConfig, run_training
from runtime_driver.train import TrainConfig

pytestmark = pytest.mark.slow  # the export takes a minute or two

SEQ_LEN = 16
BATCH = 2


@pytest.fixture(scope="module")
def full_program(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    from export.full_mezo import export_full_mezo
    from models.tasks.folder import load_folder_spec

    out = tmp_path_factory.mktemp("full-program") / "program"
    with pytest.MonkeyPatch.context() as patch:
        # Several draws, one tensor cut across two, as the default model's 4M-element draws
        # cut its embedding; eager (one draw of all 111k weights) must still agree bit for bit.
        patch.setattr(full_mezo, "SPAN", 1 << 15)
        export_full_mezo(tiny_model_dir("llama"), load_folder_spec(tiny_data_dir), ExportShapes(BATCH, SEQ_LEN, 2 * BATCH),
                         out, progress=lambda _: None)
    return out


def test_the_memory_plan_keeps_each_draw_short(full_program):
    """The arenas ExecuTorch plans, in multiples of the weights (the shared mutable buffers).
    Measured with this fixture's 4 draws on the 2-layer model: train_step 4.5x, apply_weight_update
    2.4x, set_weights 0.33x (its largest weight). Without the depth-first schedule (fused
    partitions leave the graph sorted breadth-first, every draw's int64 temporaries alive
    together) train_step was 10.9x; with the schedule but every weight written back at the end
    of the method, 5.6x, 2.7x and 2.0x (set_weights: its input, planned, and every new weight)."""
    arenas = planned_arenas(full_program / "model.pte")
    weights = arenas[MUTABLE_BUFFERS]
    assert weights >= 4 * json.loads((full_program / "manifest.json").read_text())["weights"]["numel"]  # every weight, float32
    assert arenas["train_step"] <= 5 * weights, arenas
    assert arenas["apply_weight_update"] <= 2.6 * weights, arenas
    assert arenas["set_weights"] <= 0.5 * weights, arenas


def test_steps_match_eager(full_program, tiny_model_dir, tiny_batch):
    engine = ExecuTorchFullMeZO(full_program)
    label_ids = engine.manifest["task"]["label_token_ids"]
    eager = build_full_mezo_step(tiny_model_dir("llama"), label_ids)
    assert torch.equal(engine.get_adapter(), eager.get_adapter())  # the program starts from the base weights
    ids, mask, labels = tiny_batch(BATCH, seq_len=SEQ_LEN)
    g = 0.0
    with torch.no_grad():
        for t in range(4):
            scalars = step_scalars(t, t + 1, [g], 1e-2, 1e-2)
            expected = eager.train_step(ids, mask, labels, *scalars)
            got = engine.train_step(ids, mask, labels, t, t + 1, [g], 1e-2, 1e-2)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            g = float(expected[0] - expected[1]) / 2e-2  # teacher forcing: both take eager's g
        eager.apply_weight_update(*update_scalars(4, [g], 1e-2))
    engine.apply_update(4, [g], 1e-2)
    assert torch.equal(engine.get_adapter(), eager.get_adapter())
    logits = engine.eval_logits(ids.repeat(2, 1), mask.repeat(2, 1))
    torch.testing.assert_close(logits, eager.eval_logits(ids.repeat(2, 1), mask.repeat(2, 1)), rtol=1e-5, atol=1e-5)


def _run(tmp_path: Path, name: str, program: Path, data: Path, resume: bool = False, **train) -> Path:
    settings = {"method": "mezo-full", "steps": 6, "batch_size": BATCH, "lr": 1e-3, "eps": 1e-3, "eval_every": 3,
                "eval_examples": 8, "seed": 2, "checkpoint_every": 3, **train}
    cfg = RunConfig(engine="executorch", program=str(program), data=str(data), out=str(tmp_path / name),
                    test_examples=8, train=TrainConfig(**settings))
    run_training(cfg, resume=resume, quiet=True, progress=lambda _: None)
    return tmp_path / name


def test_a_run_replays_and_resumes_exactly(full_program, tiny_data_dir, tmp_path, stop_after_step, capsys):
    from safetensors.torch import load_file

    whole = _run(tmp_path, "whole", full_program, tiny_data_dir)
    assert main(["replay", str(whole)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"]["identical"] and result["ckpt"]["identical"]

    with stop_after_step(4):
        _run(tmp_path, "resumed", full_program, tiny_data_dir)
    resumed = _run(tmp_path, "resumed", full_program, tiny_data_dir, resume=True)
    a, b = (load_file(str(run / "model" / "model.safetensors")) for run in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_weights_are_stored_once_beside_the_program(full_program, tiny_model_dir, tmp_path):
    """The base weights are one safetensors file beside the .pte (ExecuTorch would store mutable
    buffers' initial values once per method), and a damaged copy is refused before any step."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    manifest = json.loads((full_program / "manifest.json").read_text())
    weights = load_file(str(full_program / manifest["program"]["weights"]["file"]))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).state_dict()
    assert weights.keys() <= base.keys() and all(torch.equal(weights[k], base[k]) for k in weights)
    assert sum(w.numel() for w in weights.values()) == manifest["weights"]["numel"]

    damaged = tmp_path / "damaged"
    shutil.copytree(full_program, damaged)
    data = bytearray((damaged / "weights.safetensors").read_bytes())
    data[-1] ^= 1
    (damaged / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="weights.safetensors: does not match"):
        ExecuTorchFullMeZO(damaged)


def test_programs_of_other_kinds_are_refused(full_program, tiny_program, tiny_data_dir, tmp_path):
    with pytest.raises(ManifestError, match="not a full-parameter program"):
        ExecuTorchFullMeZO(tiny_program("llama"))
    with pytest.raises(ManifestError, match="full-mezo program has no P-RGE training step; train it with --method mezo-full"):
        ExecuTorchPRGE(full_program)
    with pytest.raises(ValueError, match="differs from the program's batch"):
        _run(tmp_path, "batch", full_program, tiny_data_dir, batch_size=BATCH + 1)
    assert not (tmp_path / "batch").exists()


def test_bench_times_it_beside_a_prge_program(full_program, tiny_program):
    from runtime_driver.commands.bench import compare_programs

    rows = compare_programs([str(tiny_program()), str(full_program)], reps=1, threads=1)
    row = rows[str(full_program)]
    assert row["method"] == "full-parameter MeZO" and row["rows_per_step"] == 2 * BATCH and row["estimator"] == "spsa"
    assert row["train_step_ms"] > 0 and row["step_overhead"] > 1  # the step is a forward plus the noise of every weight
    # Its size counts the initial weights beside the .pte; its RSS, a worker that set them (as a run does).
    manifest = json.loads((full_program / "manifest.json").read_text())["program"]
    assert row["program_mb"] == round((manifest["pte"]["bytes"] + manifest["weights"]["bytes"]) / 1e6, 1)
    assert row["peak_rss_train_step_mb"] > 0
    # Where the peak comes from: the resident set after each part of the set-up and each step.
    phases = row["rss_phases"]
    assert [p["phase"].split(" (")[0] for p in phases] == ["imports", "program loaded", "base weights read",
                                                           "base weights set", "step 1", "step 2"]
    peaks = [p["peak_mb"] for p in phases]
    assert peaks == sorted(peaks) and peaks[-1] == row["peak_rss_train_step_mb"]
    assert all(0 < p["rss_mb"] <= p["peak_mb"] for p in phases)
    # Allocated and file-mapped pages are the resident set but for shared memory (none here).
    assert all(p["anon_mb"] > 0 and p["file_mb"] > 0 and abs(p["anon_mb"] + p["file_mb"] - p["rss_mb"]) < 1 for p in phases)
    # The planned arenas, as test_the_memory_plan_keeps_each_draw_short reads them.
    arenas = planned_arenas(full_program / "model.pte")
    assert row["planned_arena_mb"] == {k: round(v / 1e6, 1) for k, v in arenas.items()}


def test_prge_compare_takes_a_full_parameter_program(full_program, tiny_model_dir, tiny_data_dir):
    """Teacher-forced (both engines fed eager's g), the weights end bit-identical: the update is
    float64 arithmetic on the same counter noise in both; free-running they stay close."""
    from runtime_driver.commands.compare import compare_engines

    result = compare_engines(tiny_model_dir("llama"), full_program, tiny_data_dir, steps=3, lr=1e-3, eps=1e-3,
                             eval_examples=8)
    assert result["num_queries"] == 1 and result["teacher_forced_ok"]
    assert result["teacher_forced_max_rel_diff"] == 0.0 and result["teacher_forced_max_loss_diff"] < 1e-5
    assert result["free_running"]["adapter_max_rel_diff"] < 1e-3
