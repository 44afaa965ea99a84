"""Prompt encoding and truncation, LoRA-FA injection, label words."""
from __future__ import annotations

import pytest
import torch

from models.adapters import AdapterError, default_targets, inject_lora_fa
from models.causal_lm import ModelError, label_token_ids, load_causal_lm
from models.prompts import PromptError, encode_batch, encode_prompt
from prge.lora import LoRAFALinear, adapters_of

TEMPLATE = "Review: {text}\nSentiment:"
LONG_TEXT = (
    "the movie was great and I loved it . the film was terrible and I hated it . "
    "a wonderful story with good acting ."
)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer("llama")


# ---- prompts -------------------------------------------------------------------------------
def test_short_prompt_is_not_truncated(tok):
    ids, cut = encode_prompt(tok, TEMPLATE, "the movie was great .", 16)
    assert not cut
    assert ids == tok.encode("Review: the movie was great .\nSentiment:")


@pytest.mark.parametrize("seq_len", [7, 8, 12, 16, 20, 29])
def test_truncation_keeps_template_and_answer_cue(tok, seq_len):
    full = tok.encode(TEMPLATE.replace("{text}", LONG_TEXT))
    assert len(full) > seq_len
    ids, cut = encode_prompt(tok, TEMPLATE, LONG_TEXT, seq_len)
    assert cut
    assert len(ids) <= seq_len
    assert ids[-3:] == full[-3:]  # "\n", "Sentiment", ":" intact
    assert tok.convert_ids_to_tokens(ids[-1:]) == [":"]  # the answer cue is the last token
    assert ids[:2] == full[:2]  # "Review", ":" intact
    text = tok.decode(ids)
    assert text.startswith("Review: ") and text.endswith("\nSentiment:")
    kept = text[len("Review: ") : -len("\nSentiment:")]
    assert LONG_TEXT.startswith(kept)  # a prefix of the text: cut from its end


@pytest.mark.parametrize("seq_len", [16, 29])
def test_truncation_keeps_as_much_text_as_fits(tok, seq_len):
    text_ids = tok.encode(LONG_TEXT, add_special_tokens=False)
    best = None
    for keep in range(len(text_ids), -1, -1):  # cut whole tokens from the end until it fits
        ids = tok.encode(TEMPLATE.replace("{text}", tok.decode(text_ids[:keep])))
        if len(ids) <= seq_len:
            best = ids
            break
    assert encode_prompt(tok, TEMPLATE, LONG_TEXT, seq_len)[0] == best


@pytest.mark.parametrize("seq_len", [3, 6])
def test_template_longer_than_seq_len_raises(tok, seq_len):
    # "Review: \nSentiment:" alone is 6 tokens for the tiny tokenizer
    with pytest.raises(PromptError, match="template alone"):
        encode_prompt(tok, TEMPLATE, LONG_TEXT, seq_len)


def test_encode_batch_left_pads(tok):
    texts = ["the film was bad .", LONG_TEXT, "the end was sad ."]
    ids, mask, truncated = encode_batch(tok, TEMPLATE, texts, 12)
    assert ids.shape == mask.shape == (3, 12) and ids.dtype == mask.dtype == torch.int64
    assert truncated == 1
    assert (mask[:, -1] == 1).all() and not mask[0].all()
    for row, text in enumerate(texts):
        n = int(mask[row].sum())
        assert (mask[row, : 12 - n] == 0).all() and (ids[row, : 12 - n] == tok.pad_token_id).all()
        assert ids[row, 12 - n :].tolist() == encode_prompt(tok, TEMPLATE, text, 12)[0]


# ---- LoRA-FA injection ---------------------------------------------------------------------
@pytest.fixture
def model(tiny_model_dir):
    return load_causal_lm(tiny_model_dir("llama"))


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
    with pytest.raises(AdapterError, match="--targets"):
        default_targets("bert")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapted_layer_computes_lora(tiny_model_dir, family):
    model = load_causal_lm(tiny_model_dir(family))
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


# ---- label words ---------------------------------------------------------------------------
def test_label_token_ids(tok):
    neg, pos = label_token_ids(tok, [" negative", " positive"])
    assert tok.convert_ids_to_tokens([neg, pos]) == ["Ġnegative", "Ġpositive"]


def test_multi_token_label_word_raises(tok):
    with pytest.raises(ModelError, match=r"'wonderfulness' is \d+ tokens"):
        label_token_ids(tok, [" negative", "wonderfulness"])


def test_duplicate_label_words_raise(tok):
    with pytest.raises(ModelError, match="same token"):
        label_token_ids(tok, [" positive", " positive"])
