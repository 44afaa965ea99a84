"""Resolve what a command works on: the model folder, the task and its tokenized splits."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.cache import say
from models.causal_lm import label_token_ids, load_tokenizer
from models.default_model import prepare_default_model
from runtime_driver.batches import TokenizedSplit, tokenize_examples
from runtime_driver.data import DataError, TaskSpec, load_task_spec, read_examples
from runtime_driver.movie_reviews import prepare_default_data

SPLITS = ("train", "validation", "test")


def resolve_model_dir(model: str | None, progress=say) -> Path:
    """--model PATH as given, or the default model (prepared on first use)."""
    if model:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: model folder not found")
        return path
    return prepare_default_model(progress=progress)


def resolve_data_dir(data: str | None, progress=say) -> Path:
    """--data DIR (train/validation/test .jsonl or .csv + task.json), or the default task."""
    if data:
        path = Path(data).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: data folder not found")
        return path
    return prepare_default_data(progress=progress)


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
    label_ids: list[int]
    tokenizer: object
    data_dir: Path

    def split(self, name: str, seq_len: int, limit: int | None = None) -> TokenizedSplit:
        examples = read_examples(split_file(self.data_dir, name), self.spec)
        if limit is not None:
            examples = examples[:limit]
        return tokenize_examples(self.tokenizer, self.spec, examples, seq_len)


def load_task(model_dir: Path, data_dir: Path, loss: str | None = None) -> Task:
    task_file = data_dir / "task.json"
    if not task_file.is_file():
        raise FileNotFoundError(f"{data_dir}: no task.json (prompt template and label words)")
    spec = load_task_spec(task_file)
    if loss is not None and loss != spec.loss:
        spec = TaskSpec(spec.template, spec.labels, loss)
    tokenizer = load_tokenizer(model_dir)
    return Task(spec, label_token_ids(tokenizer, spec.label_words), tokenizer, data_dir)
