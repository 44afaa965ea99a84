"""Random-weight models of published shapes: the configs reproduce the published models' parameter
counts exactly, and a folder built from one loads, passes prge's parity check and is found by name."""
from __future__ import annotations

import json

import pytest
import torch

from models.causal_lm import AdapterConfig, build_step
from models.sources.published_shapes import PUBLISHED_SHAPES, SOURCE_MARKER, make_random_model_dir, published_config

# The parameter counts the model cards publish (Qwen2.5-0.5B: 0.49B; Llama-3.2-1B: 1.24B), exactly.
PUBLISHED_PARAMETERS = {"random-qwen2.5-0.5b": 494_032_768, "random-llama-3.2-1b": 1_235_814_400}


@pytest.mark.parametrize("name", sorted(PUBLISHED_SHAPES))
def test_config_has_the_published_parameter_count_and_tied_head(name):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory for the weights
        model = AutoModelForCausalLM.from_config(published_config(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_a_built_folder_loads_and_matches_hugging_face(tmp_path):
    # The published Llama 3.2 shape shrunk to test size; everything else (rope scaling, heads) kept.
    small = dict(num_hidden_layers=1, hidden_size=128, intermediate_size=256, vocab_size=1024)
    out = make_random_model_dir("random-llama-3.2-1b", tmp_path / "m", progress=lambda _: None, **small)
    source = json.loads((out / SOURCE_MARKER).read_text())
    assert source["name"] == "random-llama-3.2-1b" and source["overrides"] == small
    config = json.loads((out / "config.json").read_text())
    rope = config["rope_parameters"]  # transformers 5 keeps rope_scaling and rope_theta here
    assert (rope["rope_type"], rope["factor"], rope["rope_theta"]) == ("llama3", 32.0, 500000.0)
    assert config["num_key_value_heads"] == 8
    step = build_step(out, AdapterConfig(num_queries=1), [5, 6])  # raises unless prge's forward equals HF's
    assert step.rewrites.parity is not None and step.rewrites.parity <= 1e-5


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="unknown shape 'random-gpt5'"):
        published_config("random-gpt5")
