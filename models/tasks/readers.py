"""User data files: labelled examples, or prompts with completions, in JSONL or CSV, read
with file:line errors.

Everything a user hands us is checked here, and every problem is a `DataError` whose message
names the file and line. Tokenization (label words, truncation to the sequence length) is in
prompts.py and labels.py, with the tokenizer at hand.
"""
from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from models.tasks.spec import DataError, TaskSpec
from prge.step import COMPLETION


@dataclass(frozen=True)
class Example:
    """One labelled example; `line` is where it starts in its file, for later error messages."""

    text: str
    label: int
    line: int


@dataclass(frozen=True)
class CompletionExample:
    """One example of a completion task: a prompt and its completion, or a chat whose assistant
    turns are scored (messages: (role, content) turns ending with an assistant turn)."""

    prompt: str | None
    completion: str | None
    messages: tuple[tuple[str, str], ...] | None
    line: int


_BOM = b"\xef\xbb\xbf"
_FORMATS = (".jsonl", ".csv")


def _err(path: Path, line: int, msg: str) -> DataError:
    """`path:line: msg`; line 0 means the file as a whole (not found, no examples, ...)."""
    return DataError(f"{path}:{line}: {msg}", path=path, line=line)


def _read_lines(path: Path) -> list[str]:
    """Decode a file line by line so invalid UTF-8 is reported at its line, BOM removed.

    Splits on b"\\n" only (not str.splitlines, which would also split on U+2028 etc. and make
    line numbers disagree with editors); a trailing "\\r" is dropped from every line.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _err(path, 0, "file not found") from None
    except IsADirectoryError:
        raise _err(path, 0, "is a directory, expected a file") from None
    except OSError as e:
        raise _err(path, 0, f"cannot read file: {e.strerror or e}") from None
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    lines: list[str] = []
    for i, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _err(path, i, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of "
                                "the line); save the file as UTF-8") from None
        lines.append(text[:-1] if text.endswith("\r") else text)
    if lines and lines[-1] == "":
        lines.pop()  # the final newline does not start another line
    return lines


def _parse_label(value: Any, task: TaskSpec, path: Path, line: int, *,
                 digit_strings: bool) -> int:
    """Label name -> index; also an int index (in CSV, where all is text, a digit string)."""
    names = task.label_names
    if isinstance(value, str):
        if value in task.labels:
            return names.index(value)
        v = value.strip()
        if digit_strings and v.isascii() and v.isdigit() and int(v) < len(names):
            return int(v)
    elif isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(names):
            return value
    allowed = ", ".join(repr(n) for n in names)
    raise _err(path, line, f"unknown label {value!r}; allowed: {allowed} "
                           f"(or an index 0..{len(names) - 1})")


def _check_text(value: Any, path: Path, line: int, key: str = "text") -> str:
    if not isinstance(value, str):
        raise _err(path, line, f'"{key}" must be a string, got {type(value).__name__}')
    if not value.strip():
        raise _err(path, line, f'"{key}" is empty')
    return value


def _jsonl_objects(path: Path, lines: list[str], expected: str) -> Iterator[tuple[int, dict]]:
    """(line, object) for every non-blank line; `expected` names the keys, for the error."""
    for i, s in enumerate(lines, start=1):
        if not s.strip():
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            hint = " (this looks like CSV; name the file .csv)" if "," in s and \
                not s.lstrip().startswith(("{", "[")) else ""
            raise _err(path, i, f"invalid JSON: {e.msg} (column {e.colno}){hint}") from None
        except (ValueError, RecursionError) as e:  # e.g. a 5000-digit int, absurd nesting
            raise _err(path, i, f"invalid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise _err(path, i, f"expected a JSON object with {expected}, got {type(obj).__name__}")
        yield i, obj


def _csv_records(path: Path, lines: list[str], columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, {column: field}) for every record of a CSV whose header names `columns` (extra
    columns are ignored). Quoted fields may span lines, so each record is reported at the line
    where it starts."""
    reader = csv.reader((s + "\n" for s in lines), strict=True)
    header: list[str] | None = None
    start, records = 1, 0
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if header is None:
                header = [h.strip() for h in row]
                dup = sorted(h for h, n in Counter(header).items() if n > 1)
                if dup:
                    raise _err(path, line, f"duplicate header column(s): {', '.join(dup)}")
                missing = [c for c in columns if c not in header]
                if missing:
                    raise _err(path, line, f"header lacks column(s) {', '.join(missing)}; "
                                           f"found: {', '.join(header)}")
                continue
            if len(row) != len(header):
                raise _err(path, line, f"expected {len(header)} fields as in the header, "
                                       f"got {len(row)}")
            records += 1
            yield line, {c: row[header.index(c)] for c in columns}
    except csv.Error as e:
        raise _err(path, start, f"invalid CSV: {e}") from None
    if header is not None and not records:
        raise _err(path, 0, "no examples (only a header)")


