"""manifest.json: everything a driver needs to use an exported program without Python model code."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from models.cache import sha256_file
from prge.step import AdapterSlot

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
# Keys a driver relies on; a manifest missing any of them is rejected.
REQUIRED_KEYS = (
    "manifest_version", "program", "methods", "shapes", "num_queries", "adapter", "task",
    "tokenizer", "prng_version", "model", "executorch_version", "defaults",
)


class ManifestError(ValueError):
    pass


def model_weights_hash(model_dir: Path) -> str:
    """sha256 over the folder's weight files (name + content), identifying the frozen model."""
    digest = hashlib.sha256()
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    for f in files:
        digest.update(f.name.encode())
        digest.update(sha256_file(f).encode())
    return digest.hexdigest()


def slots_to_json(slots: tuple[AdapterSlot, ...]) -> list[dict[str, Any]]:
    return [
        {"name": s.name, "shape": list(s.shape), "offset": s.offset, "in_features": s.in_features, "a_stream": s.a_stream}
        for s in slots
    ]


def slots_from_json(rows: list[dict[str, Any]]) -> tuple[AdapterSlot, ...]:
    return tuple(
        AdapterSlot(r["name"], (int(r["shape"][0]), int(r["shape"][1])), int(r["offset"]), int(r["in_features"]), int(r["a_stream"]))
        for r in rows
    )


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    path = out_dir / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(program_dir: str | Path) -> dict[str, Any]:
    path = Path(program_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{path}: not found (is this an `prge export` output folder?)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{path}: missing keys {', '.join(missing)}")
    if manifest["manifest_version"] != MANIFEST_VERSION:
        raise ManifestError(f"{path}: manifest version {manifest['manifest_version']}, this prge reads {MANIFEST_VERSION}")
    return manifest


def verify_program_files(program_dir: Path, manifest: dict[str, Any]) -> None:
    """The .pte/.ptd on disk are the ones this manifest was written for (size and sha256)."""
    for key in ("pte", "ptd"):
        entry = manifest["program"].get(key)
        if entry is None:
            continue
        path = program_dir / entry["file"]
        if not path.is_file():
            raise ManifestError(f"{path}: missing (listed in {MANIFEST_FILE})")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ManifestError(f"{path}: does not match {MANIFEST_FILE} (size or sha256 differ): truncated, corrupted or from another export")
