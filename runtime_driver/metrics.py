"""run/metrics.jsonl: one JSON object per line, appended and synced line by line.

A process killed mid-write can leave at most one torn last line; `read_metrics` skips it, and
`MetricsLog` truncates it away before appending so the file stays valid JSONL.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from models.files import write_file_atomic
from runtime_driver.failpoints import armed, reached


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
        if isinstance(row, dict):  # anything else is not ours (hand-edited or damaged)
            rows.append(row)
    return rows


def _logged_before(row: dict[str, Any], resume_step: int) -> bool:
    step = row.get("step", -1)
    return step <= resume_step if row.get("type") == "eval" else step < resume_step


class MetricsLog:
    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        """Open for appending. resume_step: on resume, drop what was logged after the checkpoint
        taken when resume_step steps were done (it will be redone): train rows of steps
        >= resume_step (they count from 0) and eval rows after resume_step steps done.
        resume_step 0 or None: a fresh run, any old log is emptied."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            rows = read_metrics(self.path)
            # A fresh run (resume_step 0 or None) starts an empty log; a resumed one keeps what
            # the checkpoint covers. Either way the rewrite drops a torn last line.
            rows = [r for r in rows if resume_step and _logged_before(r, resume_step)]
            write_file_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row) + "\n"
        if armed("metrics-torn-line", row.get("step")):  # crash tests: die mid-line
            self._file.write(line[: len(line) // 2])
            self._file.flush()
            reached("metrics-torn-line", row.get("step"))
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
