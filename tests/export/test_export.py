"""The exported program against the eager reference: every tiny family, shared state, resume,
PEFT parity, external weights, and clear export errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from export.contract.manifest import REQUIRED_KEYS, ManifestError, program_code_version, read_manifest, slots_from_json
from export.contract.methods import step_scalars
from models.peft_io import save_peft_adapter
from models.sources.tiny import TINY_FAMILIES
from runtime_driver.commands.cli import main
from runtime_driver.commands.compare import TEACHER_FORCED_REL_TOL, compare_engines
from runtime_driver.engines import ExecuTorchPRGE, program_adapter_config
from runtime_driver.run import eager_engine, program_task
from runtime_driver.train import TrainConfig, train_zero_order

LOSS_TOL = 1e-5  # XNNPACK vs eager float32 rounding on per-copy mean losses


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_exports_and_matches_eager(family, tiny_program, tiny_model_dir, tiny_data_dir):
    program = tiny_program(family)
    result = compare_engines(tiny_model_dir(family), program, tiny_data_dir, steps=3, lr=0.05, eps=1e-2)
    assert result["max_loss_diff"] < LOSS_TOL
    assert result["teacher_forced_max_rel_diff"] < TEACHER_FORCED_REL_TOL
    assert result["free_running"]["adapter_norm_et"] > 0  # it really trained


def test_an_fzoo_program_matches_eager(tiny_program, tiny_model_dir, tiny_data_dir):
    """Rademacher noise drawn inside the program and g normalized by the drivers: the same
    numbers in both engines (plain-g and Gaussian estimators are the default program's)."""
    program = tiny_program("llama", estimator="fzoo")
    manifest = read_manifest(program)
    assert manifest["estimator"] == {"name": "fzoo", "noise": "rademacher", "normalize": True}
    assert manifest["prng_version"] == "lowbias32x2-sign-v1"
    result = compare_engines(tiny_model_dir("llama"), program, tiny_data_dir, steps=3, lr=0.05, eps=1e-2)
    assert result["max_loss_diff"] < LOSS_TOL
    assert result["teacher_forced_max_rel_diff"] < TEACHER_FORCED_REL_TOL
    assert result["free_running"]["adapter_norm_et"] > 0


def test_a_manifest_whose_estimator_does_not_match_its_noise_is_refused(tiny_program, tmp_path):
    program = shutil.copytree(tiny_program("llama", estimator="fzoo"), tmp_path / "program")
    manifest = json.loads((program / "manifest.json").read_text())
    manifest["estimator"]["name"] = "spsa"  # a Gaussian estimator on a Rademacher program
    (program / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="estimator"):
        read_manifest(program)


def test_train_refuses_another_estimator_than_the_programs(tiny_program, tiny_data_dir, tmp_path, capsys):
    code = main(["train", "--engine", "executorch", "--program", str(tiny_program("llama", estimator="fzoo")),
                 "--data", str(tiny_data_dir), "--estimator", "spsa", "--batch", "2", "--steps", "1",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert "exported with --estimator fzoo" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _eager_twin(program, model_dir):
    manifest = read_manifest(program)
    return eager_engine(model_dir, program_adapter_config(manifest), manifest["task"]["label_token_ids"],
                        manifest["shapes"]["seq_len"])


def test_methods_share_one_adapter_state(tiny_program, tiny_model_dir, tiny_batch):
    program = tiny_program("llama")
    et = ExecuTorchPRGE(program)
    eager = _eager_twin(program, tiny_model_dir("llama"))
    adapter = torch.randn(et.adapter_numel, generator=torch.Generator().manual_seed(0)) * 0.05
    et.set_adapter(adapter)
    eager.set_adapter(adapter)
    assert torch.equal(et.get_adapter(), adapter)  # set_adapter -> get_adapter
    ids, mask, labels = tiny_batch(b=et.eval_batch_size)
    # set_adapter -> eval_logits: the evaluation sees the adapter that was set
    assert torch.allclose(et.eval_logits(ids, mask), eager.eval_logits(ids, mask), atol=1e-5)
    # train_step applies the folded update to the same state get_adapter reads
    ids, mask, labels = tiny_batch(b=et.batch_size)
    for engine in (et, eager):
        engine.train_step(ids, mask, labels, 5, 6, [0.3, -0.7], 0.1, 1e-2)
    assert not torch.equal(et.get_adapter(), adapter)
    assert torch.allclose(et.get_adapter(), eager.get_adapter(), rtol=0, atol=1e-6)
    # apply_update -> get_adapter
    for engine in (et, eager):
        engine.apply_update(6, [1.0, 2.0], 0.05)
    assert torch.allclose(et.get_adapter(), eager.get_adapter(), rtol=0, atol=1e-6)


def test_a_step_after_a_step_reads_the_directions_the_program_kept(tiny_program, tiny_batch):
    """In the runtime too: a train_step right after another updates along the directions that
    call kept (the program's torch.cond takes the kept branch: the ETDump shows only the new
    directions' Gaussian draw) and gives the same step bit for bit as a fresh program that draws
    them again."""
    from runtime_driver.commands.op_profile import profile_call

    program = tiny_program("llama")
    chained, fresh = ExecuTorchPRGE(program), ExecuTorchPRGE(program)
    adapter = torch.randn(chained.adapter_numel, generator=torch.Generator().manual_seed(0)) * 0.05
    ids, mask, labels = tiny_batch(b=chained.batch_size)
    for engine in (chained, fresh):
        engine.set_adapter(adapter)
    chained.train_step(ids, mask, labels, 5, 6, [0.0, 0.0], 0.1, 1e-2)  # g = 0: B unchanged, 6 kept
    kept = chained.train_step(ids, mask, labels, 6, 7, [0.3, -0.7], 0.1, 1e-2)
    drawn = fresh.train_step(ids, mask, labels, 6, 7, [0.3, -0.7], 0.1, 1e-2)
    assert torch.equal(kept, drawn)
    assert torch.equal(chained.get_adapter(), fresh.get_adapter())
    assert not torch.equal(chained.get_adapter(), adapter)

    def log_calls(prev_seed: int) -> int:  # the Box-Muller logs of one call, after one warm-up call
        inputs = [ids, mask, labels, *step_scalars(prev_seed, 2, [0.1, 0.1], 1e-3, 1e-2)]
        ops = profile_call(program, "train_step", inputs, warmup=1)["ops"]
        return sum(row["calls"] for row in ops if row["op"] == "native_call_log.out")

    assert log_calls(prev_seed=2) == 1  # the warm-up kept 2: only the new directions are drawn (one block)
    assert log_calls(prev_seed=1) == 1 + 2  # 1 is never kept: the update draws its 2 one at a time


class _Crash(Exception):
    pass


class _CrashingEngine:
    """Delegates to an engine and raises at a given step (a killed app)."""

    def __init__(self, inner, crash_at: int):
        self.inner, self.crash_at, self.calls = inner, crash_at, 0
        self.num_queries = inner.num_queries

    def train_step(self, *args):
        if self.calls == self.crash_at:
            raise _Crash()
        self.calls += 1
        return self.inner.train_step(*args)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_resume_equals_uninterrupted_run(tiny_program, tiny_data_dir, tmp_path):
    program = tiny_program("llama")
    task = program_task(program, read_manifest(program), tiny_data_dir)
    train = task.split("train", 16)
    cfg = TrainConfig(steps=7, batch_size=2, lr=0.05, eps=1e-2, eval_every=0, checkpoint_every=3)
    no_eval = lambda: {"accuracy": 0.0, "loss": 0.0}  # noqa: E731

    whole = ExecuTorchPRGE(program)
    train_zero_order(whole, train, no_eval, cfg, tmp_path / "a", num_labels=2, quiet=True)

    with pytest.raises(_Crash):
        train_zero_order(_CrashingEngine(ExecuTorchPRGE(program), crash_at=5), train, no_eval, cfg, tmp_path / "b",
                         num_labels=2, quiet=True)
    resumed = ExecuTorchPRGE(program)  # a fresh process would load the program anew
    train_zero_order(resumed, train, no_eval, cfg, tmp_path / "b", num_labels=2, resume=True, quiet=True)
    assert torch.equal(whole.get_adapter(), resumed.get_adapter())
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == list(range(7))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_peft_adapter_predicts_like_the_program(family, tiny_program, tiny_model_dir, tiny_data_dir, tmp_path):
    """The trained adapter as a PEFT folder, on the unmodified Hugging Face model, predicts what
    the program predicts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    program = tiny_program(family)
    manifest = read_manifest(program)
    et = ExecuTorchPRGE(program)
    task = program_task(program, manifest, tiny_data_dir)
    cfg = TrainConfig(steps=6, batch_size=2, lr=0.2, eps=1e-2, eval_every=0)
    train_zero_order(et, task.split("train", 16), lambda: {"accuracy": 0.0, "loss": 0.0}, cfg, tmp_path / "run",
                     num_labels=2, quiet=True)
    adapter = program_adapter_config(manifest)
    save_peft_adapter(tmp_path / "adapter", slots_from_json(manifest["adapter"]["slots"]), et.get_adapter(),
                      rank=adapter.rank, alpha=adapter.alpha, a_seed=adapter.a_seed, targets=adapter.targets,
                      base_model=str(tiny_model_dir(family)))
    assert float(et.get_adapter().abs().max()) > 0  # it trained
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir(family)), attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    split = task.split("validation", 16).head(et.eval_batch_size)
    ids, mask = split.input_ids, split.attention_mask
    position_ids = torch.clamp(torch.cumsum(mask, 1) - 1, min=0)
    with torch.no_grad():
        logits = peft_model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
    peft_label_logits = logits[:, manifest["task"]["label_token_ids"]]
    et_logits = et.eval_logits(ids, mask)
    assert torch.allclose(peft_label_logits, et_logits, atol=1e-4)
    assert torch.equal(peft_label_logits.argmax(1), et_logits.argmax(1))


@pytest.mark.parametrize("quantize", ["none", "8da8w"])
def test_external_weights_program_matches_embedded(quantize, tiny_program, tiny_batch):
    embedded = tiny_program("llama", quantize=quantize)
    external = tiny_program("llama", external=True, quantize=quantize)
    assert (external / "model.ptd").is_file()
    assert (external / "model.pte").stat().st_size < (embedded / "model.pte").stat().st_size
    a, b = ExecuTorchPRGE(embedded), ExecuTorchPRGE(external)
    # Loaded from paths, the runtime maps the files (shared, read-only) rather than reading them
    # into private memory: the frozen weights cost page cache the kernel can drop and share.
    shared = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
              if len(line.split()) == 6 and line.split()[1].endswith("s")}
    assert {str(embedded / "model.pte"), str(external / "model.pte"), str(external / "model.ptd")} <= shared
    ids, mask, labels = tiny_batch(b=2)
    assert torch.equal(a.train_step(ids, mask, labels, 1, 2, [0.0, 0.0], 0.0, 1e-2),
                       b.train_step(ids, mask, labels, 1, 2, [0.0, 0.0], 0.0, 1e-2))


def test_manifest_has_what_a_driver_needs(tiny_program):
    manifest = read_manifest(tiny_program("llama"))
    assert set(REQUIRED_KEYS) <= set(manifest)
    assert manifest["delegation"]["train_step"]["delegated_nodes"] > 0
    assert manifest["adapter"]["numel"] == sum(s["shape"][0] * s["shape"][1] for s in manifest["adapter"]["slots"])
    assert manifest["tokenizer"]["file"] == "tokenizer.json" and len(manifest["tokenizer"]["sha256"]) == 64
    assert manifest["versions"]["executorch"] == "1.5.1" and manifest["versions"]["torch"].startswith("2.13.0")
    assert set(manifest["versions"]) >= {"transformers", "peft", "torchao"}
    assert manifest["code_version"] == program_code_version()  # what the demo checks before reusing it


def test_code_version_changes_with_the_traced_code(tmp_path, monkeypatch):
    import export.contract.manifest as manifest_module

    for package in manifest_module.PROGRAM_SOURCES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(manifest_module, "_REPO_ROOT", tmp_path)
    before = program_code_version()
    (tmp_path / "prge" / "a.py").write_text("x = 2\n")
    assert program_code_version() != before


def test_corrupted_program_is_refused(tiny_program, tmp_path):
    copy = tmp_path / "program"
    shutil.copytree(tiny_program("llama"), copy)
    pte = copy / "model.pte"
    pte.write_bytes(pte.read_bytes()[: pte.stat().st_size // 2])
    with pytest.raises(ManifestError, match="does not match"):
        ExecuTorchPRGE(copy)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--targets", "nonexistent_proj"], "matches no module"),
        (["--seq-len", "100000"], "exceeds the model"),
        (["--seq-len", "2"], "too short"),
    ],
)
def test_export_errors_are_clear_and_write_nothing(extra, message, tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["export", "--model", str(tiny_model_dir("llama")), "--data", str(tiny_data_dir), "--out", str(out), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_multi_token_label_word_is_rejected(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    (data / "task.json").write_text(json.dumps({"template": "Review: {text}\nSentiment:",
                                                "labels": {"negative": " negative", "positive": " absolutely wonderful"}}))
    code = main(["export", "--model", str(tiny_model_dir("llama")), "--data", str(data), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "single token" in capsys.readouterr().err


def test_architecture_prge_cannot_reproduce_is_rejected(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """Llama weights under a BERT config load (as a BERT LM head model, mostly untrained), but
    prge's forward of it is not Hugging Face's: the parity check stops the export, nothing written."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "bert"
    (model / "config.json").write_text(json.dumps(config))
    code = main(["export", "--model", str(model), "--data", str(tiny_data_dir), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "'bert' model gives other next-token logits than Hugging Face's" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
