"""`prge export --mezo-full`: a full-parameter MeZO program (prge/full_mezo.py).

Every weight of the model is a mutable buffer of the program. ExecuTorch starts mutable buffers
at zero, and serializing their initial values stores them once per method that touches them (5
copies of the weights in one .pte); so the base weights go beside the program, once, as
weights.safetensors under their Hugging Face names (listed with its sha256 in the manifest), and
the engine sets them through set_weights when it loads the program. Its methods are a training
program's with q = 1 (export/contract/methods.py FULL_MEZO_METHODS); get_adapter and
set_weights exchange the flat weight vector.
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
from models.model_folder import save_weights_file
from models.tasks.labels import label_token_ids
from models.tasks.spec import TaskSpec
from prge.full_mezo import FULL_MEZO_LOSSES, named_weights

INITIAL_WEIGHTS_FILE = "weights.safetensors"


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
    # set_weights' input is every weight: read from the engine's tensor, not copied into the program.
    program, delegation, timings = lower_methods(step, dims, FULL_MEZO_METHODS, progress=progress, layerwise=True,
                                                 inputs_from_caller=("set_weights",))
    with replace_dir_atomically(Path(out_dir)) as tmp:
        pte, _ = write_program_and_tokenizer(program, model_dir, tmp)
        weights = save_weights_file(tmp / INITIAL_WEIGHTS_FILE, named_weights(step.slots, step.get_adapter()))
        manifest = build_full_mezo_manifest(
            pte=pte, weights_file=weights, shapes=shapes, slots=step.slots, task=task, label_ids=label_ids,
            tokenizer_file=tmp / "tokenizer.json" if (tmp / "tokenizer.json").is_file() else None,
            pad_token_id=tokenizer.pad_token_id,
            model=model_entry(model_dir, step.model.config.model_type, step.rewrites),
            defaults=defaults or {}, vocab_size=step.vocab_size, delegation=delegation,
            export_seconds=export_seconds(timings, began),
        )
        write_manifest(tmp, manifest)
    return manifest
