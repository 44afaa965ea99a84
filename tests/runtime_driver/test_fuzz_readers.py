"""Fuzzing the readers of everything a user or a killed process can hand us: data files, task
specs, manifests, checkpoints, metrics logs. Whatever the bytes, a reader either returns or
raises its own documented error (which the CLI prints as one line); nothing else escapes."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from export.contract.manifest import ManifestError, read_manifest
from runtime_driver.checkpoint import CheckpointError, load_checkpoint
from models.tasks.readers import read_examples
from models.tasks.spec import DataError, TaskSpec, load_task_spec
from runtime_driver.metrics import read_metrics

# 150 examples per reader in CI; PRGE_FUZZ_EXAMPLES=5000 for a longer hunt (BENCHMARKS.md).
FUZZ = settings(max_examples=int(os.environ.get("PRGE_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
TASK = TaskSpec("Review: {text}\nSentiment:", {"negative": " bad", "positive": " good"}, "classification")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)

# Data-file bytes: mostly text that looks like our formats (so the fuzzer gets past the first
# check), plus raw bytes (invalid UTF-8, NULs, BOMs, stray quotes).
_LINE_PIECES = st.sampled_from([
    '{"text": "fine", "label": "positive"}', '{"text": "", "label": "negative"}', '{"text": 1, "label": 0}',
    '{"label": "positive"}', "text,label", "fine,positive", '"quoted, text",negative', "\ufeff", "{", "[",
    '"', ",", "\x00", "\r", "positive", "1", "-1", "true", "null", "text,label,text",
])
data_bytes = st.one_of(
    st.lists(st.one_of(_LINE_PIECES, st.text(max_size=10)), max_size=12).map(lambda xs: "\n".join(xs).encode("utf-8", "surrogatepass")),
    st.binary(max_size=300),
)


def _write(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@FUZZ
@given(content=data_bytes, suffix=st.sampled_from([".jsonl", ".csv"]))
@example(content=b"\xef\xbb\xbftext,label\nfine,positive\n", suffix=".csv")
@example(content=b'{"text": "fine", "label": "positive"}\n' + b"\xff\n", suffix=".jsonl")
def test_data_reader_never_crashes(content: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = _write(Path(d), f"train{suffix}", content)
        try:
            examples = read_examples(path, TASK)
        except DataError as e:
            assert str(e).startswith(f"{path}:"), str(e)  # always file:line
        else:
            assert examples and all(ex.text.strip() and ex.label in (0, 1) for ex in examples)


@FUZZ
@given(spec=json_values | st.fixed_dictionaries({"template": json_values, "labels": json_values, "loss": json_values}))
def test_task_spec_reader_never_crashes(spec) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = _write(Path(d), "task.json", json.dumps(spec).encode())
        try:
            load_task_spec(path)
        except DataError as e:
            assert str(path) in str(e)


def _valid_manifest() -> dict:
    from export.contract.methods import TRAINING_METHODS, ProgramShapes, signatures_json

    return {
        "manifest_version": 2,
        "contract": signatures_json(TRAINING_METHODS, ProgramShapes(batch=2, seq_len=16, eval_batch=8, num_queries=2,
                                                                    adapter_numel=12, num_labels=2)),
        "program": {"pte": {"file": "model.pte", "bytes": 10, "sha256": "a" * 64}, "ptd": None},
        "methods": ["train_step", "apply_update", "eval_logits", "get_adapter", "set_adapter"],
        "shapes": {"batch_size": 2, "seq_len": 16, "eval_batch_size": 8},
        "num_queries": 2,
        "adapter": {"kind": "lora-fa", "rank": 4, "alpha": 16.0, "targets": ["q_proj"], "a_seed": 1, "numel": 12,
                    "slots": [{"name": "m.q_proj", "shape": [3, 4], "offset": 0, "in_features": 8, "a_stream": 0}]},
        "task": {"template": "{text}", "labels": ["n", "p"], "label_words": [" n", " p"], "label_token_ids": [5, 6],
                 "loss": "classification", "padding": "left"},
        "tokenizer": {"file": "tokenizer.json", "sha256": "b" * 64, "pad_token_id": 0},
        "prng_version": __import__("prge.noise", fromlist=["PRNG_VERSIONS"]).PRNG_VERSIONS["gaussian"],
        "model": {"path": "/m", "id": "m", "model_type": "llama", "weights_sha256": "c" * 64},
        "versions": {"executorch": "1.5.1"},
        "defaults": {},
    }


def _paths(obj, prefix=()):
    """Every (key path) into a JSON object, to mutate one place at a time."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


_MANIFEST_PATHS = [p for p in _paths(_valid_manifest()) if p]


@FUZZ
@given(path=st.sampled_from(_MANIFEST_PATHS), value=json_values, delete=st.booleans())
def test_manifest_reader_never_crashes_on_mutations(path, value, delete) -> None:
    manifest = _valid_manifest()
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    with tempfile.TemporaryDirectory() as d:
        _write(Path(d), "manifest.json", json.dumps(manifest).encode())
        try:
            read_manifest(d)
        except ManifestError as e:
            assert "manifest.json" in str(e)


@FUZZ
@given(content=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_manifest_reader_never_crashes_on_any_bytes(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        _write(Path(d), "manifest.json", content)
        try:
            read_manifest(d)
        except ManifestError:
            pass


def test_the_fuzzed_manifest_base_is_valid(tmp_path) -> None:
    _write(tmp_path, "manifest.json", json.dumps(_valid_manifest()).encode())
    assert read_manifest(tmp_path)["num_queries"] == 2  # mutations start from an accepted manifest


def _safetensors_bytes(tensors: dict) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        save_file(tensors, f"{d}/a.safetensors")
        return Path(f"{d}/a.safetensors").read_bytes()


_GOOD_ADAPTER = _safetensors_bytes({"adapter": torch.arange(6, dtype=torch.float32)})


@FUZZ
@given(
    state=st.binary(max_size=100) | json_values.map(lambda v: json.dumps(v).encode())
    | st.integers(-5, 50).map(lambda s: json.dumps({"step": s, "fingerprint": {}}).encode()),
    adapter=st.one_of(
        st.just(_GOOD_ADAPTER),
        st.integers(0, len(_GOOD_ADAPTER) - 1).map(lambda n: _GOOD_ADAPTER[:n]),  # truncated
        st.tuples(st.integers(0, len(_GOOD_ADAPTER) - 1), st.integers(0, 255)).map(  # one byte changed
            lambda t: _GOOD_ADAPTER[: t[0]] + bytes([t[1]]) + _GOOD_ADAPTER[t[0] + 1:]),
        st.binary(max_size=64),
    ),
)
def test_checkpoint_reader_never_crashes(state: bytes, adapter: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        _write(Path(d), "ckpt/state.json", state)
        _write(Path(d), "ckpt/adapter.safetensors", adapter)
        try:
            ckpt = load_checkpoint(Path(d) / "ckpt")
        except CheckpointError as e:
            assert "ckpt" in str(e)
        else:
            assert isinstance(ckpt.step, int) and ckpt.adapter.dtype == torch.float32 and ckpt.adapter.dim() == 1


@FUZZ
@given(content=st.binary(max_size=300) | st.lists(json_values.map(json.dumps), max_size=5).map(lambda xs: "\n".join(xs).encode()))
def test_metrics_reader_never_crashes(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        rows = read_metrics(_write(Path(d), "metrics.jsonl", content))
        assert all(isinstance(r, dict) for r in rows)  # only rows a consumer can index by key
