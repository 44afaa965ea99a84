"""`prge export-data`: the pre-tokenized data file a native driver trains from (no tokenizer,
no Python on the device).

The file binds itself to one exported program (the .pte's sha256, seq_len, number of labels,
batch size) and to one run seed: Python's random.Random, which orders the training rows
(runtime_driver/batches.py), cannot be reproduced in C++, so the row order of every step is
written out instead of the shuffle being re-implemented.

Format (all integers little-endian; android_harness/README.md documents it for readers):

  header, 128 bytes:
    0   char[8]  magic "PRGEDATA"
    8   u32      format version (1)
    12  u32      seq_len            16  u32  num_labels      20  u32  batch_size
    24  u32      num_train          28  u32  num_validation  32  u32  steps
    36  u32      run_seed
    40  u32      CRC-32 (zlib's) of everything after the header: catches corruption, not just truncation
    44  u32      reserved (0)
    48  char[64] sha256 (hex) of the program's .pte
    112 zero padding to 128
  payload, int32 arrays in this order:
    train_ids [num_train, seq_len], train_mask [num_train, seq_len], train_labels [num_train],
    val_ids [num_validation, seq_len], val_mask [num_validation, seq_len], val_labels [num_validation],
    order [steps * batch_size]: the train row of each training position (step t uses
    order[t*b : (t+1)*b]), exactly what batch_indices(num_train, b, t, run_seed) returns.
"""
from __future__ import annotations

import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.manifest import read_manifest, verify_program_files
from runtime_driver.batches import TokenizedSplit, batch_indices

MAGIC = b"PRGEDATA"
FORMAT_VERSION = 1
HEADER_BYTES = 128
_HEADER = struct.Struct("<8sIIIIIIIIII64s")  # up to the sha256; zero padding follows
MAX_U32 = (1 << 32) - 1




@dataclass
class DataFile:
    """What a data file holds, as numpy arrays (the reader is for tests and tools)."""

    seq_len: int
    num_labels: int
    batch_size: int
    steps: int
    run_seed: int
    pte_sha256: str
    train_ids: np.ndarray
    train_mask: np.ndarray
    train_labels: np.ndarray
    val_ids: np.ndarray
    val_mask: np.ndarray
    val_labels: np.ndarray
    order: np.ndarray


def training_order(num_train: int, batch_size: int, steps: int, run_seed: int) -> list[int]:
    """The train row of every position the run visits, from the Python driver's own function."""
    order: list[int] = []
    for t in range(steps):
        order.extend(batch_indices(num_train, batch_size, t, run_seed))
    return order


def _i32(t) -> bytes:
    return np.ascontiguousarray(np.asarray(t), dtype="<i4").tobytes()


def encode(train: TokenizedSplit, validation: TokenizedSplit, *, num_labels: int, batch_size: int, steps: int,
           run_seed: int, pte_sha256: str) -> bytes:
    seq_len = int(train.input_ids.shape[1])
    order = training_order(len(train), batch_size, steps, run_seed)
    payload = b"".join(
        _i32(x) for x in (train.input_ids, train.attention_mask, train.labels,
                          validation.input_ids.reshape(-1, seq_len), validation.attention_mask.reshape(-1, seq_len),
                          validation.labels, order)
    )
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, seq_len, num_labels, batch_size, len(train), len(validation),
                          steps, run_seed, zlib.crc32(payload), 0, pte_sha256.encode("ascii"))
    return header.ljust(HEADER_BYTES, b"\0") + payload


def decode(blob: bytes) -> DataFile:
    if len(blob) < HEADER_BYTES or blob[:8] != MAGIC:
        raise ValueError("not a prge data file (bad magic or shorter than its header)")
    (_, version, seq_len, num_labels, b, n_train, n_val, steps, seed, checksum, _, sha) = _HEADER.unpack_from(blob)
    if version != FORMAT_VERSION:
        raise ValueError(f"data file format {version}, this prge reads {FORMAT_VERSION}")
    arr = np.frombuffer(blob, dtype="<i4", offset=HEADER_BYTES)
    sizes = [n_train * seq_len, n_train * seq_len, n_train, n_val * seq_len, n_val * seq_len, n_val, steps * b]
    if arr.size != sum(sizes) or (len(blob) - HEADER_BYTES) % 4:
        raise ValueError("data file is truncated or has trailing bytes")
    if zlib.crc32(blob[HEADER_BYTES:]) != checksum:
        raise ValueError("data file checksum mismatch (corrupted)")
    parts, at = [], 0
    for size in sizes:
        parts.append(arr[at:at + size].astype(np.int64))
        at += size
    return DataFile(seq_len, num_labels, b, steps, seed, sha.decode("ascii"),
                    parts[0].reshape(n_train, seq_len), parts[1].reshape(n_train, seq_len), parts[2],
                    parts[3].reshape(n_val, seq_len), parts[4].reshape(n_val, seq_len), parts[5], parts[6])


def export_data(program_dir: str | Path, data_dir: str | Path | None, out: str | Path, *, steps: int,
                seed: int, eval_examples: int) -> Path:
    """Tokenize the task with the program's own tokenizer and template; write `out` atomically."""
    from runtime_driver.run import program_task
    from runtime_driver.workspace import resolve_data_dir

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
    batch_size = int(manifest["shapes"]["batch_size"])
    train = task.split("train", seq_len)
    validation = task.split("validation", seq_len, limit=eval_examples)
    blob = encode(train, validation, num_labels=len(manifest["task"]["labels"]), batch_size=batch_size,
                  steps=steps, run_seed=seed, pte_sha256=manifest["program"]["pte"]["sha256"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the file gets adb-pushed and shared
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
