"""A quantized frozen base (models/quantize.py): exported, delegated, trained through ExecuTorch and
held to the eager engine running the same quantized module; its errors come before any export."""
from __future__ import annotations

import json

import pytest
import torch

from models.quantize import QuantizationError, check_scheme, frozen_linears
from runtime_driver.commands.cli import main
from runtime_driver.commands.compare import TEACHER_FORCED_REL_TOL, compare_engines
from runtime_driver.commands.noise_floor import noise_floor
from runtime_driver.engines import program_adapter_config

# Per-copy loss difference, ExecuTorch against eager, on the tiny models. XNNPACK's integer
# kernels do not round as torchao's reference does, and an activation quantized per token on
# the fly moves a whole int8 step when float32 rounding puts it on the other side of a rounding
# boundary: measured up to 8.2e-4 here for both schemes (float32 programs: 1e-5). The real
# model's figures are in BENCHMARKS.md.
LOSS_TOL = 5e-3
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


@pytest.mark.parametrize("scheme", ["8da8w", "8da4w"])
def test_quantized_program_trains_like_eager_and_delegates_every_quantized_linear(
        scheme, tiny_program, tiny_model_dir, tiny_data_dir):
    program = tiny_program("llama", quantize=scheme)
    manifest = json.loads((program / "manifest.json").read_text())
    quantization = manifest["model"]["quantization"]
    assert quantization["scheme"] == scheme and quantization["linears"] == 2 * LINEARS_PER_LAYER
    assert quantization["group_size"] == (32 if scheme == "8da4w" else None)
    # Quantization moves the base's logits (it is lossy), and the record says by how much.
    assert 0 < quantization["answer_logits_rel_diff"] < 0.2
    for method in ("train_step", "eval_logits"):
        delegation = manifest["delegation"][method]
        # Every quantize/dequantize of the linears runs inside XNNPACK, none on portable kernels
        # (a silent fall-back would be float math on dequantized weights).
        assert delegation["delegated_ops"]["torchao_quantize_affine_default"] == 2 * LINEARS_PER_LAYER
        assert not [op for op in delegation["portable_ops"] if "quant" in op]
    assert program_adapter_config(manifest).quantize == scheme  # the eager twin is quantized too

    result = compare_engines(tiny_model_dir("llama"), program, tiny_data_dir, steps=3, lr=0.05, eps=1e-2)
    assert result["max_loss_diff"] < LOSS_TOL
    assert result["teacher_forced_max_rel_diff"] < TEACHER_FORCED_REL_TOL
    assert result["free_running"]["adapter_norm_et"] > 0


def test_quantized_program_is_smaller(tiny_program):
    # (external weights with a quantized base: tests/export/test_export.py)
    float32, quantized = tiny_program("llama"), tiny_program("llama", quantize="8da8w")
    assert (quantized / "model.pte").stat().st_size < 0.8 * (float32 / "model.pte").stat().st_size


def test_scheme_a_layer_cannot_take_is_refused_by_name():
    body = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Linear(48, 8))
    check_scheme("8da4w", 16, body)  # 16 divides both widths
    with pytest.raises(QuantizationError, match=r"multiples of the group size; 1 layer\(s\) are not, e.g. 1 \(48\)"):
        check_scheme("8da4w", 32, body)
    check_scheme("8da8w", 32, body)  # per-channel int8: no groups, any width
    with pytest.raises(QuantizationError, match="unknown --quantize"):
        check_scheme("4bit", 32, body)


def test_only_the_bodys_plain_linears_are_quantized():
    from prge.lora import LoRAFALinear

    base = torch.nn.Linear(8, 8)
    body = torch.nn.Sequential(LoRAFALinear(base, 8, 8, rank=2, alpha=4.0, num_copies=2, a_seed=0, a_stream=0),
                               torch.nn.Linear(8, 4))
    names = [name for name, _ in frozen_linears(body)]
    assert names == ["0.base", "1"]  # the adapter's base, not the adapter (its A and B are buffers)


@pytest.mark.parametrize("extra, message", [
    (["--quantize", "8da4w", "--group-size", "48"], "input widths must be multiples of the group size"),
    (["--quantize", "8da8w", "--micro-batch", "2"], "quantized programs run every forward in one pass"),
])
def test_quantize_errors_are_one_line_and_write_nothing(extra, message, tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "program"
    code = main(["export", "--model", str(tiny_model_dir("llama")), "--data", str(tiny_data_dir), "--q", "2",
                 "--batch", "2", "--seq-len", "16", "--out", str(out), *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("prge export: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not out.exists()


def test_noise_floor_compares_each_programs_g_with_float32s(tiny_program, tiny_data_dir, tmp_path, capsys):
    float32, quantized = tiny_program("llama"), tiny_program("llama", quantize="8da4w")
    out = tmp_path / "floor.json"
    assert main(["bench", "--programs", str(float32), str(quantized), "--noise-floor", "--directions", "4",
                 "--data", str(tiny_data_dir), "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["directions"] == 4 and result["eps_grid"][0] == 1e-4
    reference, row = result["programs"][str(float32)], result["programs"][str(quantized)]
    assert (reference["scheme"], row["scheme"]) == ("none", "8da4w")
    assert reference["eps"]["0.0001"]["deviation"] == 0  # the slope is float32's g at the smallest eps
    assert reference["repeat_spread"] == row["repeat_spread"] == 0  # the runtime is deterministic
    deviations = [v["deviation"] for v in row["eps"].values()]
    assert all(d > 0 for d in deviations)  # int4 weights change g at every eps
    for r in (reference, row):
        assert f"{r['best_eps']:g}" == min(r["eps"], key=lambda e: r["eps"][e]["deviation"])
    assert "| program | base | repeat spread |" in capsys.readouterr().out


def test_noise_floor_refuses_programs_of_other_shapes(tiny_program, tiny_data_dir):
    # (the second program is one the suite exports anyway: test_micro_batch_export.py)
    with pytest.raises(ValueError, match="must share q, b and seq-len"):
        noise_floor([str(tiny_program("llama")), str(tiny_program("llama", q=2, batch=4, micro_batch=3))],
                    data=str(tiny_data_dir))


def test_quantized_bases_default_to_the_noise_floors_eps(tiny_program, tmp_path):
    from runtime_driver.commands.cli import _train_eps, build_parser
    from runtime_driver.train import QUANTIZED_EPS, TrainConfig

    parse = build_parser().parse_args
    assert _train_eps(parse(["train"])) == TrainConfig.eps
    assert _train_eps(parse(["train", "--quantize", "8da4w"])) == QUANTIZED_EPS
    assert _train_eps(parse(["train", "--quantize", "8da4w", "--eps", "0.02"])) == 0.02
    # Through ExecuTorch the program's recorded eps is the default (what `prge export` wrote).
    program = tmp_path / "program"
    program.mkdir()
    manifest = json.loads((tiny_program("llama") / "manifest.json").read_text())
    manifest["defaults"]["eps"] = 0.07
    (program / "manifest.json").write_text(json.dumps(manifest))
    assert _train_eps(parse(["train", "--engine", "executorch", "--program", str(program)])) == 0.07
