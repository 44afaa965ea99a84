"""A task folder (task.json + train/validation/test .jsonl or .csv) read with a tokenizer.

`Task` is what training and evaluation need of a task: its spec, the label words' token ids
and the tokenizer, and the splits tokenized to a sequence length.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from models.console import say
from models.files import existing_folder
from models.tasks.batches import TokenizedSplit, tokenize_examples
from models.tasks.completions import CompletionSplit, tokenize_completions
from models.tasks.labels import label_token_ids
from models.tasks.prepared import PREPARED_TASKS, prepare_task
from models.tasks.readers import read_examples
from models.tasks.spec import DataError, TaskSpec, load_task_spec
from prge.step import COMPLETION

SPLITS = ("train", "validation", "test")
TASK_FILE = "task.json"


def resolve_data_dir(data: str | None, progress=say) -> Path:
    """--data DIR (train/validation/test .jsonl or .csv + task.json), the name of a task prge
    prepares (PREPARED_TASKS; built on first use), or else the default task."""
    if data in PREPARED_TASKS and not Path(data).is_dir():
        return prepare_task(data, progress=progress)
    return existing_folder(data, "data folder") if data else prepare_task(progress=progress)


def load_folder_spec(data_dir: Path, loss: str | None = None) -> TaskSpec:
    """The folder's task.json, with its loss replaced when one is given (--loss)."""
    task_file = data_dir / TASK_FILE
    if not task_file.is_file():
        raise FileNotFoundError(f"{data_dir}: no {TASK_FILE} (prompt template and label words)")
    spec = load_task_spec(task_file)
    if loss is None or loss == spec.loss:
        return spec
    if COMPLETION in (loss, spec.loss):  # the rows differ (labels vs completions), not just the loss
        raise DataError(f"--loss {loss}: {task_file} is a {spec.loss!r} task; a completion task's rows are prompts "
                        "with completions and a labelled task's are texts with labels, so one cannot take the other's loss",
                        path=task_file)
    return dataclasses.replace(spec, loss=loss)


def split_file(data_dir: Path, split: str) -> Path:
    found = [data_dir / f"{split}{ext}" for ext in (".jsonl", ".csv") if (data_dir / f"{split}{ext}").is_file()]
    if len(found) > 1:  # which one the user meant is a guess; refuse rather than train on the wrong one
        raise DataError(f"{data_dir}: both {split}.jsonl and {split}.csv exist; keep one", path=data_dir, line=0)
    if not found:
        raise FileNotFoundError(f"{data_dir}: no {split}.jsonl or {split}.csv")
    return found[0]


@dataclass
class Task:
    spec: TaskSpec
    label_ids: list[int]  # none for a completion task
    tokenizer: object
    data_dir: Path
    completion_len: int | None = None  # a completion task's most scored tokens per row

    @property
    def is_completion(self) -> bool:
        return self.spec.loss == COMPLETION

    def split(self, name: str, seq_len: int, limit: int | None = None) -> TokenizedSplit | CompletionSplit:
        path = split_file(self.data_dir, name)
        examples = read_examples(path, self.spec)
        if limit is not None:
            examples = examples[:limit]
        if self.is_completion:
            return tokenize_completions(self.tokenizer, self.spec, examples, seq_len, self.completion_len, path)
        return tokenize_examples(self.tokenizer, self.spec, examples, seq_len)


def load_task(spec: TaskSpec, tokenizer, data_dir: Path, completion_len: int | None = None) -> Task:
    """The task with its label words checked against the tokenizer (one token each); a
    completion task has none and needs completion_len."""
    if spec.loss == COMPLETION:
        if completion_len is None:
            raise ValueError("a completion task needs completion_len")
        return Task(spec, [], tokenizer, data_dir, completion_len)
    return Task(spec, label_token_ids(tokenizer, spec), tokenizer, data_dir)
