"""`prge export-data`: the data file a native driver trains from (format: runtime_driver/data_file.py)."""
from __future__ import annotations

from pathlib import Path

from export.contract.manifest import read_manifest, verify_program_files
from models.files import write_file_atomic
from models.tasks.folder import resolve_data_dir
from runtime_driver.data_file import MAX_U32, encode
from runtime_driver.run import program_task


def export_data(program_dir: str | Path, data_dir: str | Path | None, out: str | Path, *, steps: int,
                seed: int, eval_examples: int) -> Path:
    """Tokenize the task with the program's own tokenizer and template; write `out` atomically."""
    if not 0 <= seed <= MAX_U32:
        raise ValueError(f"--seed {seed}: the data file stores the run seed as u32 (0..{MAX_U32})")
    if steps < 1:
        raise ValueError(f"--steps {steps}: need at least one training step")
    if eval_examples < 1:
        raise ValueError(f"--eval-examples {eval_examples}: need at least one validation row")
    program_dir = Path(program_dir)
    manifest = read_manifest(program_dir)
    verify_program_files(program_dir, manifest)
    task = program_task(program_dir, manifest, resolve_data_dir(str(data_dir) if data_dir else None))
    seq_len = int(manifest["shapes"]["seq_len"])
    train = task.split("train", seq_len)
    validation = task.split("validation", seq_len, limit=eval_examples)
    blob = encode(train, validation, num_labels=len(manifest["task"]["labels"]), batch_size=int(manifest["shapes"]["batch_size"]),
                  steps=steps, run_seed=seed, pte_sha256=manifest["program"]["pte"]["sha256"])
    return write_file_atomic(out, blob)  # 0644: the file gets adb-pushed and shared
