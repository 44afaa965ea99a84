"""`prge export`: model folder + task -> OUT/{model.pte, [model.ptd], manifest.json, tokenizer files}."""
from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from models.cache import say
from export.exporter import METHOD_NAMES, ExportShapes, export_step, write_program
from export.manifest import MANIFEST_VERSION, model_weights_hash, program_code_version, sha256_file, slots_to_json, write_manifest
from models.causal_lm import AdapterConfig, ModelError, build_step, label_token_ids, load_tokenizer
from prge.noise import PRNG_VERSION
from runtime_driver.data import TaskSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MIN_SEQ_LEN = 3  # the answer cue needs at least a few tokens; export also rejects smaller dims


def check_shapes(model_dir: Path, shapes: ExportShapes, num_queries: int) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if shapes.seq_len < MIN_SEQ_LEN:
        raise ModelError(f"--seq-len {shapes.seq_len} is too short (minimum {MIN_SEQ_LEN})")
    if limit is not None and shapes.seq_len > limit:
        raise ModelError(f"--seq-len {shapes.seq_len} exceeds the model's {limit} positions")
    if shapes.batch_size < 1 or shapes.eval_batch_size < 1 or num_queries < 1:
        raise ModelError("--batch, --eval-batch and --q must be >= 1")


def export_model(
    model_dir: Path,
    task: TaskSpec,
    adapter: AdapterConfig,
    shapes: ExportShapes,
    out_dir: Path,
    external_weights: bool = False,
    defaults: dict[str, float] | None = None,
    progress: Callable[[str], Any] = say,
    methods: tuple[str, ...] = METHOD_NAMES,
) -> dict[str, Any]:
    """Export and write everything into out_dir atomically (a temp folder renamed into place)."""
    check_shapes(model_dir, shapes, adapter.num_queries)
    tokenizer = load_tokenizer(model_dir)
    label_ids = label_token_ids(tokenizer, task.label_words)
    adapter.loss = task.loss
    progress(f"Building {model_dir.name} with LoRA-FA (q={adapter.num_queries}, r={adapter.rank}) ...")
    step = build_step(model_dir, adapter, label_ids)
    began = time.perf_counter()
    program, delegation, timings = export_step(step, shapes, external_weights, progress, methods)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pte, ptd = write_program(program, tmp)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        tokenizer_file = "tokenizer.json" if (tmp / "tokenizer.json").is_file() else None
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "program": {
                "pte": {"file": pte.name, "bytes": pte.stat().st_size, "sha256": sha256_file(pte)},
                "ptd": {"file": ptd.name, "bytes": ptd.stat().st_size, "sha256": sha256_file(ptd)} if ptd else None,
            },
            "methods": list(methods),
            "shapes": {"batch_size": shapes.batch_size, "seq_len": shapes.seq_len, "eval_batch_size": shapes.eval_batch_size,
                       "micro_batch": adapter.micro_batch},
            "num_queries": adapter.num_queries,
            "adapter": {
                "kind": "lora-fa",
                "rank": adapter.rank,
                "alpha": adapter.alpha,
                "targets": adapter.targets,
                "a_seed": adapter.a_seed,
                "numel": step.adapter_numel,
                "slots": slots_to_json(step.slots),
            },
            "task": {
                "template": task.template,
                "labels": task.label_names,
                "label_words": task.label_words,
                "label_token_ids": label_ids,
                "loss": task.loss,
                "padding": "left",
            },
            "tokenizer": {
                "file": tokenizer_file,
                "sha256": sha256_file(tmp / tokenizer_file) if tokenizer_file else None,
                "pad_token_id": tokenizer.pad_token_id,
            },
            "prng_version": PRNG_VERSION,
            "model": {
                "path": str(model_dir.resolve()),
                "id": model_dir.name,
                "model_type": step.body.backbone.config.model_type,
                "weights_sha256": model_weights_hash(model_dir),
            },
            "executorch_version": importlib.metadata.version("executorch"),  # the package has no __version__
            "code_version": program_code_version(),
            "defaults": defaults or {},
            "delegation": delegation,
            "export_seconds": {**{k: round(v, 2) for k, v in timings.items()}, "total_s": round(time.perf_counter() - began, 2)},
        }
        write_manifest(tmp, manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def delegation_table(manifest: dict[str, Any]) -> str:
    """A short human summary: delegated vs portable nodes per method."""
    lines = [f"{'method':<14}{'XNNPACK nodes':>15}{'portable nodes':>16}{'subgraphs':>11}"]
    for name, d in manifest["delegation"].items():
        lines.append(f"{name:<14}{d['delegated_nodes']:>15}{d['portable_nodes']:>16}{d['delegated_subgraphs']:>11}")
    return "\n".join(lines)
