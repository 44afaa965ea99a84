"""Phone-scale models with random weights: the published shapes of Qwen2.5-0.5B and Llama-3.2-1B.

Memory and speed depend on a model's shapes (layers, widths, heads, vocabulary, tied
embeddings), not on its weights, so these folders measure what training a 0.5B or 1B model
costs without downloading one (the Hub is never used). Their configs copy the published
config.json of each model (sizes, grouped-query heads, rope settings, norms, tied embeddings);
the weights are Hugging Face's random initialization (seeded) and the tokenizer is prge's tiny
one (models/sources/tiny.py), whose ids all lie inside the real vocabulary, so the embedding
and head keep their full published size. Accuracy on such a model means nothing; real-weight
accuracy stays on the real models (models/sources/packaged.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from models.console import say
from models.files import replace_dir_atomically

SOURCE_MARKER = "prge_source.json"

# From each model's published config.json (Qwen/Qwen2.5-0.5B, meta-llama/Llama-3.2-1B).
PUBLISHED_SHAPES: dict[str, dict[str, Any]] = {
    "random-qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu",
        use_sliding_window=False, sliding_window=None, bos_token_id=151643, eos_token_id=151643,
    ),
    "random-llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, hidden_act="silu", attention_bias=False, mlp_bias=False,
        bos_token_id=128000, eos_token_id=128001,
    ),
}


def published_config(name: str, **overrides: Any):
    """The PretrainedConfig of a published shape (overrides: e.g. fewer layers for a test)."""
    from transformers import AutoConfig

    if name not in PUBLISHED_SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose from {', '.join(PUBLISHED_SHAPES)}")
    kw = {**PUBLISHED_SHAPES[name], **overrides}
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def make_random_model_dir(name: str, out_dir: Path, seed: int = 0, progress: Callable[[str], object] = say,
                          **overrides: Any) -> Path:
    """Write a random-weight model of a published shape to out_dir (atomically) and return it.

    Weights are saved in bfloat16 (half the disk of float32; prge loads them as float32), and
    the tiny tokenizer's pad/bos/eos ids are used, all inside the real vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM

    from models.sources.tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    config = published_config(name, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, **overrides)
    began = time.monotonic()
    progress(f"Building {name} with random weights (seed {seed}) ...")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    with replace_dir_atomically(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {"name": name, "weights": f"random (torch.manual_seed({seed})), bfloat16 on disk",
                  "shape_of": "published config.json", "num_parameters": n_params, "overrides": overrides}
        (tmp / SOURCE_MARKER).write_text(json.dumps(source, indent=2) + "\n")
    progress(f"{name} ready at {out_dir} ({n_params / 1e6:.0f}M parameters, {time.monotonic() - began:.0f} s)")
    return Path(out_dir)
