"""`prge generate`: greedy text from an exported completion program and a trained adapter,
through the ExecuTorch runtime alone, streamed token by token.

The program's next_token_logits runs the last seq_len tokens once per new token (the training
program has no KV cache), so decoding costs one window forward per token.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from export.contract.manifest import task_spec
from models.causal_lm import load_tokenizer
from models.peft_io import load_peft_adapter, read_adapter_config
from models.tasks.prompts import prompt_text, prompt_token_ids
from prge.step import COMPLETION
from runtime_driver.engines import ExecuTorchPRGE
from runtime_driver.evaluate import greedy_completions


def generate(program_dir: str | Path, prompt: str, adapter_dir: str | Path | None = None, max_new_tokens: int | None = None,
             on_text: Callable[[str], Any] = lambda _: None) -> dict[str, Any]:
    """The greedy continuation of `prompt` (rendered with the task's template, as in training);
    on_text receives each new piece of text as it is decoded. Returns the text, its tokens,
    whether the prompt was cut to fit, and the decode speed."""
    engine = ExecuTorchPRGE(program_dir)
    if engine.manifest["task"]["loss"] != COMPLETION:
        raise ValueError(f"{program_dir}: a label-word program has no next_token_logits; export a completion task "
                         "(task.json \"loss\": \"completion\") to generate")
    if adapter_dir is not None:
        if read_adapter_config(adapter_dir).rank != engine.adapter.rank:
            raise ValueError(f"{adapter_dir}: rank differs from the program's {engine.adapter.rank}")
        engine.set_adapter(load_peft_adapter(adapter_dir, engine.slots, engine.adapter.rank, engine.adapter.a_seed))
    task = task_spec(engine.manifest)
    tokenizer = load_tokenizer(engine.program_dir)
    ids = prompt_token_ids(tokenizer, prompt_text(tokenizer, task, prompt), task.chat_template)
    limit = max_new_tokens or engine.completion_len
    cut = max(0, len(ids) - (engine.seq_len - 1))  # keep room for at least one new token in the window
    ids = ids[cut:]
    tokens: list[int] = []
    shown = ""

    def stream(_row: int, token: int) -> None:
        nonlocal shown
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.startswith(shown):  # a multi-byte character may take several tokens to show
            on_text(text[len(shown):])
            shown = text

    began = time.perf_counter()
    greedy_completions(engine.next_token_logits, [ids], engine.seq_len, tokenizer.pad_token_id, {tokenizer.eos_token_id},
                       limit, engine.eval_batch_size, fixed_batch=True, on_token=stream)
    seconds = time.perf_counter() - began
    return {"text": tokenizer.decode(tokens, skip_special_tokens=True), "tokens": tokens, "prompt_tokens": len(ids),
            "prompt_cut_tokens": cut, "seconds": seconds, "tokens_per_s": len(tokens) / seconds if seconds > 0 else None}
