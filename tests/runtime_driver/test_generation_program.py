"""Generation programs (`prge export --generate`): the KV-cache decoder against Hugging Face's
generate on the model with the adapter merged, the exported program against the eager decoder,
`prge generate` on both kinds of program, and the errors a user can run into."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from export.contract.manifest import GENERATION, ManifestError, read_manifest
from models.cached_decoder import CachedDecoder, greedy_tokens
from models.causal_lm import AdapterConfig, ModelError, build_step
from models.peft_io import save_peft_adapter
from runtime_driver.commands.cli import main
from runtime_driver.generate import CachedGenerator, generate, hugging_face_greedy

PREFILL_LEN, CACHE_LEN = 16, 40  # conftest TINY_PREFILL_LEN, TINY_CACHE_LEN: tiny_generation_program's

NEW_TOKENS = 20
PROMPT = [5, 9, 17, 33, 40, 41, 7, 12, 60]  # longer than the tiny configs' 4-token sliding window


def _eager_greedy(decoder: CachedDecoder, prompt: list[int], new_tokens: int) -> list[int]:
    return greedy_tokens(decoder, prompt, PREFILL_LEN, new_tokens)


def _decoder_with_random_adapter(model_dir: Path, randomize_adapter, seed: int = 3):
    adapter = AdapterConfig(num_queries=1, rank=4, loss="lm")
    step = build_step(model_dir, adapter, [])
    flat = randomize_adapter(step, seed=seed, scale=0.5)  # B = 0 would hide the LoRA path
    return CachedDecoder(step, CACHE_LEN).eval(), step, adapter, flat


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3", "opt", "gpt2"])
def test_the_kv_cache_decoder_equals_hugging_face_generate_on_the_merged_adapter(family, tiny_model_dir, randomize_adapter,
                                                                                 tmp_path):
    """Greedy tokens through prefill + decode with a static cache equal HF generate (its own
    cache) on the model with the PEFT adapter merged into its weights, for families with
    absolute positions (OPT, GPT-2), rotary ones, and Gemma 3's sliding-window layers."""
    model_dir = tiny_model_dir(family)
    decoder, step, adapter, flat = _decoder_with_random_adapter(model_dir, randomize_adapter)
    peft_dir = save_peft_adapter(tmp_path / "peft", step.slots, flat, rank=4, alpha=adapter.alpha, a_seed=adapter.a_seed,
                                 targets=adapter.targets, base_model=str(model_dir))
    ours = _eager_greedy(decoder, PROMPT, NEW_TOKENS)
    assert ours == hugging_face_greedy(model_dir, peft_dir, PROMPT, NEW_TOKENS, stop=False)


@pytest.fixture(scope="module")
def generation_program(tiny_generation_program) -> Path:
    return tiny_generation_program


def test_the_generation_program_decodes_what_the_eager_decoder_decodes(generation_program, tiny_model_dir,
                                                                       randomize_adapter):
    """Through the ExecuTorch runtime: the same logits (to float rounding) and the same greedy
    tokens as the eager CachedDecoder, twice in a row on one loaded program (a new prefill
    starts over, whatever the cache holds from the last generation)."""
    manifest = read_manifest(generation_program)
    assert manifest["kind"] == GENERATION and manifest["shapes"]["cache_len"] == CACHE_LEN
    decoder, _, _, flat = _decoder_with_random_adapter(tiny_model_dir("llama"), randomize_adapter, seed=5)
    program = CachedGenerator(generation_program)
    program.set_adapter(flat)
    ids = torch.zeros(1, PREFILL_LEN, dtype=torch.int64)
    ids[0, : len(PROMPT)] = torch.tensor(PROMPT)
    with torch.no_grad():
        eager_logits = decoder.prefill(ids, torch.tensor([len(PROMPT)]))
    et_logits = program.prefill(PROMPT)
    assert torch.allclose(et_logits, eager_logits, rtol=1e-4, atol=1e-4)
    expected = _eager_greedy(decoder, PROMPT, NEW_TOKENS)
    for _ in range(2):
        streamed: list[int] = []
        result = program.greedy(PROMPT, NEW_TOKENS, streamed.append)
        assert result["tokens"] == streamed == expected
    assert result["decode_tokens_per_s"] > 0 and result["prefill_tokens_per_s"] > 0


def test_generation_stops_when_the_cache_is_full(generation_program):
    program = CachedGenerator(generation_program)
    prompt = list(range(5, 5 + PREFILL_LEN))
    result = program.greedy(prompt, 1000, lambda _: None)
    assert len(result["tokens"]) <= CACHE_LEN - PREFILL_LEN + 1
    program.stop_ids = set()  # no early stop: the cache alone ends it
    assert len(program.greedy(prompt, 1000, lambda _: None)["tokens"]) == CACHE_LEN - PREFILL_LEN + 1


