"""Shared fixtures: tiny models, a tiny learnable sentiment task, tiny PRGESteps and batches.

tests/ is not a package and not on sys.path, so helpers are handed out as fixtures (factories)
rather than importable functions.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub read it

import pytest
import torch

from models.files import one_at_a_time
from models.sources.tiny import make_tiny_model_dir

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine a second
# thread per op makes every forward 10-100x slower (oversubscription).
torch.set_num_threads(1)

SEQ_LEN = 16  # prompt length of tiny batches

# Words the tiny tokenizer learned from its corpus (models/sources/tiny.py), so prompts stay short.
_SUBJECTS = ["the movie", "the film", "this film", "the story", "the music", "the acting", "the plot", "the end"]
_POSITIVE = ["great", "good", "fun", "funny", "wonderful", "beautiful", "nice", "fresh", "smart"]
_NEGATIVE = ["bad", "boring", "terrible", "dull", "slow", "sad", "too long"]
_POSITIVE_TAILS = ["and I loved it .", "and I loved it", "."]
_NEGATIVE_TAILS = ["and I hated it .", "and too long .", "."]


def _review(rng: random.Random, positive: bool) -> str:
    words, tails = (_POSITIVE, _POSITIVE_TAILS) if positive else (_NEGATIVE, _NEGATIVE_TAILS)
    return f"{rng.choice(_SUBJECTS)} was {rng.choice(words)} {rng.choice(tails)}"


def tiny_examples(n: int, seed: int) -> list[dict]:
    """n synthetic reviews, labels alternating (balanced) in a seeded shuffled order."""
    rng = random.Random(seed)
    labels = ["positive", "negative"] * (n // 2) + (["positive"] if n % 2 else [])
    rng.shuffle(labels)
    return [{"text": _review(rng, label == "positive"), "label": label} for label in labels]


@pytest.fixture(scope="session")
def shared_folder(tmp_path_factory) -> Callable[[str, Callable[[Path], object]], Path]:
    """Factory: folder(name, build) -> a folder of this test run, made once by build(path).

    `make test` runs the suite in parallel worker processes (pytest-xdist), each with its own
    session; the folders that session fixtures make (tiny models, exported programs: tens of
    seconds each) live in the run's folder that all workers share, so each is made once per run:
    the first worker to ask builds it under a lock, the others wait for it and reuse it.
    A folder is used only once its build has finished (the .done mark).
    """
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"

    def folder(name: str, build: Callable[[Path], object]) -> Path:
        path, done = root / name, root / f"{name}.done"
        with one_at_a_time(root / f"{name}.lock"):  # a folder per name: other builds go on
            if not done.exists():
                shutil.rmtree(path, ignore_errors=True)  # a build that failed in another worker
                build(path)
                done.touch()
        return path

    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(shared_folder) -> Callable[..., Path]:
    """Factory: make(family="llama") -> folder of a tiny random model (one per family, made once)."""

    def make(family: str = "llama") -> Path:
        return shared_folder(f"tiny-{family}", lambda out: make_tiny_model_dir(family, out, seed=0))

    return make


def _write_task_folder(out: Path, task_json: dict | None, splits, rows_of: Callable[[int, int], list[dict]]) -> None:
    """task.json (the default sentiment task when task_json is None) and one .jsonl per split."""
    from models.tasks.spec import save_task_spec
    from models.tasks.vader_snippets import DEFAULT_SENTIMENT_TASK

    out.mkdir(parents=True)
    if task_json is None:
        save_task_spec(DEFAULT_SENTIMENT_TASK, out / "task.json")
    else:
        (out / "task.json").write_text(json.dumps(task_json), encoding="utf-8")
    for split, n, seed in splits:
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_of(n, seed)), encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_data_dir(shared_folder) -> Path:
    """A task folder: task.json (default sentiment task) + train (64) / validation (24) / test (24)
    .jsonl of short synthetic reviews whose label is given away by one word."""
    splits = (("train", 64, 1), ("validation", 24, 2), ("test", 24, 3))
    return shared_folder("tiny-data", lambda out: _write_task_folder(out, None, splits, tiny_examples))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir) -> Callable[..., object]:
    """Factory: tok(family="llama") -> the tiny model's tokenizer as prge loads it (left padding)."""
    from models.causal_lm import load_tokenizer

    cache: dict[str, object] = {}

    def tok(family: str = "llama"):
        if family not in cache:
            cache[family] = load_tokenizer(tiny_model_dir(family))
        return cache[family]

    return tok


