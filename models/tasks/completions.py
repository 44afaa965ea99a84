"""Completion tasks as tensors: each row's tokens, left-padded, with per-position targets.

A row is a prompt followed by what is scored: a completion and the tokenizer's end token
(prompt/completion rows), or the assistant turns of a chat rendered with the tokenizer's chat
template ("messages" rows, and prompt/completion rows of a task with "chat_template": true).
The completion text follows the prompt as it is (as in Hugging Face TRL's prompt-completion
data): start it with a space if the prompt does not end with one.

targets[i, p] is the token position p must predict when position p + 1 is scored, else
IGNORE_TARGET, so a step scores exactly the completion tokens in one teacher-forced forward.

Truncation: a row longer than seq_len loses tokens from its start (the prompt), never a scored
token; if even the scored part and the one token before it do not fit, the row is an error
naming its file and line, as is a row with more scored tokens than the program scores
(completion_len).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models.tasks.batches import TokenizedSplit
from models.tasks.prompts import prompt_text, prompt_token_ids
from models.tasks.readers import CompletionExample
from models.tasks.spec import DataError, TaskSpec
from prge.step import IGNORE_TARGET


@dataclass
class CompletionSplit(TokenizedSplit):
    """A tokenized completion split; `labels` holds the [n, seq_len] targets. For generation:
    each row's prompt up to its last scored span (token ids, after truncation) and that span's
    reference text (the completion, or the last assistant turn)."""

    prompts: list[list[int]]
    references: list[str]

    def head(self, n: int) -> "CompletionSplit":
        n = min(n, len(self))
        return CompletionSplit(self.input_ids[:n], self.attention_mask[:n], self.labels[:n], self.truncated,
                               self.prompts[:n], self.references[:n])


@dataclass(frozen=True)
class _Row:
    ids: list[int]
    spans: list[tuple[int, int]]  # scored token ranges [start, end) in ids
    reference: str  # the text of the last span


def _chat_ids(tokenizer, turns, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False,
                                         add_generation_prompt=generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False)


def _chat_row(tokenizer, turns: tuple[tuple[str, str], ...], where: str) -> _Row:
    """The whole chat's tokens and the spans of its assistant turns, each found as the tokens
    the turn adds to the chat before it (rendered with the assistant's cue)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f'{where}: a chat row needs a tokenizer with a chat template; this model\'s has none')
    ids = _chat_ids(tokenizer, turns, generation_prompt=False)
    spans = []
    for k, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = _chat_ids(tokenizer, turns[:k], generation_prompt=True)
        through = _chat_ids(tokenizer, turns[: k + 1], generation_prompt=False)
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise DataError(f"{where}: the chat template renders earlier turns differently once later ones follow; "
                            "prge cannot tell which tokens are the assistant's reply")
        spans.append((len(before), len(through)))
    return _Row(ids, spans, turns[-1][1])


def _plain_row(tokenizer, task: TaskSpec, example: CompletionExample) -> _Row:
    prompt = prompt_token_ids(tokenizer, prompt_text(tokenizer, task, example.prompt))
    completion = tokenizer.encode(example.completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    return _Row(prompt + completion, [(len(prompt), len(prompt) + len(completion))], example.completion)


def _row(tokenizer, task: TaskSpec, example: CompletionExample, where: str) -> _Row:
    if example.messages is not None:
        return _chat_row(tokenizer, example.messages, where)
    if task.chat_template:
        return _chat_row(tokenizer, (("user", task.prompt(example.prompt)), ("assistant", example.completion)), where)
    return _plain_row(tokenizer, task, example)


def tokenize_completions(tokenizer, task: TaskSpec, examples: list[CompletionExample], seq_len: int,
                         completion_len: int, path: Path | str) -> CompletionSplit:
    """Left-padded [n, seq_len] ids, mask and targets of the rows (see the module docstring)."""
    n = len(examples)
    input_ids = torch.full((n, seq_len), tokenizer.pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((n, seq_len), dtype=torch.int64)
    targets = torch.full((n, seq_len), IGNORE_TARGET, dtype=torch.int64)
    prompts, references, truncated = [], [], 0
    for i, example in enumerate(examples):
        where = f"{path}:{example.line}"
        row = _row(tokenizer, task, example, where)
        scored = sum(end - start for start, end in row.spans)
        if scored > completion_len:
            raise DataError(f"{where}: {scored} tokens to score (completion and end token); the program scores at most "
                            f"{completion_len} per row (--completion-len)", path=path, line=example.line)
        cut = max(0, len(row.ids) - seq_len)
        first = row.spans[0][0]
        if first - 1 < cut:
            raise DataError(f"{where}: the scored tokens and the one before them take {len(row.ids) - first + 1} tokens, "
                            f"more than seq_len {seq_len}; shorten the completion or use a longer --seq-len",
                            path=path, line=example.line)
        truncated += cut > 0
        ids = row.ids[cut:]
        offset = seq_len - len(ids)  # where ids[0] lands after left padding
        input_ids[i, offset:] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[i, offset:] = 1
        for start, end in row.spans:
            for p in range(start - cut, end - cut):
                targets[i, offset + p - 1] = ids[p]
        prompts.append(ids[: row.spans[-1][0] - cut])
        references.append(row.reference)
    return CompletionSplit(input_ids, attention_mask, targets, truncated, prompts, references)
