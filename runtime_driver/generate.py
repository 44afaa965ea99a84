"""`prge generate`: greedy text from an exported program and a trained adapter, through the
ExecuTorch runtime alone, streamed token by token.

Two kinds of program can generate:
  a generation program (`prge export --generate`)  prefill the prompt once, then one decode call
      per token against the KV cache inside the program: the way to deploy an adapter; through
      the Python runtime (CachedGenerator) or the native runner (NativeGenerator, the same loop
      in C++: android_harness/src/generate_main.cpp);
  a completion task's training program  its next_token_logits runs the last seq_len tokens
      again for every new token (it has no cache): slower, but no second export is needed.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from export.contract.manifest import GENERATION, program_kind, read_manifest, slots_from_json, task_spec
from models.causal_lm import load_tokenizer
from models.peft_io import load_peft_adapter, read_adapter_config
from models.tasks.prompts import prompt_text, prompt_token_ids
from prge.step import COMPLETION
from runtime_driver.checkpoint import write_flat_adapter
from runtime_driver.engines import ExecuTorchPRGE, ExecuTorchProgram
from runtime_driver.evaluate import greedy_completions

DEFAULT_MAX_NEW_TOKENS = 64  # a generation program's, when not asked (a training program: its completion-len)

OnToken = Callable[[int], Any]


class _GenerationProgram:
    """What a generation program's manifest says a decoding loop needs, whichever runtime runs it."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        self.seq_len = int(manifest["shapes"]["seq_len"])  # the longest prompt one prefill takes
        self.cache_len = int(manifest["shapes"]["cache_len"])
        self.slots = slots_from_json(manifest["adapter"]["slots"])
        self.rank, self.a_seed = int(manifest["adapter"]["rank"]), int(manifest["adapter"]["a_seed"])
        self.stop_ids = set(manifest["tokenizer"]["eos_token_ids"])
        self.pad_id = int(manifest["tokenizer"]["pad_token_id"])
        self.default_new_tokens = DEFAULT_MAX_NEW_TOKENS


def _cached_result(prompt: list[int], tokens: list[int], prefill_s: float, decode_s: float) -> dict[str, Any]:
    """A KV-cache generation's tokens and speeds: the first token comes from the prefill, each
    later one from a decode call."""
    decode_calls = max(len(tokens) - 1, 0)
    return {"tokens": tokens, "prefill_s": prefill_s, "decode_s": decode_s,
            "prefill_tokens_per_s": len(prompt) / prefill_s if prefill_s > 0 else None,
            "decode_tokens_per_s": decode_calls / decode_s if decode_calls and decode_s > 0 else None}


