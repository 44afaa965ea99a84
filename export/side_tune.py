"""The device programs of side tuning (models/side_network.py): before training, side_features
(the frozen model's forward, returning what the device sends); after it, the same with
side_logits (base + the trained side network, its weights constants of the program)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from export.contract.manifest import build_side_manifest, write_manifest
from export.contract.methods import ExportShapes, ProgramShapes, side_methods
from export.exporter import lower_methods
from export.pipeline import check_shapes, export_seconds, model_entry, write_program_and_tokenizer
from models.causal_lm import ModelError, build_side_features, load_tokenizer
from models.console import say
from models.files import replace_dir_atomically
from models.side_network import SideNetwork, SideProgram
from models.tasks.labels import label_token_ids
from models.tasks.spec import TaskSpec


def export_side_program(model_dir: Path, task: TaskSpec, batch_size: int, seq_len: int, out_dir: Path,
                        taps: tuple[int, ...] | None = None, side: SideNetwork | None = None,
                        progress: Callable[[str], Any] = say) -> dict[str, Any]:
    """Export a side-tuning program into out_dir atomically (with side_logits when side is
    given); returns its manifest."""
    if task.loss != "classification":
        raise ModelError(f"side tuning trains label-word tasks (classification loss); this task's loss is {task.loss!r}")
    check_shapes(model_dir, ExportShapes(batch_size, seq_len, batch_size), 1)
    tokenizer = load_tokenizer(model_dir)
    label_ids = label_token_ids(tokenizer, task)
    progress(f"Building {model_dir.name} for side tuning (frozen, taps {list(taps) if taps else 'default'}) ...")
    features = build_side_features(model_dir, label_ids, taps)
    target = SideProgram(features, side)
    width = len(features.taps) * features.hidden_size + len(label_ids)
    dims = ProgramShapes.for_side(batch_size, seq_len, len(label_ids), width)
    began = time.perf_counter()
    program, delegation, timings = lower_methods(target, dims, side_methods(side is not None), progress=progress)
    with replace_dir_atomically(Path(out_dir)) as tmp:
        pte, _ = write_program_and_tokenizer(program, model_dir, tmp)
        manifest = build_side_manifest(
            pte=pte, batch_size=batch_size, seq_len=seq_len, taps=features.taps, hidden_size=features.hidden_size,
            network=None if side is None else side.config(), task=task, label_ids=label_ids,
            tokenizer_file=tmp / "tokenizer.json" if (tmp / "tokenizer.json").is_file() else None,
            pad_token_id=tokenizer.pad_token_id,
            model=model_entry(model_dir, features.model.config.model_type, features.rewrites),
            delegation=delegation, export_seconds=export_seconds(timings, began),
        )
        write_manifest(tmp, manifest)
    return manifest
