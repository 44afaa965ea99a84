"""`prge bench` end to end on a tiny model: every key of the performance issue, sane structure,
and a second run served from the program cache. Timings are never asserted."""
from __future__ import annotations

import json
import math

import pytest

from runtime_driver.commands.bench import TARGETS
from runtime_driver.commands.cli import main

ENGINES = {"executorch_prge", "eager_prge", "eager_first_order", "eager_first_order_ckpt_mb1", "executorch_inference"}
ISSUE_KEYS = {"parallel_speedup", "step_overhead", "et_vs_eager", "peak_rss_mb", "tokens_per_s", "steps_per_s"}


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_emits_every_key_and_reuses_cached_programs(tiny_model_dir, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "bench.json"
    args = ["bench", "--model", str(tiny_model_dir("llama")), "--quick", "--seq-len", "16", "--threads", "1",
            "--cache", str(cache)]
    assert main([*args, "--q", "1,2", "--profile", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert ISSUE_KEYS <= set(result)
    assert set(result["parallel_speedup"]) == {"1", "2"}
    assert all(set(row) == {"1"} and _positive(row["1"]) for row in result["parallel_speedup"].values())
    for key in ("step_overhead", "et_vs_eager", "tokens_per_s", "steps_per_s"):
        assert _positive(result[key]), key
    assert set(result["peak_rss_mb"]) == {"1", "2"}
    for row in result["peak_rss_mb"].values():
        assert set(row) == ENGINES and all(_positive(v) for v in row.values())
    assert set(result["targets"]) == set(TARGETS)
    assert result["threads"] == {"torch": 1, "executorch": 1}
    assert result["machine"]["cores"] >= 1 and result["date"].endswith("Z")
    # Which CPU and software a ratio comes from (it does not carry over to another machine).
    assert result["machine"]["cpu"] and isinstance(result["machine"]["vector_extensions"], list)
    assert {"torch", "executorch", "transformers", "peft"} <= set(result["machine"]["versions"])
    assert set(result["targets"]["prge_rss_over_lean_first_order_b64"]) == {"value", "target", "met"}
    # tokens_per_s is 2q*b*T sequences' tokens over the same step time as steps_per_s
    assert math.isclose(result["tokens_per_s"], 2 * 1 * 1 * 16 * result["steps_per_s"], rel_tol=1e-2)
    assert result["export_seconds"]  # the first run exported
    printed = capsys.readouterr().out
    assert "parallel_speedup" in printed and "ETDump profile" in printed  # the human tables
    # The op table accounts for the whole call: its rows add up to Method::execute.
    profile = result["profile"]
    assert profile["method"] == "train_step" and 0 < profile["execute_ms"] <= profile["wall_ms"]
    assert abs(sum(r["ms"] for r in profile["ops"]) - profile["execute_ms"]) < 0.01 * len(profile["ops"])
    ops = {r["op"] for r in profile["ops"]}
    assert any(op.startswith("xnnpack: ") for op in ops) and any(op.startswith("native_call_") for op in ops)

    assert main([*args, "--no-rss", "--json", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["export_seconds"] == {}  # every program came from the cache
    assert again["peak_rss_mb"] == {} and again["profile"] is None


def test_programs_are_timed_against_each_other(tiny_program, tmp_path, capsys):
    float32, quantized = tiny_program("llama"), tiny_program("llama", quantize="8da8w")
    out = tmp_path / "programs.json"
    assert main(["bench", "--programs", str(float32), str(quantized), "--reps", "2", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["programs"]) == {str(float32), str(quantized)}
    for row in result["programs"].values():
        assert _positive(row["train_step_ms"]) and _positive(row["eval_logits_ms"])
        assert row["step_overhead"] == pytest.approx(row["train_step_ms"] / row["eval_logits_ms"], rel=0.02)
        assert _positive(row["peak_rss_train_step_mb"]) and _positive(row["program_mb"])
        assert _positive(row["planned_arena_mb"]["train_step"]) and "mutable_buffers" in row["planned_arena_mb"]
    first, second = result["programs"][str(float32)], result["programs"][str(quantized)]
    assert (first["quantization"], second["quantization"]) == ("none", "8da8w")
    assert first["train_step_vs_first"] == first["rss_vs_first"] == 1.0
    assert second["rss_vs_first"] == pytest.approx(second["peak_rss_train_step_mb"] / first["peak_rss_train_step_mb"], rel=0.01)
    assert result["machine"]["cpu"] and result["threads"] == 1
    assert first["estimator"] == second["estimator"] == "spsa"
    printed = capsys.readouterr().out
    assert f"| {quantized} | P-RGE | 8 | 8da8w | spsa |" in printed  # the human table (2q*b rows a step)
    assert [p["phase"] for p in first["rss_phases"]] == ["imports (Python, torch, the runtime)",
                                                         "program loaded (train_step)", "step 1", "step 2"]
    assert f"| {float32} | step 2 | " in printed


def test_families_report_export_time_and_islands_from_their_manifests(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "families.json"
    assert main(["bench", "--families", "gpt2,gemma3_text", "--demo", "1,1", "--seq-len", "16",
                 "--cache", str(cache), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"] == {"q": 1, "b": 1, "seq_len": 16, "tiny": "2 layers, width 64, random weights"}
    rows = {r["family"]: r for r in result["families"]}
    assert list(rows) == ["gpt2", "gemma3_text"]
    for family, row in rows.items():
        manifest = json.loads((cache / "families" / family / "program" / "manifest.json").read_text())
        assert row["export_s"] == manifest["export_seconds"]["total_s"] > 0
        for method in ("train_step", "eval_logits"):
            assert row[method]["delegated_subgraphs"] == manifest["delegation"][method]["delegated_subgraphs"] >= 1
            assert row[method]["portable_nodes"] == manifest["delegation"][method]["portable_nodes"]
        assert manifest["model"]["model_type"] == row["model_type"] == family
    assert rows["gpt2"]["rms_norms_rewritten"] == {}  # LayerNorm family: nothing to rewrite
    assert rows["gemma3_text"]["rms_norms_rewritten"] == {"1 + weight": 2 * 6 + 1}  # 4 + q/k norms per layer, final
    table = capsys.readouterr().out
    assert "| gpt2 | gpt2 |" in table and "| gemma3_text | gemma3_text |" in table


def test_families_refuse_an_unknown_family(tmp_path, capsys):
    assert main(["bench", "--families", "llama,nosuch", "--cache", str(tmp_path)]) == 2
    assert "unknown tiny family 'nosuch'" in capsys.readouterr().err