def _labelled(path: Path, fmt: str, lines: list[str], task: TaskSpec) -> list[Example]:
    if fmt == ".csv":
        return [Example(_check_text(r["text"], path, i), _parse_label(r["label"], task, path, i, digit_strings=True), i)
                for i, r in _csv_records(path, lines, ("text", "label"))]
    out = []
    for i, obj in _jsonl_objects(path, lines, '"text" and "label"'):
        for key in ("text", "label"):
            if key not in obj:
                raise _err(path, i, f'missing "{key}"')
        out.append(Example(_check_text(obj["text"], path, i), _parse_label(obj["label"], task, path, i,
                                                                            digit_strings=False), i))
    return out


_ROLES = ("system", "user", "assistant")


def _check_messages(value: Any, path: Path, line: int) -> tuple[tuple[str, str], ...]:
    """A chat as (role, content) turns: roles system/user/assistant, at least one assistant
    turn (what is scored), every content a non-empty string."""
    if not isinstance(value, list) or not value:
        raise _err(path, line, '"messages" must be a non-empty list of {"role": ..., "content": ...} turns')
    turns = []
    for k, turn in enumerate(value):
        if not isinstance(turn, dict) or set(turn) - {"role", "content"} or "role" not in turn or "content" not in turn:
            raise _err(path, line, f'"messages"[{k}] must be an object with exactly "role" and "content"')
        if turn["role"] not in _ROLES:
            raise _err(path, line, f'"messages"[{k}]: unknown role {turn["role"]!r}; expected one of {", ".join(_ROLES)}')
        turns.append((turn["role"], _check_text(turn["content"], path, line, f"messages[{k}].content")))
    if turns[-1][0] != "assistant":
        raise _err(path, line, '"messages" must end with an assistant turn (the reply that is scored)')
    return tuple(turns)


def _completions(path: Path, fmt: str, lines: list[str], task: TaskSpec) -> list[CompletionExample]:
    if fmt == ".csv":
        return [CompletionExample(_check_text(r["prompt"], path, i, "prompt"), _check_text(r["completion"], path, i, "completion"),
                                  None, i) for i, r in _csv_records(path, lines, ("prompt", "completion"))]
    out = []
    for i, obj in _jsonl_objects(path, lines, '"prompt" and "completion", or "messages"'):
        if "messages" in obj:
            if not task.chat_template:
                raise _err(path, i, '"messages" rows need the tokenizer\'s chat template: set "chat_template": true in task.json')
            if set(obj) != {"messages"}:
                raise _err(path, i, 'a row has either "messages" or "prompt" and "completion", not both')
            out.append(CompletionExample(None, None, _check_messages(obj["messages"], path, i), i))
            continue
        for key in ("prompt", "completion"):
            if key not in obj:
                raise _err(path, i, f'missing "{key}" (or give the row as "messages")')
        out.append(CompletionExample(_check_text(obj["prompt"], path, i, "prompt"),
                                     _check_text(obj["completion"], path, i, "completion"), None, i))
    return out


def read_examples(path: str | os.PathLike[str], task: TaskSpec) -> list[Example] | list[CompletionExample]:
    """Read the examples of `task` from a .jsonl or .csv file: labelled texts, or for a
    completion task prompts with completions (JSONL rows may also be chats, "messages").

    Any problem raises DataError "path:line: what is wrong" (line 0: the whole file), never
    another exception, because this is the first thing that touches a user's file.
    """
    p = Path(path)
    fmt = p.suffix.lower()
    if fmt not in _FORMATS:
        fields = ("prompt", "completion") if task.loss == COMPLETION else ("text", "label")
        raise _err(p, 0, f"unsupported file type {p.suffix or '(no extension)'!r}; use .jsonl (one "
                         f"{{\"{fields[0]}\": ..., \"{fields[1]}\": ...}} per line) or .csv (header with {','.join(fields)})")
    lines = _read_lines(p)
    examples = (_completions if task.loss == COMPLETION else _labelled)(p, fmt, lines, task)
    if not examples:
        raise _err(p, 0, "no examples (empty file)")
    return examples
