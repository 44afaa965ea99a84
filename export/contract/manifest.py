"""manifest.json: everything a driver needs to use an exported program without Python model
code. `build_manifest` writes it and `read_manifest` checks it, field by field, so the two
cannot disagree about the schema; `verify_program_files` ties it to the files on disk."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from export.contract.methods import (CONTRACT_VERSION, FIRST_ORDER_METHODS, FULL_MEZO_METHODS, GENERATION_METHODS,
                                     ExportShapes, ProgramShapes, side_methods, signatures_json)
from models.files import sha256_file, write_json_atomic
from models.tasks.spec import TaskSpec
from prge.estimators import DEFAULT_ESTIMATOR, ESTIMATORS, Estimator
from prge.full_mezo import WeightSlot, flat_numel, weight_slots
from prge.step import COMPLETION, LOSS_KINDS, AdapterSlot

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 2
# What a program is for: training (the default, and every program before generation ones) or
# generation (`prge export --generate`: prefill and decode over a KV cache, no noise, no step), or
# first-order (`prge export --first-order`: ExecuTorch's training extension, a joint
# forward-backward method whose gradients its SGD applies; the baseline a user of that route runs),
# or full-mezo (`prge export --mezo-full`: full-parameter MeZO, every weight mutable state), or side
# (`prge side-tune`: the frozen model's forward only, its features sent to a server, and after
# training base + side network).
TRAINING, GENERATION, FIRST_ORDER, FULL_MEZO, SIDE = "training", "generation", "first-order", "full-mezo", "side"
KINDS = (TRAINING, GENERATION, FIRST_ORDER, FULL_MEZO, SIDE)
# Keys a driver relies on; a manifest missing any of them is rejected.
REQUIRED_KEYS = (
    "manifest_version", "contract", "program", "methods", "shapes", "num_queries", "adapter", "task",
    "tokenizer", "prng_version", "model", "versions", "defaults",
)
GENERATION_KEYS = ("manifest_version", "kind", "contract", "program", "methods", "shapes", "adapter", "task",
                   "tokenizer", "model", "versions")
FIRST_ORDER_KEYS = GENERATION_KEYS + ("defaults", "parameters")
FULL_MEZO_KEYS = ("manifest_version", "kind", "contract", "program", "methods", "shapes", "num_queries", "weights",
                  "task", "tokenizer", "prng_version", "model", "versions", "defaults")
SIDE_KEYS = ("manifest_version", "kind", "contract", "program", "methods", "shapes", "side", "task", "tokenizer", "model",
             "versions")
_KEYS = {TRAINING: REQUIRED_KEYS, GENERATION: GENERATION_KEYS, FIRST_ORDER: FIRST_ORDER_KEYS, FULL_MEZO: FULL_MEZO_KEYS,
         SIDE: SIDE_KEYS}
# Packages whose versions change what a program computes or how it was made.
VERSIONED_PACKAGES = ("torch", "executorch", "torchao", "transformers", "peft")

# Packages whose code is traced into a program: after any change to them an old export is stale.
PROGRAM_SOURCES = ("prge", "models", "export")
_REPO_ROOT = Path(__file__).resolve().parents[2]


class ManifestError(ValueError):
    pass


def package_versions() -> dict[str, str]:
    """Installed versions of VERSIONED_PACKAGES (distribution metadata: executorch has no
    __version__), recorded in manifests and benchmark results."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def program_code_version() -> str:
    """A hash of the source that export traces (recorded in manifests): tools that reuse an
    earlier export (the demo, the benchmark cache) reuse it only when this is unchanged."""
    digest = hashlib.sha256()
    for package in PROGRAM_SOURCES:
        for path in sorted((_REPO_ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(_REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


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


def layout_hash(slots: tuple[AdapterSlot, ...]) -> str:
    """Identifies the adapter layout (modules, shapes, A streams): a checkpoint's flat B only
    means something in the layout it was trained in. The native driver computes the same hash
    from the same JSON text (json.dumps of slots_to_json)."""
    return hashlib.sha256(json.dumps(slots_to_json(slots)).encode()).hexdigest()[:16]


def weight_slots_to_json(slots: tuple[WeightSlot, ...]) -> list[dict[str, Any]]:
    """A full-parameter run's layout: each weight's name, shape and noise offset."""
    return [{"name": s.name, "shape": list(s.shape), "offset": s.offset} for s in slots]


def weight_slots_from_json(rows: list[dict[str, Any]]) -> tuple[WeightSlot, ...]:
    return tuple(WeightSlot(r["name"], tuple(int(d) for d in r["shape"]), int(r["offset"])) for r in rows)


def weight_layout_hash(slots: tuple[WeightSlot, ...]) -> str:
    """Identifies a full-parameter layout, as layout_hash does an adapter's."""
    return hashlib.sha256(json.dumps(weight_slots_to_json(slots)).encode()).hexdigest()[:16]


def file_entry(path: Path) -> dict[str, Any]:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _label_task_entry(task: TaskSpec, label_ids: list[int]) -> dict[str, Any]:
    return {"template": task.template, "labels": task.label_names, "label_words": task.label_words,
            "label_token_ids": label_ids, "loss": task.loss, "padding": "left", "chat_template": task.chat_template}


def _provenance(model: dict[str, Any], delegation: dict[str, Any], export_seconds: dict[str, float]) -> dict[str, Any]:
    """What every manifest records of how its program was made: the model, the package and code
    versions, the delegation summary and the export's phases."""
    return {"model": model, "versions": package_versions(), "code_version": program_code_version(),
            "delegation": delegation, "export_seconds": export_seconds}


def _tokenizer_entry(tokenizer_file: Path | None, pad_token_id: int) -> dict[str, Any]:
    return {"file": tokenizer_file.name if tokenizer_file else None,
            "sha256": sha256_file(tokenizer_file) if tokenizer_file else None, "pad_token_id": pad_token_id}


def build_manifest(
    *,
    pte: Path,
    ptd: Path | None,
    methods: tuple[str, ...],
    shapes: ExportShapes,
    micro_batch: int | None,
    num_queries: int,
    adapter: dict[str, Any],
    slots: tuple[AdapterSlot, ...],
    task: TaskSpec,
    label_ids: list[int],
    tokenizer_file: Path | None,
    pad_token_id: int,
    model: dict[str, Any],
    defaults: dict[str, float],
    delegation: dict[str, Any],
    export_seconds: dict[str, float],
    estimator: Estimator,
    vocab_size: int,
    completion_len: int | None,
) -> dict[str, Any]:
    """The manifest of a program written to pte (+ ptd). adapter: kind, rank, alpha, targets,
    a_seed; model: path, id, model_type, weights_sha256. completion_len: a completion
    program's most scored tokens per row (None for label-word tasks)."""
    numel = sum(s.numel for s in slots)
    program_shapes = ProgramShapes.of(shapes, num_queries, numel, len(label_ids), vocab_size, task.loss)
    return {
        "manifest_version": MANIFEST_VERSION,
        "contract": signatures_json(methods, program_shapes),
        "program": {"pte": file_entry(pte), "ptd": file_entry(ptd) if ptd else None},
        "methods": list(methods),
        "shapes": {"batch_size": shapes.batch_size, "seq_len": shapes.seq_len,
                   "eval_batch_size": shapes.eval_batch_size, "micro_batch": micro_batch, "vocab_size": vocab_size,
                   **({"completion_len": completion_len} if task.loss == COMPLETION else {})},
        "num_queries": num_queries,
        "adapter": {**adapter, "numel": numel, "slots": slots_to_json(slots)},
        "task": _label_task_entry(task, label_ids),
        "tokenizer": _tokenizer_entry(tokenizer_file, pad_token_id),
        "estimator": estimator.to_json(),
        "prng_version": estimator.prng_version,
        "defaults": defaults,
        **_provenance(model, delegation, export_seconds),
    }


def build_generation_manifest(
    *,
    pte: Path,
    ptd: Path | None,
    seq_len: int,
    cache_len: int,
    vocab_size: int,
    adapter: dict[str, Any],
    slots: tuple[AdapterSlot, ...],
    task: TaskSpec,
    tokenizer_file: Path | None,
    pad_token_id: int,
    eos_token_ids: list[int],
    model: dict[str, Any],
    delegation: dict[str, Any],
    export_seconds: dict[str, float],
) -> dict[str, Any]:
    """The manifest of a generation program: seq_len is the prefill window, cache_len the most
    positions (prompt plus new tokens) one generation can fill. The task gives the prompt
    template the adapter was trained with; eos_token_ids end a generation."""
    numel = sum(s.numel for s in slots)
    methods = GENERATION_METHODS
    return {
        "manifest_version": MANIFEST_VERSION,
        "kind": GENERATION,
        "contract": signatures_json(methods, ProgramShapes.for_generation(seq_len, numel, vocab_size)),
        "program": {"pte": file_entry(pte), "ptd": file_entry(ptd) if ptd else None},
        "methods": list(methods),
        "shapes": {"seq_len": seq_len, "cache_len": cache_len, "vocab_size": vocab_size},
        "adapter": {**adapter, "numel": numel, "slots": slots_to_json(slots)},
        "task": {"template": task.template, "loss": task.loss, "chat_template": task.chat_template},
        "tokenizer": {**_tokenizer_entry(tokenizer_file, pad_token_id), "eos_token_ids": eos_token_ids},
        **_provenance(model, delegation, export_seconds),
    }


def build_first_order_manifest(
    *,
    pte: Path,
    shapes: ExportShapes,
    adapter: dict[str, Any],
    slots: tuple[AdapterSlot, ...],
    parameters: list[str],
    task: TaskSpec,
    label_ids: list[int],
    tokenizer_file: Path | None,
    pad_token_id: int,
    model: dict[str, Any],
    defaults: dict[str, float],
    vocab_size: int,
    delegation: dict[str, Any],
    export_seconds: dict[str, float],
) -> dict[str, Any]:
    """The manifest of a first-order program: parameters are the program's names of the trainable
    B tensors, one per slot in slot order (how a driver maps the extension's named parameters
    onto the flat adapter)."""
    numel = sum(s.numel for s in slots)
    methods = FIRST_ORDER_METHODS
    dims = ProgramShapes.for_first_order(shapes.batch_size, shapes.seq_len, numel, len(label_ids), vocab_size)
    return {
        "manifest_version": MANIFEST_VERSION,
        "kind": FIRST_ORDER,
        "contract": signatures_json(methods, dims),
        "program": {"pte": file_entry(pte), "ptd": None},
        "methods": list(methods),
        "shapes": {"batch_size": shapes.batch_size, "seq_len": shapes.seq_len, "vocab_size": vocab_size},
        "adapter": {**adapter, "numel": numel, "slots": slots_to_json(slots)},
        "parameters": parameters,
        "task": _label_task_entry(task, label_ids),
        "tokenizer": _tokenizer_entry(tokenizer_file, pad_token_id),
        "defaults": defaults,
        **_provenance(model, delegation, export_seconds),
    }


def build_full_mezo_manifest(
    *,
    pte: Path,
    weights_file: Path,
    shapes: ExportShapes,
    slots: tuple[WeightSlot, ...],
    task: TaskSpec,
    label_ids: list[int],
    tokenizer_file: Path | None,
    pad_token_id: int,
    model: dict[str, Any],
    defaults: dict[str, float],
    vocab_size: int,
    delegation: dict[str, Any],
    export_seconds: dict[str, float],
) -> dict[str, Any]:
    """The manifest of a full-parameter MeZO program: weights.slots lay out the flat weight vector
    its get_adapter / set_adapter exchange (names, shapes, noise offsets); program.weights is the
    safetensors file of the base model's weights the engine starts it from (its buffers start at
    zero)."""
    numel = flat_numel(slots)
    methods = FULL_MEZO_METHODS
    estimator = ESTIMATORS[DEFAULT_ESTIMATOR]  # MeZO: Gaussian directions, plain g
    return {
        "manifest_version": MANIFEST_VERSION,
        "kind": FULL_MEZO,
        "contract": signatures_json(methods, ProgramShapes.of(shapes, 1, numel, len(label_ids), vocab_size, task.loss)),
        "program": {"pte": file_entry(pte), "ptd": None, "weights": file_entry(weights_file)},
        "methods": list(methods),
        "shapes": {"batch_size": shapes.batch_size, "seq_len": shapes.seq_len, "eval_batch_size": shapes.eval_batch_size,
                   "micro_batch": None, "vocab_size": vocab_size},
        "num_queries": 1,
        "weights": {"numel": numel, "slots": weight_slots_to_json(slots)},
        "task": _label_task_entry(task, label_ids),
        "tokenizer": _tokenizer_entry(tokenizer_file, pad_token_id),
        "estimator": estimator.to_json(),
        "prng_version": estimator.prng_version,
        "defaults": defaults,
        **_provenance(model, delegation, export_seconds),
    }


def build_side_manifest(
    *,
    pte: Path,
    batch_size: int,
    seq_len: int,
    taps: tuple[int, ...],
    hidden_size: int,
    network: dict[str, int] | None,
    task: TaskSpec,
    label_ids: list[int],
    tokenizer_file: Path | None,
    pad_token_id: int,
    model: dict[str, Any],
    delegation: dict[str, Any],
    export_seconds: dict[str, float],
) -> dict[str, Any]:
    """The manifest of a side-tuning program: side.taps and hidden_size lay out side_features'
    rows (taps x hidden, then the label logits); side.network is the trained side network's
    configuration (None before training: then the program has side_features only)."""
    methods = side_methods(network is not None)
    features = len(taps) * hidden_size + len(label_ids)
    return {
        "manifest_version": MANIFEST_VERSION,
        "kind": SIDE,
        "contract": signatures_json(methods, ProgramShapes.for_side(batch_size, seq_len, len(label_ids), features)),
        "program": {"pte": file_entry(pte), "ptd": None},
        "methods": list(methods),
        "shapes": {"batch_size": batch_size, "seq_len": seq_len},
        "side": {"taps": list(taps), "hidden_size": hidden_size, "features": features, "network": network},
        "task": _label_task_entry(task, label_ids),
        "tokenizer": _tokenizer_entry(tokenizer_file, pad_token_id),
        **_provenance(model, delegation, export_seconds),
    }


def program_kind(manifest: dict[str, Any]) -> str:
    return manifest.get("kind", TRAINING)


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    return write_json_atomic(out_dir / MANIFEST_FILE, manifest)


def program_shapes(manifest: dict[str, Any]) -> ProgramShapes:
    """The named dimensions of a (checked) manifest's program."""
    shapes = manifest["shapes"]
    if program_kind(manifest) == GENERATION:
        return ProgramShapes.for_generation(shapes["seq_len"], manifest["adapter"]["numel"], shapes["vocab_size"])
    if program_kind(manifest) == FULL_MEZO:
        return ProgramShapes(shapes["batch_size"], shapes["seq_len"], shapes["eval_batch_size"], 1,
                             manifest["weights"]["numel"], len(manifest["task"]["label_token_ids"]), shapes["vocab_size"],
                             manifest["task"]["loss"])
    if program_kind(manifest) == SIDE:
        return ProgramShapes.for_side(shapes["batch_size"], shapes["seq_len"], len(manifest["task"]["label_token_ids"]),
                                      manifest["side"]["features"])
    if program_kind(manifest) == FIRST_ORDER:
        return ProgramShapes.for_first_order(shapes["batch_size"], shapes["seq_len"], manifest["adapter"]["numel"],
                                             len(manifest["task"]["label_token_ids"]), shapes["vocab_size"])
    # vocab_size: absent from manifests of before completion tasks, whose methods never read it.
    return ProgramShapes(shapes["batch_size"], shapes["seq_len"], shapes["eval_batch_size"], manifest["num_queries"],
                         manifest["adapter"]["numel"], len(manifest["task"]["label_token_ids"]),
                         shapes.get("vocab_size", 0), manifest["task"]["loss"])


def task_spec(manifest: dict[str, Any]) -> TaskSpec:
    """The task exactly as the program was exported for (template, label words, loss; a
    generation program keeps the template only)."""
    t = manifest["task"]
    labels = dict(zip(t["labels"], t["label_words"])) if "labels" in t else {}
    return TaskSpec(t["template"], labels, t["loss"], t.get("chat_template", False))


def program_estimator(manifest: dict[str, Any]) -> Estimator:
    """The estimator a (checked) manifest's program was exported for; programs from before
    estimators were a choice all draw Gaussian noise and take plain g (spsa)."""
    return ESTIMATORS[manifest.get("estimator", {"name": DEFAULT_ESTIMATOR})["name"]]


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
    if manifest.get("kind", TRAINING) not in KINDS:
        raise ManifestError(f"{path}: kind {manifest['kind']!r}: expected one of {', '.join(map(repr, KINDS))}")
    missing = [k for k in _KEYS[program_kind(manifest)] if k not in manifest]
    if missing:
        raise ManifestError(f"{path}: missing keys {', '.join(missing)}")
    if manifest["manifest_version"] != MANIFEST_VERSION:
        raise ManifestError(f"{path}: manifest version {manifest['manifest_version']!r}, this prge reads {MANIFEST_VERSION}")
    _check_fields(manifest, path)
    return manifest


def _check_fields(m: dict[str, Any], path: Path) -> None:
    """Every field a driver reads has the right type and sane values, so a damaged or
    hand-edited manifest is one clear error here, not a KeyError deep inside a driver."""

    def fail(key: str, why: str) -> ManifestError:
        return ManifestError(f"{path}: {key}: {why}")

    def positive_int(value: Any, key: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise fail(key, f"expected a positive integer, got {value!r}")
        return value

    def check_file_entry(entry: Any, key: str) -> None:
        if not isinstance(entry, dict):
            raise fail(key, "expected an object with file, bytes, sha256")
        name = entry.get("file")
        # A bare file name inside the export folder: a manifest never points outside it.
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise fail(f"{key}.file", f"expected a file name inside the export folder, got {name!r}")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise fail(f"{key}.sha256", "expected 64 lowercase hex digits")

    program = m["program"]
    if not isinstance(program, dict):
        raise fail("program", "expected an object")
    check_file_entry(program.get("pte"), "program.pte")
    positive_int(program["pte"].get("bytes"), "program.pte.bytes")
    if program.get("ptd") is not None:
        check_file_entry(program["ptd"], "program.ptd")
        positive_int(program["ptd"].get("bytes"), "program.ptd.bytes")
    if program_kind(m) == FULL_MEZO:  # the initial weights, beside the program
        check_file_entry(program.get("weights"), "program.weights")
        positive_int(program["weights"].get("bytes"), "program.weights.bytes")
    if not isinstance(m["methods"], list) or not all(isinstance(x, str) for x in m["methods"]):
        raise fail("methods", "expected a list of method names")
    if not isinstance(m["shapes"], dict):
        raise fail("shapes", "expected an object")
    kind = program_kind(m)
    training = kind in (TRAINING, FULL_MEZO)
    if training:
        for key in ("batch_size", "seq_len", "eval_batch_size"):
            positive_int(m["shapes"].get(key), f"shapes.{key}")
        if m["shapes"].get("micro_batch") is not None:  # absent or null: one pass over all rows
            positive_int(m["shapes"]["micro_batch"], "shapes.micro_batch")
        positive_int(m["num_queries"], "num_queries")
    elif kind == FIRST_ORDER:
        for key in ("batch_size", "seq_len", "vocab_size"):
            positive_int(m["shapes"].get(key), f"shapes.{key}")
    elif kind == SIDE:
        for key in ("batch_size", "seq_len"):
            positive_int(m["shapes"].get(key), f"shapes.{key}")
    else:
        for key in ("seq_len", "cache_len", "vocab_size"):
            positive_int(m["shapes"].get(key), f"shapes.{key}")
        if m["shapes"]["cache_len"] <= m["shapes"]["seq_len"]:
            raise fail("shapes.cache_len", "must exceed seq_len (the prefill window), or no token can follow the prompt")
    if kind == FULL_MEZO:
        slots = _check_weight_fields(m, fail, positive_int)
    elif kind != SIDE:  # a side-tuning program trains nothing on the device
        slots = _check_adapter_fields(m, fail, positive_int)
    task = m["task"]
    if not isinstance(task, dict):
        raise fail("task", "expected an object")
    if not isinstance(task.get("template"), str) or task.get("loss") not in LOSS_KINDS:
        raise fail("task", f"needs a template string and a loss ({', '.join(LOSS_KINDS)})")
    if not isinstance(task.get("chat_template", False), bool):
        raise fail("task", "chat_template must be true or false")
    if not isinstance(m["tokenizer"], dict):
        raise fail("tokenizer", "expected an object")
    if m["tokenizer"].get("file") is not None:  # None: a model without tokenizer.json (files copied as is)
        check_file_entry(m["tokenizer"], "tokenizer")
    if not isinstance(m["model"], dict) or not isinstance(m["model"].get("path"), str):
        raise fail("model", "expected an object with the model's path")
    if not isinstance(m["versions"], dict):
        raise fail("versions", "expected an object")
    if training:
        _check_label_fields(m, fail, positive_int)
        _check_estimator_fields(m, fail)
    elif kind == SIDE:
        _check_label_fields(m, fail, positive_int)
        _check_side_fields(m, fail, positive_int)
    elif kind == FIRST_ORDER:
        _check_label_fields(m, fail, positive_int)
        names = m["parameters"]
        if not (isinstance(names, list) and len(names) == len(slots) and all(isinstance(n, str) and n for n in names)):
            raise fail("parameters", f"expected one parameter name per adapter slot ({len(slots)})")
    else:
        eos = m["tokenizer"].get("eos_token_ids")
        if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
            raise fail("tokenizer.eos_token_ids", "expected a list of token ids")
    contract = m["contract"]
    if not isinstance(contract, dict) or contract.get("version") != CONTRACT_VERSION:
        got = contract.get("version") if isinstance(contract, dict) else contract
        raise fail("contract", f"version {got!r}: this prge drives programs of contract {CONTRACT_VERSION}; re-export the program")
    fixed = {GENERATION: GENERATION_METHODS, FIRST_ORDER: FIRST_ORDER_METHODS, FULL_MEZO: FULL_MEZO_METHODS}.get(kind)
    if kind == SIDE:  # before training: the features only; after: with the side network's logits
        fixed = side_methods(m["side"]["network"] is not None)
    if fixed and m["methods"] != list(fixed):
        raise fail("methods", f"a {kind} program has the methods {', '.join(fixed)}")
    try:
        expected = signatures_json(m["methods"], program_shapes(m))
    except KeyError as e:
        raise fail("methods", f"unknown method {e}") from None
    if contract != expected:
        raise fail("contract", "the methods' inputs and outputs differ from what the manifest's shapes and this "
                               "prge's program contract imply")


def _check_weight_fields(m: dict[str, Any], fail, positive_int) -> tuple[WeightSlot, ...]:
    """A full-parameter program's weight layout: slots in order at even offsets, holding numel values."""
    weights = m["weights"]
    if not isinstance(weights, dict):
        raise fail("weights", "expected an object")
    numel = positive_int(weights.get("numel"), "weights.numel")
    try:
        slots = weight_slots_from_json(weights.get("slots"))
    except (TypeError, KeyError, ValueError, IndexError) as e:
        raise fail("weights.slots", f"malformed ({type(e).__name__}: {e})") from None
    if slots != weight_slots([(s.name, s.shape) for s in slots]) or flat_numel(slots) != numel:
        raise fail("weights.slots", f"do not lay out {numel} values at even offsets in order")
    return slots


def _check_adapter_fields(m: dict[str, Any], fail, positive_int) -> tuple[AdapterSlot, ...]:
    """An adapter program's layout: LoRA settings and slots tiling the flat adapter."""
    adapter = m["adapter"]
    if not isinstance(adapter, dict):
        raise fail("adapter", "expected an object")
    numel = positive_int(adapter.get("numel"), "adapter.numel")
    positive_int(adapter.get("rank"), "adapter.rank")
    if not isinstance(adapter.get("a_seed"), int) or not isinstance(adapter.get("alpha"), (int, float)):
        raise fail("adapter", "needs an integer a_seed and a number alpha")
    try:
        slots = slots_from_json(adapter.get("slots"))
    except (TypeError, KeyError, ValueError, IndexError) as e:
        raise fail("adapter.slots", f"malformed ({type(e).__name__}: {e})") from None
    offset = 0
    for s in slots:
        if s.offset != offset or s.shape[0] < 1 or s.shape[1] < 1:
            raise fail("adapter.slots", f"{s.name}: offset {s.offset} / shape {s.shape} do not tile the flat adapter")
        offset += s.numel
    if offset != numel:
        raise fail("adapter.numel", f"{numel}, but the slots hold {offset} values")
    return slots


def _check_side_fields(m: dict[str, Any], fail, positive_int) -> None:
    """A side-tuning program's feature layout: increasing taps, and features = taps x hidden + labels."""
    side = m["side"]
    if not isinstance(side, dict):
        raise fail("side", "expected an object")
    taps = side.get("taps")
    if not (isinstance(taps, list) and taps and all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in taps)
            and taps == sorted(set(taps))):
        raise fail("side.taps", f"expected increasing layer indices >= 1, got {taps!r}")
    hidden = positive_int(side.get("hidden_size"), "side.hidden_size")
    if side.get("features") != len(taps) * hidden + len(m["task"]["label_token_ids"]):
        raise fail("side.features", "must be len(taps) * hidden_size + the number of labels")
    network = side.get("network")
    if network is not None and not (isinstance(network, dict) and network.get("num_taps") == len(taps)
                                    and network.get("hidden_size") == hidden
                                    and network.get("num_labels") == len(m["task"]["label_token_ids"])):
        raise fail("side.network", "the side network's num_taps, hidden_size and num_labels must match the taps and labels")


def _check_label_fields(m: dict[str, Any], fail, positive_int) -> None:
    """The label words (and a completion task's shapes) of a training or first-order program."""
    task = m["task"]
    labels, words, ids = task.get("labels"), task.get("label_words"), task.get("label_token_ids")
    classes = 0 if task["loss"] == COMPLETION else 2  # a completion task has no label words
    if not (isinstance(labels, list) and isinstance(words, list) and isinstance(ids, list)
            and len(labels) == len(words) == len(ids) >= classes and all(isinstance(i, int) and i >= 0 for i in ids)
            and (classes or not ids)):
        raise fail("task", "labels, label_words and label_token_ids must be lists of one entry per class "
                           f"({'none for a completion task' if classes == 0 else '>= 2'})")
    if task["loss"] == COMPLETION:
        positive_int(m["shapes"].get("completion_len"), "shapes.completion_len")
        positive_int(m["shapes"].get("vocab_size"), "shapes.vocab_size")


def _check_estimator_fields(m: dict[str, Any], fail) -> None:
    """A training program's estimator: one this prge knows, with its noise generator's version."""
    estimator = m.get("estimator", {"name": DEFAULT_ESTIMATOR})
    if not isinstance(estimator, dict) or ESTIMATORS.get(estimator.get("name")) is None:
        raise fail("estimator", f"{estimator!r}: expected an object naming one of {', '.join(ESTIMATORS)}")
    known = ESTIMATORS[estimator["name"]]
    if "estimator" in m and estimator != known.to_json():
        raise fail("estimator", f"{estimator!r} is not this prge's {known.name} ({known.to_json()}); re-export the program")
    if m["prng_version"] != known.prng_version:
        raise fail("prng_version", f"{m['prng_version']!r}: exported with another noise generator than this prge's "
                                   f"{known.prng_version!r} ({known.noise} noise); re-export the program")


def verify_program_files(program_dir: Path, manifest: dict[str, Any]) -> None:
    """The .pte/.ptd (and a full-parameter program's initial weights) and tokenizer on disk are the
    ones this manifest was written for (size and sha256): a truncated or corrupted file, or a
    manifest copied from another export, is refused."""
    tokenizer = program_dir / (manifest["tokenizer"]["file"] or "")
    if manifest["tokenizer"]["file"] and (not tokenizer.is_file() or sha256_file(tokenizer) != manifest["tokenizer"]["sha256"]):
        raise ManifestError(f"{tokenizer}: missing or does not match {MANIFEST_FILE} (sha256 differs): "
                            "not the tokenizer this program was exported with")
    for key in ("pte", "ptd", "weights"):
        entry = manifest["program"].get(key)
        if entry is None:
            continue
        path = program_dir / entry["file"]
        if not path.is_file():
            raise ManifestError(f"{path}: missing (listed in {MANIFEST_FILE})")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ManifestError(f"{path}: does not match {MANIFEST_FILE} (size or sha256 differ): truncated, corrupted or from another export")
