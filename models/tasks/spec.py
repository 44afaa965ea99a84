"""A task: how examples become prompts (template, label words) and which loss scores them.

task.json is user input: every problem is a `DataError` whose message names the file and key,
so a command can print one readable line instead of a traceback.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.files import write_json_atomic
from prge.step import COMPLETION, LOSS_KINDS


class DataError(ValueError):
    """Bad user-supplied data or configuration; the message is meant to be shown as-is."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None,
                 line: int | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.line = line


# "classification": loss over the label words only; "lm": next-token loss on the label word;
# "completion": token loss over a completion (rows with "prompt" and "completion", or "messages").
LOSSES: tuple[str, ...] = LOSS_KINDS
_PLACEHOLDER = "{text}"
_TASK_KEYS = ("template", "labels", "loss", "chat_template")


def _check_task(template: Any, labels: Any, loss: Any, where: str, chat_template: Any = False) -> None:
    """Raise DataError naming `where` and the JSON key for the first problem in a task spec."""

    def fail(key: str, msg: str) -> DataError:
        return DataError(f"{where}: {key}: {msg}", path=where)

    if not isinstance(template, str):
        raise fail('"template"', f"must be a string, got {type(template).__name__}")
    n = template.count(_PLACEHOLDER)
    if n != 1:
        raise fail('"template"', f"must contain exactly one {_PLACEHOLDER} placeholder, "
                                 f"found {n}: {template!r}")
    if loss not in LOSSES:
        raise fail('"loss"', f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    if not isinstance(labels, dict):
        raise fail('"labels"', "must be an object mapping label name to label word, "
                               f"got {type(labels).__name__}")
    if loss == COMPLETION:
        if labels:
            raise fail('"labels"', 'a completion task has no label words (its rows carry "completion" texts)')
    elif len(labels) < 2:
        raise fail('"labels"', f"needs at least 2 labels, got {len(labels)}")
    seen: dict[str, str] = {}
    for name, word in labels.items():
        key = f'"labels"[{json.dumps(name, ensure_ascii=False)}]'
        if not isinstance(name, str) or not name.strip():
            raise fail(key, "label name must be a non-empty string")
        if not isinstance(word, str):
            raise fail(key, f"label word must be a string, got {type(word).__name__}")
        if not word.strip():
            raise fail(key, f"label word is empty: {word!r}")
        if word in seen:
            raise fail(key, f"label word {word!r} is also used by label {seen[word]!r}")
        seen[word] = name
    if not isinstance(chat_template, bool):
        raise fail('"chat_template"', f"must be true or false, got {chat_template!r}")


@dataclass(frozen=True)
class TaskSpec:
    """How examples become prompts: `template` with one `{text}`, ordered label words, loss.

    Label order matters: an example's `label` is an index into `list(labels)`. A completion
    task has no labels; its template wraps each row's prompt (default: the prompt as is).
    chat_template: the rendered template becomes a user turn inside the tokenizer's chat
    template, followed by the assistant's cue; the label word is the reply's first token.
    """

    template: str
    labels: dict[str, str]
    loss: str = "classification"
    chat_template: bool = False

    def __post_init__(self) -> None:
        _check_task(self.template, self.labels, self.loss, "TaskSpec", self.chat_template)
        # Own copy, so mutating the caller's dict cannot change a frozen spec.
        object.__setattr__(self, "labels", dict(self.labels))

    @property
    def label_names(self) -> list[str]:
        return list(self.labels)

    @property
    def label_words(self) -> list[str]:
        return list(self.labels.values())

    def prompt(self, text: str) -> str:
        """The template with `text` substituted (str.replace, so other braces are literal)."""
        return self.template.replace(_PLACEHOLDER, text)

    def to_json_dict(self) -> dict[str, Any]:
        return {"template": self.template, "labels": dict(self.labels), "loss": self.loss,
                "chat_template": self.chat_template}


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: plain json.loads keeps the last duplicate key silently."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def load_task_spec(path: str | os.PathLike[str]) -> TaskSpec:
    """Read and validate a task JSON file; every problem is a DataError naming file and key."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{p}: file not found", path=p) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read task spec: {e}", path=p) from None
    try:
        obj = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})",
                        path=p, line=e.lineno) from None
    except (ValueError, RecursionError) as e:  # duplicate key, huge int, absurd nesting
        raise DataError(f"{p}: invalid task spec: {e}", path=p) from None
    if not isinstance(obj, dict):
        raise DataError(f"{p}: expected a JSON object, got {type(obj).__name__}", path=p)
    unknown = [k for k in obj if k not in _TASK_KEYS]
    if unknown:
        raise DataError(f"{p}: unknown key(s) {', '.join(map(repr, unknown))}; "
                        f"allowed: {', '.join(_TASK_KEYS)}", path=p)
    loss, chat = obj.get("loss", "classification"), obj.get("chat_template", False)
    if loss == COMPLETION:  # the prompt as is, and no label words, unless the file says otherwise
        obj = {"template": _PLACEHOLDER, "labels": {}, **obj}
    for key in ("template", "labels"):
        if key not in obj:
            raise DataError(f'{p}: missing key "{key}"', path=p)
    _check_task(obj["template"], obj["labels"], loss, str(p), chat)
    return TaskSpec(obj["template"], obj["labels"], loss, chat)


def save_task_spec(spec: TaskSpec, path: str | os.PathLike[str]) -> None:
    """Write `spec` as pretty JSON that load_task_spec reads back unchanged."""
    write_json_atomic(path, spec.to_json_dict())