@pytest.fixture
def tiny_step(tiny_model_dir, tiny_tokenizer):
    """Factory: make(family="llama", q=2, rank=4, loss="classification", **adapter_kw) -> a fresh
    PRGEStep over the tiny model (B = 0) with the label words " negative", " positive"."""
    from models.causal_lm import AdapterConfig, build_step
    from models.tasks.labels import label_token_ids
    from models.tasks.vader_snippets import DEFAULT_SENTIMENT_TASK

    def make(family: str = "llama", q: int = 2, rank: int = 4, loss: str = "classification", **adapter_kw):
        label_ids = label_token_ids(tiny_tokenizer(family), DEFAULT_SENTIMENT_TASK)
        config = AdapterConfig(num_queries=q, rank=rank, loss=loss, **adapter_kw)
        return build_step(tiny_model_dir(family), config, label_ids)

    return make


@pytest.fixture
def randomize_adapter() -> Callable[..., torch.Tensor]:
    """Helper: randomize(step, seed, scale=0.05) sets every B to scale * N(0, 1) (seeded) and
    returns the new flat adapter (B starts at zero, which hides many mistakes)."""

    def randomize(step, seed: int, scale: float = 0.05) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        flat = torch.randn(step.adapter_numel, generator=g, dtype=torch.float32) * scale
        with torch.no_grad():
            return step.set_adapter(flat)

    return randomize


@pytest.fixture(scope="session")
def tiny_batch(tiny_tokenizer) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Factory: batch(b=4, family="llama", seed=0, seq_len=16) -> (input_ids, attention_mask,
    labels), left-padded prompts of the default sentiment template; labels are class indices
    (0 negative, 1 positive) matching the review."""
    from models.tasks.vader_snippets import DEFAULT_SENTIMENT_TASK
    from models.tasks.prompts import encode_batch

    def batch(b: int = 4, family: str = "llama", seed: int = 0, seq_len: int = SEQ_LEN):
        rows = tiny_examples(b, 1000 + seed)
        ids, mask, _ = encode_batch(
            tiny_tokenizer(family), DEFAULT_SENTIMENT_TASK, [r["text"] for r in rows], seq_len
        )
        labels = torch.tensor([DEFAULT_SENTIMENT_TASK.label_names.index(r["label"]) for r in rows])
        return ids, mask, labels

    return batch


@pytest.fixture(scope="session")
def tiny_program(tiny_model_dir, tiny_data_dir, shared_folder) -> Callable[..., Path]:
    """make(family="llama", q=2, rank=4, batch=2, seq_len=16, external=False, micro_batch=64, quantize="none",
    estimator="spsa") -> export folder.

    Exports are the slow part of the suite (tens of seconds each), so each configuration is
    exported once per test run (shared_folder) and shared by every test that only reads it.
    """
    from export.contract.methods import ExportShapes
    from export.pipeline import export_model
    from models.causal_lm import AdapterConfig
    from models.tasks.folder import load_folder_spec
    from prge.pieces import DEFAULT_MICRO_BATCH

    def make(family: str = "llama", q: int = 2, rank: int = 4, batch: int = 2, seq_len: int = SEQ_LEN,
             external: bool = False, micro_batch: int | None = DEFAULT_MICRO_BATCH, quantize: str = "none",
             estimator: str = "spsa") -> Path:
        def build(out: Path) -> None:
            task = load_folder_spec(tiny_data_dir)
            shapes = ExportShapes(batch, seq_len, 2 * q * batch)
            adapter = AdapterConfig(num_queries=q, rank=rank, micro_batch=micro_batch, quantize=quantize, estimator=estimator)
            export_model(tiny_model_dir(family), task, adapter, shapes, out / "program", external_weights=external,
                         progress=lambda _: None)

        name = f"program-{family}-q{q}-r{rank}-b{batch}-s{seq_len}-ext{int(external)}-mb{micro_batch}-{quantize}-{estimator}"
        return shared_folder(name, build) / "program"

    return make


def tiny_completion_rows(n: int, seed: int) -> list[dict]:
    """n prompt/completion rows: a short review and how it goes on, which its sentiment word
    gives away (" and I loved it ." after a positive word), so a tiny model can learn them."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = _POSITIVE if positive else _NEGATIVE
        rows.append({"prompt": f"{rng.choice(_SUBJECTS)} was {rng.choice(words)}",
                     "completion": " and I loved it ." if positive else " and I hated it ."})
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="session")
def tiny_completion_data_dir(shared_folder) -> Path:
    """A completion task folder: task.json ("loss": "completion", a review template) + train (48)
    / validation (16) / test (16) prompt/completion rows (tiny_completion_rows)."""
    task = {"loss": "completion", "template": "Review: {text}\n"}
    splits = (("train", 48, 1), ("validation", 16, 2), ("test", 16, 3))
    return shared_folder("tiny-completion-data", lambda out: _write_task_folder(out, task, splits, tiny_completion_rows))


