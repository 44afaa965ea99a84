"""Turn texts into fixed-shape, left-padded prompt tensors.

Truncation policy: a prompt longer than seq_len keeps the whole template (instruction and the
answer cue such as "\\nSentiment:") and cuts the user text from its end, whole tokens at a
time, until the prompt fits. The answer cue must stay at the last position: that is where the
label word is scored.
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.tasks.spec import DataError, TaskSpec


class PromptError(ValueError):
    pass


def prompt_text(tokenizer, task: TaskSpec, text: str) -> str:
    """The prompt as text: the task's template around `text`, and around that the tokenizer's
    chat template (a user turn and the assistant's cue) when the task asks for it."""
    prompt = task.prompt(text)
    if not task.chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("task.json sets \"chat_template\": true, but this model's tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def prompt_token_ids(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """A prompt's token ids as the model is fed them. A chat-rendered prompt already holds its
    special tokens as text. Otherwise the ids keep what the tokenizer puts in front (BOS) and
    drop what it appends (an EOS would take the answer position)."""
    if chat:
        return tokenizer.encode(prompt, add_special_tokens=False)
    ids = tokenizer.encode(prompt)
    plain = tokenizer.encode(prompt, add_special_tokens=False)
    for start in range(len(ids) - len(plain) + 1):
        if ids[start : start + len(plain)] == plain:
            return ids[: start + len(plain)]
    return ids  # the special tokens changed the split itself: leave the tokenizer's choice


def encode_prompt(tokenizer, task: TaskSpec, text: str, seq_len: int) -> tuple[list[int], bool]:
    """Token ids of one rendered prompt (at most seq_len) and whether the text was truncated."""

    def render(body: str) -> list[int]:
        return prompt_token_ids(tokenizer, prompt_text(tokenizer, task, body), task.chat_template)

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


def encode_batch(tokenizer, task: TaskSpec, texts: list[str], seq_len: int) -> tuple[Tensor, Tensor, int]:
    """(input_ids [n, seq_len], attention_mask [n, seq_len], number of truncated texts)."""
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(texts), seq_len), pad, dtype=torch.int64)
    attention_mask = torch.zeros((len(texts), seq_len), dtype=torch.int64)
    truncated = 0
    for row, text in enumerate(texts):
        ids, cut = encode_prompt(tokenizer, task, text, seq_len)
        truncated += cut
        input_ids[row, seq_len - len(ids) :] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[row, seq_len - len(ids) :] = 1
    return input_ids, attention_mask, truncated
