"""The pre-tokenized data file a native driver trains from (no tokenizer, no Python on the
device), written by `prge export-data`.

The file binds itself to one exported program (the .pte's sha256, seq_len, number of labels,
batch size) and to one run seed: Python's random.Random, which orders the training rows
(models/tasks/batches.py), cannot be reproduced in C++, so the row order of every step is
written out instead of the shuffle being re-implemented.

Format (all integers little-endian; android_harness/README.md documents it for readers):

  header, 128 bytes:
    0   char[8]  magic "PRGEDATA"
    8   u32      format version (2)
    12  u32      seq_len            16  u32  num_labels      20  u32  batch_size
    24  u32      num_train          28  u32  num_validation  32  u32  steps
    36  u32      run_seed
    40  u32      CRC-32 (zlib's) of everything after the header: catches corruption, not just truncation
    44  u32      label_width: labels per row, 1 (a label-word task: the class index) or seq_len
                 (a completion task: the target token of every position, -100 where not scored)
    48  char[64] sha256 (hex) of the program's .pte
    112 zero padding to 128
  payload, int32 arrays in this order:
    train_ids [num_train, seq_len], train_mask [num_train, seq_len], train_labels [num_train, label_width],
    val_ids [num_validation, seq_len], val_mask [num_validation, seq_len], val_labels [num_validation, label_width],
    order [steps * batch_size]: the train row of each training position (step t uses
    order[t*b : (t+1)*b]), exactly what batch_indices(num_train, b, t, run_seed) returns.

Version 1 had no label_width (offset 44 was reserved): label words only. A completion task's
num_labels is 0 (it has no label words).
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from models.tasks.batches import TokenizedSplit, batch_indices

MAGIC = b"PRGEDATA"
FORMAT_VERSION = 2
HEADER_BYTES = 128
_HEADER = struct.Struct("<8sIIIIIIIIII64s")  # up to the sha256; zero padding follows
MAX_U32 = (1 << 32) - 1


@dataclass
class DataFile:
    """What a data file holds, as numpy arrays (the reader is for tests and tools)."""

    seq_len: int
    num_labels: int
    label_width: int  # 1: class indices; seq_len: per-position targets (completion)
    batch_size: int
    steps: int
    run_seed: int
    pte_sha256: str
    train_ids: np.ndarray
    train_mask: np.ndarray
    train_labels: np.ndarray  # [num_train] or [num_train, seq_len]
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
    label_width = 1 if train.labels.dim() == 1 else int(train.labels.shape[1])
    order = training_order(len(train), batch_size, steps, run_seed)
    payload = b"".join(
        _i32(x) for x in (train.input_ids, train.attention_mask, train.labels,
                          validation.input_ids.reshape(-1, seq_len), validation.attention_mask.reshape(-1, seq_len),
                          validation.labels, order)
    )
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, seq_len, num_labels, batch_size, len(train), len(validation),
                          steps, run_seed, zlib.crc32(payload), label_width, pte_sha256.encode("ascii"))
    return header.ljust(HEADER_BYTES, b"\0") + payload


def decode(blob: bytes) -> DataFile:
    if len(blob) < HEADER_BYTES or blob[:8] != MAGIC:
        raise ValueError("not a prge data file (bad magic or shorter than its header)")
    (_, version, seq_len, num_labels, b, n_train, n_val, steps, seed, checksum, width, sha) = _HEADER.unpack_from(blob)
    if version != FORMAT_VERSION:
        raise ValueError(f"data file format {version}, this prge reads {FORMAT_VERSION}; re-run `prge export-data`")
    if width not in (1, seq_len):
        raise ValueError(f"label_width {width}: neither 1 nor seq_len {seq_len} (corrupted)")
    arr = np.frombuffer(blob, dtype="<i4", offset=HEADER_BYTES)
    sizes = [n_train * seq_len, n_train * seq_len, n_train * width, n_val * seq_len, n_val * seq_len, n_val * width,
             steps * b]
    if arr.size != sum(sizes) or (len(blob) - HEADER_BYTES) % 4:
        raise ValueError("data file is truncated or has trailing bytes")
    if zlib.crc32(blob[HEADER_BYTES:]) != checksum:
        raise ValueError("data file checksum mismatch (corrupted)")
    parts, at = [], 0
    for size in sizes:
        parts.append(arr[at:at + size].astype(np.int64))
        at += size
    labels_shape = (lambda n: (n,)) if width == 1 else (lambda n: (n, width))
    return DataFile(seq_len, num_labels, width, b, steps, seed, sha.decode("ascii"),
                    parts[0].reshape(n_train, seq_len), parts[1].reshape(n_train, seq_len), parts[2].reshape(labels_shape(n_train)),
                    parts[3].reshape(n_val, seq_len), parts[4].reshape(n_val, seq_len), parts[5].reshape(labels_shape(n_val)),
                    parts[6])
