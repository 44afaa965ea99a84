"""Held-out metrics through any engine: accuracy from label-word logits, or for completion
tasks the completion loss, perplexity and greedy-decoded exact match and token F1."""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Iterator

import torch
from torch import Tensor

from models.tasks.batches import TokenizedSplit
from models.tasks.completions import CompletionSplit
from prge.step import IGNORE_TARGET

EvalLogits = Callable[[Tensor, Tensor], Tensor]


def eval_batches(tensors: list[Tensor], batch_size: int, fixed_batch: bool) -> Iterator[tuple[int, list[Tensor]]]:
    """(rows, batch tensors) in order. fixed_batch: the engine only takes exactly batch_size
    rows (an exported program), so the last batch is padded with copies of its first row."""
    n = tensors[0].shape[0]
    for start in range(0, n, batch_size):
        parts = [t[start : start + batch_size] for t in tensors]
        rows = parts[0].shape[0]
        if fixed_batch and rows < batch_size:
            parts = [torch.cat([t, t[:1].expand(batch_size - rows, *t.shape[1:])]) for t in parts]
        yield rows, parts


def evaluate(eval_logits: EvalLogits, split: TokenizedSplit, batch_size: int, fixed_batch: bool) -> dict[str, float]:
    """{"accuracy", "loss"} over a labelled split."""
    correct, total_loss, n, start = 0, 0.0, len(split), 0
    for rows, (ids, mask) in eval_batches([split.input_ids, split.attention_mask], batch_size, fixed_batch):
        labels = split.labels[start : start + rows]
        start += rows
        logits = eval_logits(ids, mask)[:rows].to(torch.float64)
        correct += int((logits.argmax(dim=1) == labels).sum())
        total_loss += float(-torch.log_softmax(logits, dim=1).gather(1, labels.reshape(-1, 1)).sum())
    return {"accuracy": correct / n, "loss": total_loss / n}


def completion_loss(engine, split: CompletionSplit) -> dict[str, float]:
    """{"loss", "perplexity"}: mean cross-entropy per scored token over the split (rows weighted
    by their number of scored tokens), and its exponential."""
    total, tokens, start = 0.0, 0, 0
    for rows, (ids, mask, targets) in eval_batches([split.input_ids, split.attention_mask, split.labels],
                                                engine.eval_batch_size, engine.fixed_eval_batch):
        counts = (split.labels[start : start + rows] != IGNORE_TARGET).sum(dim=1)
        start += rows
        losses = engine.eval_losses(ids, mask, targets)[:rows].to(torch.float64)
        total += float((losses * counts).sum())
        tokens += int(counts.sum())
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss)}


def greedy_completions(next_token_logits: EvalLogits, prompts: list[list[int]], seq_len: int, pad_id: int,
                       stop_ids: set[int], max_new_tokens: int, batch_size: int, fixed_batch: bool,
                       on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Greedy decoding: each step runs the last seq_len tokens of every row (left-padded) and
    appends the most likely next token, until a stop token or max_new_tokens. No KV cache: the
    whole window runs again each step (what a training program's forward allows).
    on_token(row, token) is called as each token is appended (streaming)."""
    out: list[list[int]] = []
    for first in range(0, len(prompts), batch_size):
        rows = [list(p) for p in prompts[first : first + batch_size]]
        generated: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(max_new_tokens):
            ids = torch.full((batch_size if fixed_batch else len(rows), seq_len), pad_id, dtype=torch.int64)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(rows):
                window = row[-seq_len:]
                ids[i, seq_len - len(window):] = torch.tensor(window, dtype=torch.int64)
                mask[i, seq_len - len(window):] = 1
            for i in range(len(rows), ids.shape[0]):  # a fixed batch's spare rows repeat the first
                ids[i], mask[i] = ids[0], mask[0]
            next_ids = next_token_logits(ids, mask)[: len(rows)].argmax(dim=1).tolist()
            for i, token in enumerate(next_ids):
                if done[i]:
                    continue
                if token in stop_ids:
                    done[i] = True
                    continue
                rows[i].append(token)
                generated[i].append(token)
                if on_token is not None:
                    on_token(first + i, token)
            if all(done):
                break
        out.extend(generated)
    return out


def _words(text: str) -> list[str]:
    """Lower-case words without punctuation (SQuAD's answer normalization, less the articles)."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def token_f1(prediction: str, reference: str) -> float:
    """Word-overlap F1 between two texts (SQuAD-style bag of words)."""
    pred, ref = _words(prediction), _words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(engine, split: CompletionSplit, tokenizer) -> dict[str, float]:
    """{"exact_match", "token_f1"} of greedy completions against the references; a completion
    matches exactly when it equals the reference once surrounding whitespace is stripped."""
    stop = {tokenizer.eos_token_id}
    generated = greedy_completions(engine.next_token_logits, split.prompts, split.input_ids.shape[1],
                                   tokenizer.pad_token_id, stop, engine.completion_len, engine.eval_batch_size,
                                   engine.fixed_eval_batch)
    texts = [tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]
    refs = [r.strip() for r in split.references]
    n = len(refs)
    return {"exact_match": sum(t == r for t, r in zip(texts, refs)) / n,
            "token_f1": sum(token_f1(t, r) for t, r in zip(texts, refs)) / n}
