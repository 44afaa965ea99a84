"""Tiny random-weight causal LMs of several architecture families, for fast offline tests.

:func:`make_tiny_model_dir` writes a folder that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load with no network access: a 2-layer float32 model with
``torch.manual_seed(seed)`` random weights and a small byte-level BPE tokenizer trained on a
built-in corpus, in which the sentiment label words " negative" and " positive" (and the
prompt words "Review", "Sentiment", ":") are single tokens.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

TINY_FAMILIES: tuple[str, ...] = (
    "llama", "qwen2", "qwen3", "mistral", "phi3", "opt", "gpt2", "gemma3_text", "smollm3",
)
# Sliding-window attention in the tiny configs that have it: shorter than the test prompts, so
# the window really cuts.
SLIDING_WINDOW = 4

# Sizes shared by every family.
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
MAX_POSITIONS = 256

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, 3
LABEL_WORDS = (" negative", " positive")

_SENTENCES = """\
Review: the movie was great and I loved it.
Sentiment: positive
Review: the film was terrible and I hated it.
Sentiment: negative
Review: a wonderful story with good acting.
Sentiment: positive
Review: a boring plot with bad acting.
Sentiment: negative
Review: this is one of the best films of the year.
Sentiment: positive
Review: this is one of the worst films of the year.
Sentiment: negative
Review: it was fun , funny and smart .
Sentiment: positive
Review: it was slow , dull and too long .
Sentiment: negative
The answer is positive. The answer is negative.
positive negative positive negative
I think the movie is not very good but the music is nice.
She said that the story was beautiful, and he did not agree.
We watched it at home with our friends on a rainy day.
They would like to see it again because it made them happy.
What a great time! What a waste of time?
There are many people who love this kind of film, so it is popular.
You can see that the director had a clear idea from the start.
The end was sad, yet the whole thing felt fresh and new.
"""


def _corpus() -> list[str]:
    lines = [s for s in _SENTENCES.splitlines() if s.strip()]
    # Repeat the prompt and label words so BPE always merges them into whole tokens.
    lines += ["Review: x\nSentiment: negative", "Review: x\nSentiment: positive"] * 50
    return lines


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def make_tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, ~500 tokens, left padding, no BOS added)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=MAX_POSITIONS,
    )
    for word in LABEL_WORDS:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:  # pragma: no cover - guarded by the corpus design
            raise AssertionError(f"tiny tokenizer splits {word!r} into {ids}")
    return tok


def _round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def make_tiny_config(family: str, vocab_size: int, **overrides: Any):
    """The ``PretrainedConfig`` of a tiny ``family`` model (tied embeddings like SmolLM2)."""
    from transformers import AutoConfig

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES}")
    pad_id, bos_id, eos_id = 0, 1, 2
    common = dict(
        vocab_size=vocab_size,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=True,
    )
    if family == "gpt2":
        kw = dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE,
                  n_positions=MAX_POSITIONS)
    elif family == "opt":
        kw = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  ffn_dim=INTERMEDIATE, word_embed_proj_dim=HIDDEN,
                  max_position_embeddings=MAX_POSITIONS, do_layer_norm_before=True)
    else:  # llama-like decoders with grouped-query attention
        kw = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE,
                  max_position_embeddings=MAX_POSITIONS)
        if family in ("qwen3",):
            kw["head_dim"] = HIDDEN // HEADS
        if family in ("mistral", "qwen2", "qwen3"):
            kw["sliding_window"] = None
        if family == "gemma3_text":  # one sliding-window and one global layer, as Gemma 3 alternates them
            kw.update(head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS,
                      sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"])
        if family == "smollm3":  # its NoPE layers: the second layer has no rotary embedding
            kw.update(no_rope_layers=[1, 0])
    kw.update(common)
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def make_tiny_model_dir(family: str, out_dir: Path, seed: int = 0, **config_overrides: Any) -> Path:
    """Write a tiny random ``family`` model (float32) and its tokenizer to ``out_dir``; return it.

    ``config_overrides`` are passed to the config (e.g. ``tie_word_embeddings=False``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tokenizer = make_tiny_tokenizer()
    config = make_tiny_config(family, _round_up(len(tokenizer)), **config_overrides)
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {config.vocab_size} < tokenizer length {len(tokenizer)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = config.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