def test_prge_generate_runs_a_trained_adapter_on_both_kinds_of_program(generation_program, tiny_completion_program,
                                                                        tiny_model_dir, randomize_adapter, tmp_path,
                                                                        capsys):
    """A PEFT adapter written for the completion program's layout decodes the same greedy text
    through the generation program (KV cache) as through the training program (window)."""
    from runtime_driver.engines import ExecuTorchPRGE

    training = ExecuTorchPRGE(tiny_completion_program)
    step = build_step(tiny_model_dir("llama"), AdapterConfig(num_queries=1, rank=4, loss="lm", targets=training.adapter.targets), [])
    flat = randomize_adapter(step, seed=7, scale=0.5)
    peft_dir = save_peft_adapter(tmp_path / "adapter", step.slots, flat, rank=4, alpha=training.adapter.alpha,
                                 a_seed=training.adapter.a_seed, targets=training.adapter.targets,
                                 base_model=str(tiny_model_dir("llama")))
    cached = generate(generation_program, "the film was fun", peft_dir, max_new_tokens=6)
    window = generate(tiny_completion_program, "the film was fun", peft_dir, max_new_tokens=6)
    assert cached["kv_cache"] and not window["kv_cache"]
    assert cached["tokens"] == window["tokens"] and cached["text"] == window["text"]

    assert main(["generate", "--program", str(generation_program), "--adapter", str(peft_dir), "--prompt",
                 "the film was fun", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == cached["text"].strip()
    assert "prefill" in out.err and "decode" in out.err


def test_a_generation_program_refuses_to_train_and_bad_manifests_are_refused(generation_program, tmp_path, capsys):
    from runtime_driver.engines import ExecuTorchPRGE

    with pytest.raises(ManifestError, match="generation program"):
        ExecuTorchPRGE(generation_program)
    manifest = json.loads((generation_program / "manifest.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    manifest["shapes"]["cache_len"] = PREFILL_LEN
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="cache_len"):
        read_manifest(broken)
    manifest["shapes"]["cache_len"], manifest["methods"] = CACHE_LEN, ["prefill", "decode"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="methods"):
        read_manifest(broken)


def test_a_generation_export_checks_its_lengths_before_any_work(tiny_model_dir, tiny_completion_data_dir, tmp_path):
    from export.pipeline import export_generation_program
    from models.tasks.folder import load_folder_spec

    task = load_folder_spec(tiny_completion_data_dir)
    with pytest.raises(ModelError, match="--cache-len 100000 exceeds"):
        export_generation_program(tiny_model_dir("llama"), task, AdapterConfig(rank=4), 16, 100_000, tmp_path / "a")
    with pytest.raises(ModelError, match="below --cache-len"):
        export_generation_program(tiny_model_dir("llama"), task, AdapterConfig(rank=4), 32, 32, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_adapter_of_another_rank_is_refused(generation_program, tiny_model_dir, tmp_path):
    step = build_step(tiny_model_dir("llama"), AdapterConfig(num_queries=1, rank=2, loss="lm"), [])
    peft_dir = save_peft_adapter(tmp_path / "r2", step.slots, step.get_adapter(), rank=2, alpha=16.0, a_seed=0,
                                 targets=["q_proj", "v_proj"], base_model=str(tiny_model_dir("llama")))
    with pytest.raises(ValueError, match="rank"):
        generate(generation_program, "hello", peft_dir)


def test_a_quantized_generation_program_decodes_like_its_eager_twin(tiny_model_dir, tiny_completion_data_dir,
                                                                   randomize_adapter, tmp_path):
    """--quantize 8da4w (int4 frozen linears, the phone-sized setting): the program's greedy
    tokens equal the eager quantized decoder's. XNNPACK's int8 kernels do not round like
    torchao's reference, so the logits agree only to a stated tolerance."""
    from export.pipeline import export_generation_program
    from models.tasks.folder import load_folder_spec

    settings = dict(rank=4, quantize="8da4w", group_size=32)
    export_generation_program(tiny_model_dir("llama"), load_folder_spec(tiny_completion_data_dir), AdapterConfig(**settings),
                              PREFILL_LEN, CACHE_LEN, tmp_path / "q", progress=lambda _: None)
    assert read_manifest(tmp_path / "q")["model"]["quantization"]["scheme"] == "8da4w"
    step = build_step(tiny_model_dir("llama"), AdapterConfig(num_queries=1, loss="lm", **settings), [])
    flat = randomize_adapter(step, seed=5, scale=0.5)
    decoder = CachedDecoder(step, CACHE_LEN).eval()
    program = CachedGenerator(tmp_path / "q")
    program.set_adapter(flat)
    ids = torch.zeros(1, PREFILL_LEN, dtype=torch.int64)
    ids[0, : len(PROMPT)] = torch.tensor(PROMPT)
    with torch.no_grad():
        eager_logits = decoder.prefill(ids, torch.tensor([len(PROMPT)]))
    assert (program.prefill(PROMPT) - eager_logits).abs().max() < 0.05 * eager_logits.abs().max()
    assert program.greedy(PROMPT, NEW_TOKENS, lambda _: None)["tokens"] == _eager_greedy(decoder, PROMPT, NEW_TOKENS)


def test_a_sliding_window_familys_generation_program_decodes_like_eager(tiny_model_dir, tiny_completion_data_dir,
                                                                       randomize_adapter, tmp_path):
    """Gemma 3's sliding-window layers (window 4 in the tiny config) keep every position in the
    program's cache and rely on the mask; 25 tokens past a 9-token prompt go well beyond the window."""
    from export.pipeline import export_generation_program
    from models.tasks.folder import load_folder_spec

    model_dir = tiny_model_dir("gemma3_text")
    export_generation_program(model_dir, load_folder_spec(tiny_completion_data_dir), AdapterConfig(rank=4), PREFILL_LEN,
                              CACHE_LEN, tmp_path / "g", progress=lambda _: None)
    decoder, _, _, flat = _decoder_with_random_adapter(model_dir, randomize_adapter, seed=5)
    program = CachedGenerator(tmp_path / "g")
    program.set_adapter(flat)
    program.stop_ids = set()  # exactly as many tokens as the eager reference
    assert program.greedy(PROMPT, 25, lambda _: None)["tokens"] == _eager_greedy(decoder, PROMPT, 25)
