"""Where prge keeps its files and how it writes them: the cache folder, sha256, atomic writes.

Everything prge writes that a later run trusts (checkpoints, adapters, programs and their
manifests, prepared models and data, run summaries, data files for the native driver) is
written through the two writers here, the same way: into a temporary name beside the target,
fsynced, then renamed into place. A kill at any moment leaves the old version or the new one,
never a half-written file or folder.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def cache_dir() -> Path:
    """Root of prge's cache: $PRGE_CACHE, else $XDG_CACHE_HOME/prge, else ~/.cache/prge."""
    if os.environ.get("PRGE_CACHE"):
        return Path(os.environ["PRGE_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "prge"


@contextmanager
def one_at_a_time(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock on folder (created if missing) for the block.

    Preparing a cache folder (a model, a data set, a download) takes a minute; two processes
    doing it at once (two commands started together, parallel test workers) would each build
    it and the second would rename its copy over the first while the first's readers use it.
    Locking the folder the result goes in, they take turns, and the one that waited finds it
    complete. The lock is the folder's own (no lock file is left behind), and the kernel
    releases it if its holder dies, so a killed run never blocks the next.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def existing_folder(path: str | os.PathLike[str], what: str) -> Path:
    """A folder the user named (~ expanded), or FileNotFoundError saying what was looked for."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: {what} not found")
    return folder


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (model files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list: makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str | os.PathLike[str], data: bytes | str, mode: int = 0o644) -> Path:
    """Write data (str as UTF-8) to path through a temp file beside it, fsynced, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it owner-only; prge's files are not secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent)
    return path


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_file_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def moved_aside(target: Path) -> list[Path]:
    """Complete old copies of target that a kill between the two renames of
    replace_dir_atomically left beside it (oldest name first)."""
    return sorted(target.parent.glob(f".{target.name}-old.*"))


@contextmanager
def replace_dir_atomically(
    target: str | os.PathLike[str],
    on_written: Callable[[], None] | None = None,
    on_old_moved: Callable[[], None] | None = None,
) -> Iterator[Path]:
    """Yield a new empty temp folder beside target; when the block ends without an error, its
    files are fsynced and it replaces target by two renames: target -> .NAME-old.PID, then
    temp -> target. Never delete-then-rename: a kill between the renames leaves the complete
    old copy (see moved_aside), never nothing. Afterwards the old copy and any temp or old
    folder a killed writer left are removed. On an error the temp folder is removed and
    target is untouched.

    on_written, on_old_moved: called just before the first and just after it (the crash
    tests' kill points: a kill from outside would almost never land there).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-new.", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        _fsync(tmp)
        if on_written:
            on_written()
        if target.exists():
            os.replace(target, target.parent / f".{target.name}-old.{os.getpid()}")
            if on_old_moved:
                on_old_moved()
        os.replace(tmp, target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in (*target.parent.glob(f".{target.name}-new.*"), *moved_aside(target)):
        shutil.rmtree(stale, ignore_errors=True)
