"""Turn texts into fixed-shape, left-padded prompt tensors.

Truncation policy: a prompt longer than seq_len keeps the whole template (instruction and the
answer cue such as "\\nSentiment:") and cuts the user text from its end, whole tokens at a
time, until the prompt fits. The answer cue must stay at the last position: that is where the
label word is scored.
"""
from __future__ import annotations

import torch
from torch import Tensor


class PromptError(ValueError):
    pass


def encode_prompt(tokenizer, template: str, text: str, seq_len: int) -> tuple[list[int], bool]:
    """Token ids of one rendered prompt (at most seq_len) and whether the text was truncated."""

    def render(body: str) -> list[int]:
        return tokenizer.encode(template.replace("{text}", body))

    ids = render(text)
    if len(ids) <= seq_len:
        return ids, False
    if len(render("")) >= seq_len:
        raise PromptError(f"the template alone fills seq_len {seq_len}; no room for text")
    # Largest number of leading text tokens whose re-rendered prompt still fits: a binary
    # search, since re-encoding a long text once per dropped token would be quadratic.
    text_ids = tokenizer.encode(text, add_special_tokens=False)
    fits, too_long = 0, len(text_ids)
    best = render("")
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        candidate = render(tokenizer.decode(text_ids[:middle]))
        if len(candidate) <= seq_len:
            fits, best = middle, candidate
        else:
            too_long = middle
    return best, True


def encode_batch(tokenizer, template: str, texts: list[str], seq_len: int) -> tuple[Tensor, Tensor, int]:
    """(input_ids [n, seq_len], attention_mask [n, seq_len], number of truncated texts)."""
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(texts), seq_len), pad, dtype=torch.int64)
    attention_mask = torch.zeros((len(texts), seq_len), dtype=torch.int64)
    truncated = 0
    for row, text in enumerate(texts):
        ids, cut = encode_prompt(tokenizer, template, text, seq_len)
        truncated += cut
        input_ids[row, seq_len - len(ids) :] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[row, seq_len - len(ids) :] = 1
    return input_ids, attention_mask, truncated
