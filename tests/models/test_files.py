"""The two atomic writers everything durable goes through (models/files.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from models.files import moved_aside, replace_dir_atomically, write_file_atomic, write_json_atomic

REPO = Path(__file__).resolve().parents[2]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_file_is_replaced_whole(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json_atomic(path, {"x": 1})
    write_file_atomic(path, "second\n")
    assert path.read_text() == "second\n" and oct(path.stat().st_mode & 0o777) == "0o644"
    assert _leftovers(path.parent) == []


def test_a_failed_file_write_changes_nothing(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_file_atomic(path, 12345)  # not bytes or str: fails while writing the temp file
    assert path.read_text() == "old" and _leftovers(tmp_path) == []


def test_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "ckpt"
    for content in ("first", "second"):
        with replace_dir_atomically(target) as tmp:
            (tmp / "state.json").write_text(content)
            assert not (target / "state.json").exists() or (target / "state.json").read_text() != content
    assert (target / "state.json").read_text() == "second"
    assert _leftovers(tmp_path) == [] and moved_aside(target) == []


def test_a_failed_folder_write_changes_nothing(tmp_path):
    target = tmp_path / "adapter"
    with replace_dir_atomically(target) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with replace_dir_atomically(target) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "a").read_text() == "old" and _leftovers(tmp_path) == []


_KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from models.files import replace_dir_atomically
with replace_dir_atomically(Path(sys.argv[1]), on_old_moved=lambda: os.kill(os.getpid(), signal.SIGKILL)) as tmp:
    (tmp / "a").write_text("new")
"""


def test_a_kill_between_the_renames_leaves_the_complete_old_copy(tmp_path):
    target = tmp_path / "ckpt"
    with replace_dir_atomically(target) as tmp:
        (tmp / "a").write_text("old")
    done = subprocess.run([sys.executable, "-c", _KILLED_BETWEEN_RENAMES, str(target)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == -signal.SIGKILL
    assert not target.exists()  # the moment a reader must survive: no target at all
    (old,) = moved_aside(target)
    assert (old / "a").read_text() == "old"
    with replace_dir_atomically(target) as tmp:  # the next write cleans up what the kill left
        (tmp / "a").write_text("newer")
    assert (target / "a").read_text() == "newer" and _leftovers(tmp_path) == []
