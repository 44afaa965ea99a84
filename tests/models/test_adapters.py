"""LoRA-FA injection by module name (peft's target rules)."""
from __future__ import annotations

import pytest
import torch

from models.adapters import AdapterError, default_targets, inject_lora_fa
from models.causal_lm import load_causal_lm
from prge.lora import LoRAFALinear, adapters_of


@pytest.fixture
def model(tiny_model_dir):
    return load_causal_lm(tiny_model_dir("llama")).model


def test_unknown_target_lists_available_layers(model):
    with pytest.raises(AdapterError, match="nonexistent") as info:
        inject_lora_fa(model, ["q_proj", "nonexistent"], 4, 16.0, 2)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in str(info.value)


def test_rank_must_be_positive(model):
    with pytest.raises(AdapterError, match="rank"):
        inject_lora_fa(model, ["q_proj"], 0, 16.0, 2)


def test_non_linear_target_is_refused(model):
    with pytest.raises(AdapterError, match="cannot adapt"):
        inject_lora_fa(model, ["input_layernorm"], 4, 16.0, 2)


def test_regex_targets(model):
    adapted = inject_lora_fa(model, r"model\.layers\.0\.self_attn\.(q|k)_proj", 4, 16.0, 2)
    assert adapted == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    layers = adapters_of(model)
    assert [name for name, _ in layers] == adapted
    assert [m.a_stream for _, m in layers] == [0, 1]
    assert not isinstance(model.get_submodule("model.layers.1.self_attn.q_proj"), LoRAFALinear)


def test_regex_matching_nothing_raises(model):
    with pytest.raises(AdapterError, match="matches no module"):
        inject_lora_fa(model, r"q_proj", 4, 16.0, 2)  # a regex must match the whole name


def test_list_targets_match_name_suffixes(model):
    adapted = inject_lora_fa(model, ["self_attn.v_proj", "model.layers.1.mlp.down_proj"], 4, 16.0, 2)
    assert adapted == [
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_default_targets_unknown_family():
    assert default_targets("llama") == ["q_proj", "v_proj"]
    assert default_targets("gpt_neox") == ["query_key_value"]  # not prge's: peft's table
    with pytest.raises(AdapterError, match="--targets"):
        default_targets("no-such-family")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapted_layer_computes_lora(tiny_model_dir, family):
    model = load_causal_lm(tiny_model_dir(family)).model
    target = "c_attn" if family == "gpt2" else "q_proj"
    inject_lora_fa(model, [target], 4, 16.0, 2)
    layer = adapters_of(model)[0][1]
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = layer.base(x)
        assert torch.equal(layer(x), base)  # B = 0: a no-op
        layer.lora_B.copy_(torch.randn(layer.out_features, 4, generator=torch.Generator().manual_seed(1)))
        expected = base + (16.0 / 4) * (x @ layer.lora_A.t()) @ layer.lora_B.t()
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert layer.lora_A.shape == (4, layer.in_features)
    assert base.shape[-1] == layer.out_features
