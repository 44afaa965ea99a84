"""`prge export`: model folder + task -> OUT/{model.pte, [model.ptd], manifest.json, tokenizer files}:
a training program (export_model), or with --generate a generation program (export_generation_program)."""
from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from export.contract.manifest import build_generation_manifest, build_manifest, model_weights_hash, write_manifest
from export.contract.methods import GENERATION_METHODS, ExportShapes, ProgramShapes, training_methods
from export.exporter import export_step, lower_methods, write_program
from models.causal_lm import AdapterConfig, ModelError, build_step, load_tokenizer
from models.cached_decoder import CachedDecoder
from models.console import say
from models.files import replace_dir_atomically
from models.tasks.labels import label_token_ids
from models.tasks.spec import TaskSpec
from prge.estimators import estimator_named
from prge.step import COMPLETION

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MIN_SEQ_LEN = 3  # the answer cue needs at least a few tokens; export also rejects smaller dims


def _model_positions(model_dir: Path) -> int | None:
    """The most positions the model takes (None: its config does not say)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_shapes(model_dir: Path, shapes: ExportShapes, num_queries: int) -> None:
    limit = _model_positions(model_dir)
    if shapes.seq_len < MIN_SEQ_LEN:
        raise ModelError(f"--seq-len {shapes.seq_len} is too short (minimum {MIN_SEQ_LEN})")
    if limit is not None and shapes.seq_len > limit:
        raise ModelError(f"--seq-len {shapes.seq_len} exceeds the model's {limit} positions")
    if shapes.batch_size < 1 or shapes.eval_batch_size < 1 or num_queries < 1:
        raise ModelError("--batch, --eval-batch and --q must be >= 1")


def check_quantized_in_one_pass(adapter: AdapterConfig, shapes: ExportShapes) -> None:
    """A quantized program runs each forward in one pass. XNNPACK packs quantized weights when the
    program loads, so they must be constants of the graph that calls them; a micro-batched
    forward is a loop whose body receives the weights as loop inputs, which XNNPACK then treats
    as dynamic, and it has no integer kernels for dynamic weights."""
    if adapter.quantize == "none" or adapter.micro_batch is None:
        return
    rows = {"train_step": 2 * adapter.num_queries * shapes.batch_size, "each eval method": shapes.eval_batch_size}
    over = {name: n for name, n in rows.items() if n > adapter.micro_batch}
    if over:
        name, n = next(iter(over.items()))
        raise ModelError(
            f"--quantize {adapter.quantize}: quantized programs run every forward in one pass, but {name} has {n} rows "
            f"and --micro-batch is {adapter.micro_batch}; pass --micro-batch 0 (or at least {max(over.values())}), "
            f"or fewer rows (--q, --batch, --eval-batch)"
        )


def export_model(
    model_dir: Path,
    task: TaskSpec,
    adapter: AdapterConfig,
    shapes: ExportShapes,
    out_dir: Path,
    external_weights: bool = False,
    defaults: dict[str, float] | None = None,
    progress: Callable[[str], Any] = say,
    methods: tuple[str, ...] | None = None,
    rewrites: bool = True,
) -> dict[str, Any]:
    """Export and write everything into out_dir atomically (a temp folder renamed into place).
    methods: None = the training methods of the task's loss.
    rewrites=False keeps Hugging Face's own layers (no export-friendly rewrites): slower
    programs with more delegate islands, for comparison."""
    check_shapes(model_dir, shapes, adapter.num_queries)
    check_quantized_in_one_pass(adapter, shapes)
    if task.loss == COMPLETION and not 1 <= adapter.completion_len < shapes.seq_len:
        raise ModelError(f"--completion-len {adapter.completion_len} must be at least 1 and below --seq-len {shapes.seq_len} "
                         "(a scored token needs the prompt token before it)")
    tokenizer = load_tokenizer(model_dir)
    label_ids = [] if task.loss == COMPLETION else label_token_ids(tokenizer, task)
    adapter.loss = task.loss
    methods = methods or training_methods(task.loss)
    progress(f"Building {model_dir.name} with LoRA-FA (q={adapter.num_queries}, r={adapter.rank}) ...")
    step = build_step(model_dir, adapter, label_ids, rewrites=rewrites)
    began = time.perf_counter()
    program, delegation, timings = export_step(step, shapes, external_weights, progress, methods)

    with replace_dir_atomically(Path(out_dir)) as tmp:
        pte, ptd = write_program_and_tokenizer(program, model_dir, tmp)
        manifest = build_manifest(
            pte=pte, ptd=ptd, methods=methods, shapes=shapes, micro_batch=adapter.micro_batch,
            num_queries=adapter.num_queries,
            adapter=adapter_entry(adapter),
            slots=step.slots, task=task, label_ids=label_ids,
            tokenizer_file=tmp / "tokenizer.json" if (tmp / "tokenizer.json").is_file() else None,
            pad_token_id=tokenizer.pad_token_id, model=step_model_entry(model_dir, step, rewrites),
            defaults=defaults or {}, delegation=delegation, estimator=estimator_named(adapter.estimator),
            vocab_size=step.vocab_size, completion_len=step.completion_len,
            export_seconds=export_seconds(timings, began),
        )
        write_manifest(tmp, manifest)
    return manifest


def write_program_and_tokenizer(program, model_dir: Path, out_dir: Path) -> tuple[Path, Path | None]:
    pte, ptd = write_program(program, out_dir)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    return pte, ptd


def model_entry(model_dir: Path, model_type: str, rewritten, rewrites: bool = True,
                quantization: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's model: its folder and weights hash, prge's rewrites (a RewriteReport) and
    how the frozen base is stored (None: float32, as exported)."""
    return {"path": str(model_dir.resolve()), "id": model_dir.name, "model_type": model_type,
            "rewrites": rewrites, "rewritten": rewritten.as_json(), "quantization": quantization or {"scheme": "none"},
            "weights_sha256": model_weights_hash(model_dir)}


