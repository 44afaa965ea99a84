"""`prge export --mezo-full`: a full-parameter MeZO program (prge/full_mezo.py).

Every weight of the model is a mutable buffer of the program, serialized with the base
model's values as its initial state (ExecuTorch would otherwise start mutable buffers at zero),
so the program starts from the base model with no setter call. Its methods are a training
program's with q = 1 (export/contract/methods.py FULL_MEZO_METHODS); get_adapter and
set_adapter exchange the flat weight vector.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from export.contract.manifest import build_full_mezo_manifest, write_manifest
from export.contract.methods import FULL_MEZO_METHODS, ExportShapes, ProgramShapes
from export.exporter import lower_methods
from export.pipeline import check_shapes, export_seconds, model_entry, write_program_and_tokenizer
from models.causal_lm import ModelError, build_full_mezo_step, load_tokenizer
from models.console import say
from models.files import replace_dir_atomically
from models.tasks.labels import label_token_ids
from models.tasks.spec import TaskSpec
from prge.full_mezo import FULL_MEZO_LOSSES


def export_full_mezo(model_dir: Path, task: TaskSpec, shapes: ExportShapes, out_dir: Path,
                     defaults: dict[str, float] | None = None, progress: Callable[[str], Any] = say) -> dict[str, Any]:
    """Export the full-parameter program into out_dir atomically; returns its manifest."""
    if task.loss not in FULL_MEZO_LOSSES:
        raise ModelError(f"--mezo-full exports label-word tasks; this task's loss is {task.loss!r}")
    check_shapes(model_dir, shapes, 1)
    tokenizer = load_tokenizer(model_dir)
    label_ids = label_token_ids(tokenizer, task)
    progress(f"Building {model_dir.name} for full-parameter MeZO (every weight mutable) ...")
    step = build_full_mezo_step(model_dir, label_ids, task.loss)
    dims = ProgramShapes.of(shapes, 1, step.numel, len(label_ids), step.vocab_size, task.loss)
    began = time.perf_counter()
    # Buffer placeholders are named after the weights' paths, which all end in weight or bias.
    program, delegation, timings = lower_methods(step, dims, FULL_MEZO_METHODS, progress=progress,
                                                 initialized_buffers=("weight", "bias"))
    with replace_dir_atomically(Path(out_dir)) as tmp:
        pte, _ = write_program_and_tokenizer(program, model_dir, tmp)
        manifest = build_full_mezo_manifest(
            pte=pte, shapes=shapes, slots=step.slots, task=task, label_ids=label_ids,
            tokenizer_file=tmp / "tokenizer.json" if (tmp / "tokenizer.json").is_file() else None,
            pad_token_id=tokenizer.pad_token_id,
            model=model_entry(model_dir, step.model.config.model_type, step.rewrites),
            defaults=defaults or {}, vocab_size=step.vocab_size, delegation=delegation,
            export_seconds=export_seconds(timings, began),
        )
        write_manifest(tmp, manifest)
    return manifest