class CachedGenerator(_GenerationProgram):
    """A generation program: prefill(prompt right-padded to seq_len, its length) then
    decode(token, position) per new token; the KV cache lives in the program."""

    def __init__(self, program_dir: str | Path) -> None:
        self.program = ExecuTorchProgram(program_dir)
        super().__init__(self.program.manifest)
        self.program_dir = self.program.program_dir
        self.set_adapter(torch.zeros(sum(s.numel for s in self.slots)))  # the runtime's zeros, made explicit

    def set_adapter(self, flat: Tensor) -> None:
        self.program.run("set_adapter", [flat.reshape(-1).to(torch.float32).contiguous()])

    def prefill(self, prompt: list[int]) -> Tensor:
        ids = torch.full((1, self.seq_len), self.pad_id, dtype=torch.int64)
        ids[0, : len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
        return self.program.run("prefill", [ids, torch.tensor([len(prompt)], dtype=torch.int64)])

    def decode(self, token: int, position: int) -> Tensor:
        return self.program.run("decode", [torch.tensor([[token]], dtype=torch.int64),
                                           torch.tensor([position], dtype=torch.int64)])

    def greedy(self, prompt: list[int], max_new_tokens: int, on_token: OnToken) -> dict[str, Any]:
        """Up to max_new_tokens (fewer if the cache fills or a stop token comes; the stop token
        is not returned). Times the prefill and the decode calls apart."""
        began = time.perf_counter()
        logits = self.prefill(prompt)
        prefill_s = time.perf_counter() - began
        # The k-th new token comes from the decode call at position len(prompt) + k - 2.
        limit = min(max_new_tokens, self.cache_len - len(prompt) + 1)
        tokens: list[int] = []
        began = time.perf_counter()
        while len(tokens) < limit:
            token = int(logits.argmax(dim=-1))
            if token in self.stop_ids:
                break
            tokens.append(token)
            on_token(token)
            if len(tokens) < limit:
                logits = self.decode(token, len(prompt) + len(tokens) - 1)
        return _cached_result(prompt, tokens, prefill_s, time.perf_counter() - began)


class NativeGenerator(_GenerationProgram):
    """A generation program through the native runner (android_harness/ prge-native-generate):
    token ids in, token ids out, one process per generation; tokens arrive when it ends."""

    def __init__(self, program_dir: str | Path, binary: str | Path) -> None:
        self.binary = Path(binary)
        if not self.binary.is_file():
            raise FileNotFoundError(f"{binary}: no native runner (build it with `make native`)")
        self.program_dir = Path(program_dir)
        manifest = read_manifest(program_dir)
        if program_kind(manifest) != GENERATION:
            raise ValueError(f"{program_dir}: the native runner takes a generation program (`prge export --generate`)")
        super().__init__(manifest)  # the runner reads the same manifest (stop tokens, windows) itself
        self._adapter: Tensor | None = None

    def set_adapter(self, flat: Tensor) -> None:
        self._adapter = flat

    def greedy(self, prompt: list[int], max_new_tokens: int, on_token: OnToken) -> dict[str, Any]:
        import json
        import subprocess
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            command = [str(self.binary), "--program", str(self.program_dir), "--prompt-ids", ",".join(map(str, prompt)),
                       "--max-new-tokens", str(max_new_tokens)]
            if self._adapter is not None:
                write_flat_adapter(Path(tmp) / "adapter.safetensors", self._adapter)
                command += ["--adapter", str(Path(tmp) / "adapter.safetensors")]
            done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{self.binary.name} failed: {done.stderr.strip()}")
        result = json.loads(done.stdout)
        for token in result["tokens"]:
            on_token(token)
        return _cached_result(prompt, result["tokens"], result["prefill_s"], result["decode_s"])


class WindowGenerator:
    """A completion task's training program: the whole window runs again for every new token."""

    def __init__(self, program_dir: str | Path) -> None:
        self.engine = ExecuTorchPRGE(program_dir)
        self.manifest = self.engine.manifest
        self.program_dir = self.engine.program_dir
        if self.manifest["task"]["loss"] != COMPLETION:
            raise ValueError(f"{program_dir}: a label-word program cannot generate; export a generation program "
                             "(`prge export --generate`) or a completion task's program")
        self.seq_len = self.engine.seq_len - 1  # room for at least one new token in the window
        self.slots, self.rank, self.a_seed = self.engine.slots, self.engine.adapter.rank, self.engine.adapter.a_seed
        tokenizer = load_tokenizer(self.program_dir)
        self.stop_ids, self.pad_id = {tokenizer.eos_token_id}, tokenizer.pad_token_id
        self.default_new_tokens = self.engine.completion_len

    def set_adapter(self, flat: Tensor) -> None:
        self.engine.set_adapter(flat)

    def greedy(self, prompt: list[int], max_new_tokens: int, on_token: OnToken) -> dict[str, Any]:
        began = time.perf_counter()
        tokens = greedy_completions(self.engine.next_token_logits, [prompt], self.engine.seq_len, self.pad_id,
                                    self.stop_ids, max_new_tokens, self.engine.eval_batch_size, fixed_batch=True,
                                    on_token=lambda _row, token: on_token(token))[0]
        seconds = time.perf_counter() - began
        return {"tokens": tokens, "decode_s": seconds,
                "decode_tokens_per_s": len(tokens) / seconds if tokens and seconds > 0 else None}


Generator = CachedGenerator | NativeGenerator | WindowGenerator


def open_generator(program_dir: str | Path, native: str | Path | None = None) -> Generator:
    """The generator for whichever kind of program program_dir holds; native: the path of the
    native runner to decode with instead of the Python runtime (generation programs only)."""
    if native is not None:
        return NativeGenerator(program_dir, native)
    kind = program_kind(read_manifest(program_dir))
    return CachedGenerator(program_dir) if kind == GENERATION else WindowGenerator(program_dir)


def generate(program_dir: str | Path, prompt: str, adapter_dir: str | Path | None = None, max_new_tokens: int | None = None,
             on_text: Callable[[str], Any] = lambda _: None, native: str | Path | None = None,
             reps: int = 1, compare_hf: bool = False) -> dict[str, Any]:
    """The greedy continuation of `prompt` (rendered with the task's template, as in training);
    on_text receives each new piece of text as it is decoded. Returns the text, its tokens,
    whether the prompt was cut to fit, and the prefill and decode speeds: medians over reps
    generations of the same prompt (which must all decode the same tokens). compare_hf: also
    run Hugging Face's generate on the merged adapter and say whether the tokens are equal."""
    generator = open_generator(program_dir, native)
    if adapter_dir is not None:
        if read_adapter_config(adapter_dir).rank != generator.rank:
            raise ValueError(f"{adapter_dir}: rank differs from the program's {generator.rank}")
        generator.set_adapter(load_peft_adapter(adapter_dir, generator.slots, generator.rank, generator.a_seed))
    task = task_spec(generator.manifest)
    tokenizer = load_tokenizer(generator.program_dir)
    ids = prompt_token_ids(tokenizer, prompt_text(tokenizer, task, prompt), task.chat_template)
    cut = max(0, len(ids) - generator.seq_len)  # the prompt's start goes, as in training
    ids = ids[cut:]
    tokens: list[int] = []
    shown = ""

    def stream(token: int) -> None:
        nonlocal shown
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.startswith(shown):  # a multi-byte character may take several tokens to show
            on_text(text[len(shown):])
            shown = text

    limit = max_new_tokens or generator.default_new_tokens
    reference = hugging_face_greedy(generator.manifest["model"]["path"], adapter_dir, ids, limit) if compare_hf else None
    runs = [generator.greedy(ids, limit, stream)]
    for _ in range(reps - 1):
        runs.append(generator.greedy(ids, limit, lambda _: None))
        if runs[-1]["tokens"] != runs[0]["tokens"]:
            raise RuntimeError(f"generation {len(runs)} decoded other tokens than the first")
    timings = {key: statistics.median(r[key] for r in runs) if runs[0].get(key) is not None else None
               for key in runs[0] if key != "tokens"}
    return {"text": tokenizer.decode(runs[0]["tokens"], skip_special_tokens=True), "tokens": runs[0]["tokens"],
            "prompt_tokens": len(ids), "prompt_cut_tokens": cut, "reps": reps,
            "kv_cache": not isinstance(generator, WindowGenerator), **timings,
            **({"hugging_face_tokens": reference, "equals_hugging_face": _same_greedy(runs[0]["tokens"], reference, generator.stop_ids)}
               if compare_hf else {})}


def hugging_face_greedy(model_path: str | Path, adapter_dir: str | Path | None, prompt: list[int], max_new_tokens: int,
                        stop: bool = True) -> list[int]:
    """Hugging Face's own greedy generate (its own KV cache; its own stopping, or with stop=False
    exactly max_new_tokens) on the base model with the PEFT adapter merged into its weights:
    what a program's greedy tokens must equal."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    with torch.no_grad():
        out = model.eval().generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
                                    max_new_tokens=max_new_tokens, min_new_tokens=None if stop else max_new_tokens,
                                    do_sample=False,
                                    pad_token_id=model.generation_config.pad_token_id or 0)
    return out[0, len(prompt):].tolist()


def _same_greedy(ours: list[int], reference: list[int], stop_ids: set[int]) -> bool:
    """Hugging Face keeps the end token it stops at; prge drops it."""
    if reference and reference[-1] in stop_ids:
        reference = reference[:-1]
    return ours == reference