# The most scored tokens per row in the tiny completion programs: " and I loved it ." and the end token.
TINY_COMPLETION_LEN = 8
TINY_PREFILL_LEN, TINY_CACHE_LEN = 16, 40  # the tiny generation program's


@pytest.fixture(scope="session")
def tiny_generation_program(tiny_model_dir, tiny_completion_data_dir, shared_folder) -> Path:
    """The tiny llama's generation program (prefill window 16, 40-position cache), with the
    adapter layout of tiny_completion_program."""
    from export.pipeline import export_generation_program
    from models.causal_lm import AdapterConfig
    from models.tasks.folder import load_folder_spec

    def build(out: Path) -> None:
        export_generation_program(tiny_model_dir("llama"), load_folder_spec(tiny_completion_data_dir), AdapterConfig(rank=4),
                                  TINY_PREFILL_LEN, TINY_CACHE_LEN, out / "program", progress=lambda _: None)

    return shared_folder("generation-program", build) / "program"


@pytest.fixture(scope="session")
def tiny_completion_program(tiny_model_dir, tiny_completion_data_dir, shared_folder) -> Path:
    """The tiny llama exported for the completion task: q=2, batch 2, seq_len 16, completion_len 8."""
    from export.contract.methods import ExportShapes
    from export.pipeline import export_model
    from models.causal_lm import AdapterConfig
    from models.tasks.folder import load_folder_spec

    def build(out: Path) -> None:
        adapter = AdapterConfig(num_queries=2, rank=4, completion_len=TINY_COMPLETION_LEN)
        export_model(tiny_model_dir("llama"), load_folder_spec(tiny_completion_data_dir), adapter,
                     ExportShapes(2, SEQ_LEN, 8), out / "program", progress=lambda _: None)

    return shared_folder("completion-program", build) / "program"


class _RunStopped(Exception):
    """Raised inside a run by stop_after_step: the run ends there, as if the process were killed."""


@pytest.fixture
def stop_after_step(monkeypatch):
    """Context factory: `with stop_after_step(4): run(...)` ends the run right after step 4 is
    logged (an interrupted run, to be resumed); the block expects that stop."""
    from contextlib import contextmanager

    @contextmanager
    def stopped(step: int):
        def reached(name: str, at: int | None = None) -> None:
            if name == "after-step" and at == step:
                raise _RunStopped

        with monkeypatch.context() as patch:
            patch.setattr("runtime_driver.train.reached", reached)
            with pytest.raises(_RunStopped):
                yield

    return stopped