def step_model_entry(model_dir: Path, step, rewrites: bool) -> dict[str, Any]:
    """model_entry of a PRGEStep (a training, generation or first-order program)."""
    return model_entry(model_dir, step.body.backbone.config.model_type, step.rewrites, rewrites, step.quantization)


def export_seconds(timings: dict[str, float], began: float) -> dict[str, float]:
    """The manifest's export_seconds: each phase, and the whole export since `began`."""
    return {**{k: round(v, 2) for k, v in timings.items()}, "total_s": round(time.perf_counter() - began, 2)}


def adapter_entry(adapter: AdapterConfig) -> dict[str, Any]:
    return {"kind": "lora-fa", "rank": adapter.rank, "alpha": adapter.alpha, "targets": adapter.targets,
            "a_seed": adapter.a_seed}


def _eos_token_ids(model_dir: Path, tokenizer) -> list[int]:
    """Where generation stops: the model's generation config (what Hugging Face's generate
    stops at), else the tokenizer's end token."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    return sorted({eos} if isinstance(eos, int) else set(eos or []))


def export_generation_program(
    model_dir: Path,
    task: TaskSpec,
    adapter: AdapterConfig,
    seq_len: int,
    cache_len: int,
    out_dir: Path,
    external_weights: bool = False,
    progress: Callable[[str], Any] = say,
    rewrites: bool = True,
) -> dict[str, Any]:
    """`prge export --generate`: a program that decodes one row with a KV cache (prefill a
    prompt of up to seq_len tokens, then one token per decode call, up to cache_len positions)
    through the base model plus a LoRA-FA adapter of this layout, set at run time. The task
    gives the prompt template; its loss does not matter (the program has no loss)."""
    limit = _model_positions(model_dir)
    if limit is not None and cache_len > limit:
        raise ModelError(f"--cache-len {cache_len} exceeds the model's {limit} positions")
    if not MIN_SEQ_LEN <= seq_len < cache_len:
        raise ModelError(f"--seq-len {seq_len} (the prefill window) must be at least {MIN_SEQ_LEN} and below "
                         f"--cache-len {cache_len}")
    tokenizer = load_tokenizer(model_dir)
    # One unperturbed copy and the full-vocabulary head: a decoder needs nothing else of a step.
    adapter = replace(adapter, num_queries=1, loss="lm", micro_batch=None)
    progress(f"Building {model_dir.name} with a LoRA-FA adapter (r={adapter.rank}) and a {cache_len}-position KV cache ...")
    step = build_step(model_dir, adapter, [], rewrites=rewrites)
    began = time.perf_counter()
    dims = ProgramShapes.for_generation(seq_len, step.adapter_numel, step.vocab_size)
    program, delegation, timings = lower_methods(CachedDecoder(step, cache_len), dims, GENERATION_METHODS,
                                                 external_weights, progress)
    with replace_dir_atomically(Path(out_dir)) as tmp:
        pte, ptd = write_program_and_tokenizer(program, model_dir, tmp)
        manifest = build_generation_manifest(
            pte=pte, ptd=ptd, seq_len=seq_len, cache_len=cache_len, vocab_size=step.vocab_size,
            adapter=adapter_entry(adapter), slots=step.slots, task=task,
            tokenizer_file=tmp / "tokenizer.json" if (tmp / "tokenizer.json").is_file() else None,
            pad_token_id=tokenizer.pad_token_id, eos_token_ids=_eos_token_ids(model_dir, tokenizer),
            model=step_model_entry(model_dir, step, rewrites), delegation=delegation,
            export_seconds=export_seconds(timings, began),
        )
        write_manifest(tmp, manifest)
    return manifest


def delegation_table(manifest: dict[str, Any]) -> str:
    """A short human summary: delegated vs portable nodes per method."""
    lines = [f"{'method':<14}{'XNNPACK nodes':>15}{'portable nodes':>16}{'subgraphs':>11}"]
    for name, d in manifest["delegation"].items():
        lines.append(f"{name:<14}{d['delegated_nodes']:>15}{d['portable_nodes']:>16}{d['delegated_subgraphs']:>11}")
    return "\n".join(lines)
