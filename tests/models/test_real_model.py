"""A few checks on the real default model (SmolLM2-135M-Instruct, prepared offline).

Marked real_model: they need `prge prepare-model` (run here on first use, ~30 s) and take a
few seconds each on 2 cores.
"""
from __future__ import annotations

import pytest
import torch

from models.causal_lm import AdapterConfig, build_step, load_tokenizer
from models.sources.packaged import prepare_model
from models.tasks.folder import load_folder_spec, load_task
from models.tasks.vader_snippets import prepare_data
from runtime_driver.evaluate import evaluate

pytestmark = pytest.mark.real_model
SEQ_LEN = 64


@pytest.fixture(scope="module")
def real():
    model_dir = prepare_model(progress=lambda _: None)
    data_dir = prepare_data(progress=lambda _: None)
    task = load_task(load_folder_spec(data_dir), load_tokenizer(model_dir), data_dir)
    return model_dir, task


def test_zero_shot_is_well_above_chance(real):
    """The dequantized GGUF model works: the prompt alone classifies most reviews (notes: ~81%)."""
    model_dir, task = real
    step = build_step(model_dir, AdapterConfig(num_queries=1), task.label_ids)
    split = task.split("validation", SEQ_LEN, limit=96)
    with torch.no_grad():
        result = evaluate(step.eval_logits, split, 16, fixed_batch=False)
    assert result["accuracy"] > 0.7


def test_parallel_estimate_equals_sequential_on_the_real_model(real):
    """P-RGE's batched 2q copies give MeZO-style sequential losses on the real model too."""
    model_dir, task = real
    step = build_step(model_dir, AdapterConfig(num_queries=2), task.label_ids)
    split = task.split("train", SEQ_LEN, limit=2)
    eps = torch.tensor([1e-2])
    with torch.no_grad():
        step.set_adapter(torch.randn(step.adapter_numel, generator=torch.Generator().manual_seed(0)) * 1e-2)
        parallel = step.train_step(split.input_ids, split.attention_mask, split.labels, torch.tensor([0]),
                                   torch.tensor([7]), torch.zeros(2), torch.zeros(1), eps)
        sequential = step.sequential_losses(split.input_ids, split.attention_mask, split.labels, torch.tensor([7]), eps)
    assert torch.allclose(parallel, sequential, atol=2e-5)
    assert (parallel[:2] - parallel[2:]).abs().max() > 1e-4  # the perturbations really change the loss


def test_kv_cache_decoding_equals_hugging_face_generate_on_the_real_model(real, randomize_adapter, tmp_path):
    """The generation program's module (prefill + 31 decode calls against its static cache)
    gives the 32 greedy tokens of Hugging Face's generate on the model with the adapter merged."""
    from models.cached_decoder import CachedDecoder, greedy_tokens
    from models.peft_io import save_peft_adapter
    from runtime_driver.generate import hugging_face_greedy

    model_dir, _ = real
    adapter = AdapterConfig(num_queries=1, loss="lm")
    step = build_step(model_dir, adapter, [])
    flat = randomize_adapter(step, seed=1, scale=0.02)  # moves the logits without wrecking the model
    tokenizer = load_tokenizer(model_dir)
    prompt = tokenizer("Word: lantern\nPronunciation:")["input_ids"]
    window, new_tokens = 16, 32
    decoder = CachedDecoder(step, window + new_tokens).eval()
    ours = greedy_tokens(decoder, prompt, window, new_tokens)
    step.set_adapter(torch.zeros_like(flat))
    assert greedy_tokens(decoder, prompt, window, new_tokens) != ours  # the adapter changes the text: the LoRA path is exercised

    peft_dir = save_peft_adapter(tmp_path / "peft", step.slots, flat, rank=adapter.rank, alpha=adapter.alpha,
                                 a_seed=adapter.a_seed, targets=adapter.targets, base_model=str(model_dir))
    assert ours == hugging_face_greedy(model_dir, peft_dir, prompt, new_tokens, stop=False)
