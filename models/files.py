"""Where prge keeps downloaded and derived files (never inside the repository)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of prge's cache: $PRGE_CACHE, else $XDG_CACHE_HOME/prge, else ~/.cache/prge."""
    if os.environ.get("PRGE_CACHE"):
        return Path(os.environ["PRGE_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "prge"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (model files are hundreds of MB)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def say(message: str) -> None:
    """Progress and status messages go to stderr, so a command's stdout stays its result
    (e.g. `prge eval > result.json` is valid JSON)."""
    import sys

    print(message, file=sys.stderr, flush=True)
