"""The int8 input embedding (models/quantize.py) against each family's unmodified embedding
module, and what a quantized step keeps of the output head."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from models.causal_lm import AdapterConfig, build_step
from models.quantize import Int8RowEmbedding, QuantizationError, quantize_input_embedding
from models.sources.tiny import TINY_FAMILIES


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_int8_rows_are_the_families_own_rows_within_half_a_step(family, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), dtype=torch.float32).eval()
    backbone = getattr(model, model.base_model_prefix)
    original = backbone.get_input_embeddings()
    ids = torch.arange(original.num_embeddings).reshape(1, -1)
    with torch.no_grad():
        expected = original(ids)
    quantize_input_embedding(backbone, ids[:, :50])
    new = backbone.get_input_embeddings()
    assert isinstance(new, Int8RowEmbedding) and new.weight_int8.dtype == torch.int8
    with torch.no_grad():
        got = new(ids)
    # Every row of the vocabulary, not only the probe's: within half of its own int8 step
    # (times the family's multiplier, Gemma's sqrt(hidden)), and not trivially equal.
    multiplier = 1.0 if new.multiplier is None else float(new.multiplier)
    half_step = new.row_scale.reshape(1, -1, 1) / 2 * abs(multiplier)
    assert ((got - expected).abs() <= half_step * (1 + 1e-5)).all()
    assert not torch.equal(got, expected)


def test_an_embedding_that_does_more_than_a_lookup_is_refused():
    class Doubled(nn.Embedding):  # a family whose module changes rows in a way prge does not know
        def forward(self, ids):
            return super().forward(ids) * 2

    backbone = nn.Module()
    backbone.embed = Doubled(20, 8)
    backbone.get_input_embeddings = lambda: backbone.embed
    backbone.set_input_embeddings = lambda m: setattr(backbone, "embed", m)
    with pytest.raises(QuantizationError, match="does more than look up and scale rows"):
        quantize_input_embedding(backbone, torch.arange(20).reshape(1, -1))
    assert isinstance(backbone.embed, Doubled)  # left as it was


def test_a_quantized_classification_step_keeps_only_the_label_rows_of_the_head(tiny_model_dir):
    step = build_step(tiny_model_dir("llama"), AdapterConfig(num_queries=1, quantize="8da8w"), [5, 7])
    assert step.head is None and step.quantization["head"] == "label rows, float32"
    assert step.quantization["embedding"] == "int8 per row"
    names = {name for name, _ in step.named_parameters()} | {name for name, _ in step.named_buffers()}
    float_tables = [n for n in names if n.endswith("embed_tokens.weight") or n.startswith("head.")]
    assert not float_tables  # no float32 vocabulary table left for export to trace
    with pytest.raises(ValueError, match="label-word logits only"):
        step.answer_logits(torch.ones(1, 4, dtype=torch.int64), torch.ones(1, 4, dtype=torch.int64), full_vocab=True)


def test_a_quantized_full_vocabulary_step_quantizes_its_head(tiny_model_dir):
    step = build_step(tiny_model_dir("llama"), AdapterConfig(num_queries=1, loss="lm", quantize="8da8w"), [5, 7])
    assert step.quantization["head"] == "8da8w"
    table = step.vocab_size * step.label_rows.shape[1]
    tensors = list(step.head.parameters())
    assert [p.dtype for p in tensors if p.numel() == table] == [torch.int8]  # int8 weights, no float32 copy
    ids, mask = torch.randint(0, step.vocab_size, (2, 6)), torch.ones(2, 6, dtype=torch.int64)
    with torch.no_grad():
        assert step.per_example_loss(ids, mask, torch.tensor([0, 1])).isfinite().all()
