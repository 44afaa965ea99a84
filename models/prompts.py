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
    ids = tokenizer.encode(template.replace("{text}", text))
    if len(ids) <= seq_len:
        return ids, False
    overhead = len(tokenizer.encode(template.replace("{text}", "")))
    if overhead >= seq_len:
        raise PromptError(f"the template alone is {overhead} tokens; seq_len {seq_len} leaves no room for text")
    text_ids = tokenizer.encode(text, add_special_tokens=False)
    keep = min(len(text_ids), seq_len - overhead)
    while keep >= 0:
        shortened = tokenizer.decode(text_ids[:keep])
        ids = tokenizer.encode(template.replace("{text}", shortened))
        if len(ids) <= seq_len:
            return ids, True
        keep -= 1
    raise PromptError(f"cannot fit the template into seq_len {seq_len}")


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
