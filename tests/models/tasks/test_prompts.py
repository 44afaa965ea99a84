"""Prompt encoding and truncation (models/tasks/prompts.py), label words (labels.py)."""
from __future__ import annotations

import copy

import pytest
import torch

from models.tasks.labels import label_token_ids
from models.tasks.prompts import PromptError, encode_batch, encode_prompt, prompt_token_ids
from models.tasks.spec import DataError, TaskSpec

TEMPLATE = "Review: {text}\nSentiment:"
TASK = TaskSpec(TEMPLATE, {"negative": " negative", "positive": " positive"})
LONG_TEXT = (
    "the movie was great and I loved it . the film was terrible and I hated it . "
    "a wonderful story with good acting ."
)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer("llama")


# ---- prompts -------------------------------------------------------------------------------
def test_short_prompt_is_not_truncated(tok):
    ids, cut = encode_prompt(tok, TASK, "the movie was great .", 16)
    assert not cut
    assert ids == tok.encode("Review: the movie was great .\nSentiment:")


@pytest.mark.parametrize("seq_len", [7, 8, 12, 16, 20, 29])
def test_truncation_keeps_template_and_answer_cue(tok, seq_len):
    full = tok.encode(TEMPLATE.replace("{text}", LONG_TEXT))
    assert len(full) > seq_len
    ids, cut = encode_prompt(tok, TASK, LONG_TEXT, seq_len)
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
    assert encode_prompt(tok, TASK, LONG_TEXT, seq_len)[0] == best


@pytest.mark.parametrize("seq_len", [3, 6])
def test_template_longer_than_seq_len_raises(tok, seq_len):
    # "Review: \nSentiment:" alone is 6 tokens for the tiny tokenizer
    with pytest.raises(PromptError, match="template alone"):
        encode_prompt(tok, TASK, LONG_TEXT, seq_len)


def test_encode_batch_left_pads(tok):
    texts = ["the film was bad .", LONG_TEXT, "the end was sad ."]
    ids, mask, truncated = encode_batch(tok, TASK, texts, 12)
    assert ids.shape == mask.shape == (3, 12) and ids.dtype == mask.dtype == torch.int64
    assert truncated == 1
    assert (mask[:, -1] == 1).all() and not mask[0].all()
    for row, text in enumerate(texts):
        n = int(mask[row].sum())
        assert (mask[row, : 12 - n] == 0).all() and (ids[row, : 12 - n] == tok.pad_token_id).all()
        assert ids[row, 12 - n :].tolist() == encode_prompt(tok, TASK, text, 12)[0]


# ---- label words ---------------------------------------------------------------------------
def _task(*words: str) -> TaskSpec:
    return TaskSpec(TEMPLATE, {f"label{i}": w for i, w in enumerate(words)})


def test_label_token_ids(tok):
    neg, pos = label_token_ids(tok, _task(" negative", " positive"))
    assert tok.convert_ids_to_tokens([neg, pos]) == ["Ġnegative", "Ġpositive"]


def test_multi_token_label_word_raises(tok):
    with pytest.raises(DataError, match=r"'wonderfulness' after the prompt .* not one token"):
        label_token_ids(tok, _task(" negative", "wonderfulness"))


def test_label_word_merging_into_the_prompt_raises(tok):
    # On its own "positive" is one token, but after a template ending in a space the two merge
    # into " positive": the prompt's last token changes, the answer position would not score it.
    spaced = TaskSpec("Review: {text}\nSentiment: ", {"negative": "negative", "positive": "positive"})
    assert len(tok.encode("positive", add_special_tokens=False)) == 1
    with pytest.raises(DataError, match="not one token of its own"):
        label_token_ids(tok, spaced)


def test_prompt_keeps_bos_and_drops_an_appended_eos(tok):
    """A tokenizer that wraps every text in BOS ... EOS: the prompt keeps its BOS, loses the EOS,
    so the last position is the answer cue, and the label words are still found in context."""
    from tokenizers import processors

    wrapping = copy.deepcopy(tok)
    bos, eos = wrapping.bos_token_id, wrapping.eos_token_id
    wrapping.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    prompt = TEMPLATE.replace("{text}", "good")
    assert wrapping.encode(prompt)[-1] == eos
    ids = prompt_token_ids(wrapping, prompt)
    assert ids[0] == bos and ids[-1] != eos and ids[1:] == tok.encode(prompt, add_special_tokens=False)
    assert label_token_ids(wrapping, _task(" negative", " positive")) == label_token_ids(tok, _task(" negative", " positive"))
    batch_ids, mask, _ = encode_batch(wrapping, TASK, ["good"], 16)
    assert int(batch_ids[0, -1]) == ids[-1]


CHAT = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}"


def test_chat_template_wraps_the_prompt(tok):
    chatty = copy.deepcopy(tok)
    chatty.chat_template = CHAT
    task = TaskSpec(TEMPLATE, {"negative": " negative", "positive": " positive"}, chat_template=True)
    ids, _ = encode_prompt(chatty, task, "good", 32)
    text = chatty.decode(ids)
    assert text.startswith("<s>user: Review: good\nSentiment:") and text.endswith("<s>assistant:")
    assert ids.count(chatty.bos_token_id) == 2  # the template's own BOS tokens, none added on top
    # the label words are checked after the assistant cue and still one token each
    assert label_token_ids(chatty, task) == label_token_ids(tok, TASK)


def test_chat_template_missing_is_a_clear_error(tok):
    task = TaskSpec(TEMPLATE, {"negative": " negative", "positive": " positive"}, chat_template=True)
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        encode_prompt(plain, task, "good", 32)
