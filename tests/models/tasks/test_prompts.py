"""Prompt encoding and truncation (models/tasks/prompts.py), label words (labels.py)."""
from __future__ import annotations

import pytest
import torch

from models.tasks.labels import label_token_ids
from models.tasks.prompts import PromptError, encode_batch, encode_prompt
from models.tasks.spec import DataError

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


# ---- label words ---------------------------------------------------------------------------
def test_label_token_ids(tok):
    neg, pos = label_token_ids(tok, [" negative", " positive"])
    assert tok.convert_ids_to_tokens([neg, pos]) == ["Ġnegative", "Ġpositive"]


def test_multi_token_label_word_raises(tok):
    with pytest.raises(DataError, match=r"'wonderfulness' is \d+ tokens"):
        label_token_ids(tok, [" negative", "wonderfulness"])


def test_duplicate_label_words_raise(tok):
    with pytest.raises(DataError, match="same token"):
        label_token_ids(tok, [" positive", " positive"])
