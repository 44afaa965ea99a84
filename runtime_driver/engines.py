"""The engines a run trains with, side by side behind one interface.

The training loop calls five operations, with plain Python numbers for seeds, g, lr and eps:
train_step, apply_update, get_adapter, set_adapter and the evaluation of its task: eval_logits
(label words), or eval_losses and next_token_logits (completions). An engine also says what it
trains (adapter layout and settings, base model, program), so a run writes the same files
whichever engine produced them.
  EagerPRGE        the PRGEStep module in PyTorch: the very module that export traces
  EagerSequential  the MeZO-style baseline: the same estimator as 2q sequential forwards
  EagerFullMeZO    full-parameter MeZO (prge/full_mezo.py): every weight trained, the flat
                   weight vector in place of the adapter
  ExecuTorchPRGE   an exported program through the ExecuTorch runtime alone; no nn.Module
                   runs, torch tensors are only containers for inputs and outputs
  ExecuTorchFullMeZO  a full-parameter MeZO program (`prge export --mezo-full`) the same way
ExecuTorchProgram is the one way a program is loaded and called (the engine, the benchmark,
its workers): manifest checked, files verified, methods loaded together, their signatures
checked against the program contract, outputs that own their memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import Tensor

from export.contract.manifest import (FULL_MEZO, GENERATION, MANIFEST_FILE, SIDE, TRAINING, ManifestError, program_estimator,
                                      program_kind, program_shapes, read_manifest, slots_from_json, verify_program_files,
                                      weight_slots_from_json)
from export.contract.methods import (FULL_MEZO_METHODS, GENERATION_METHODS, OUTPUTS, inputs_of, step_scalars, training_methods,
                                     update_scalars)
from models.causal_lm import DEFAULT_COMPLETION_LEN, AdapterConfig
from models.console import runtime_logs_filtered
from models.model_folder import read_flat_weights
from models.quantize import DEFAULT_GROUP_SIZE
from prge.estimators import DEFAULT_ESTIMATOR, Estimator, estimator_named
from prge.full_mezo import FullMeZOStep
from prge.step import AdapterSlot, PRGEStep

EAGER_EVAL_BATCH = 16  # rows per eager eval forward (any batch size works eagerly)
# ExecuTorch's ScalarType codes (TensorInfo.dtype()) of the dtypes the contract uses.
_SCALAR_TYPES = {4: "int64", 6: "float32"}


class Engine(Protocol):
    num_queries: int
    seq_len: int  # prompt length the engine takes
    eval_batch_size: int  # rows per eval call
    fixed_eval_batch: bool  # the eval methods take exactly eval_batch_size rows (an exported program)
    completion_len: int | None  # a completion task's most scored tokens per row
    slots: tuple[AdapterSlot, ...]  # the flat adapter's layout
    adapter: AdapterConfig  # rank, alpha, targets, a_seed as used
    estimator: Estimator  # the noise the step draws and how its losses become g
    base_model: str  # the frozen model's folder
    model_type: str
    program_sha256: str | None  # the .pte's (checkpoints are tied to it), None for eager

    def train_step(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, prev_seed: int, new_seed: int,
                   prev_g: list[float], lr: float, eps: float) -> Tensor: ...

    def apply_update(self, prev_seed: int, prev_g: list[float], lr: float) -> None: ...

    def eval_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...

    def eval_losses(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor: ...

    def next_token_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...

    def get_adapter(self) -> Tensor: ...

    def set_adapter(self, flat: Tensor) -> None: ...


def set_runtime_threads(threads: int) -> None:
    """ExecuTorch's own thread pool (torch.set_num_threads does not reach it)."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    with runtime_logs_filtered():
        _unsafe_reset_threadpool(threads)


# ---- eager ----------------------------------------------------------------------------------
class EagerPRGE:
    """P-RGE in eager PyTorch: one batched forward over the 2q perturbed copies."""

    fixed_eval_batch = False
    program_sha256 = None

    def __init__(self, step: PRGEStep, model_dir: Path, adapter: AdapterConfig, seq_len: int,
                 eval_batch_size: int = EAGER_EVAL_BATCH) -> None:
        self.step = step
        self.num_queries = step.num_queries
        self.seq_len = seq_len
        self.eval_batch_size = eval_batch_size
        self.slots = step.slots
        self.adapter = adapter
        self.estimator = estimator_named(adapter.estimator)
        self.base_model = str(Path(model_dir).resolve())
        self.model_type = step.body.backbone.config.model_type
        self.completion_len = step.completion_len

    @torch.no_grad()
    def train_step(self, input_ids, attention_mask, labels, prev_seed, new_seed, prev_g, lr, eps) -> Tensor:
        return self.step.train_step(input_ids, attention_mask, labels, *step_scalars(prev_seed, new_seed, prev_g, lr, eps))

    @torch.no_grad()
    def apply_update(self, prev_seed: int, prev_g: list[float], lr: float) -> None:
        self.step.apply_update(*update_scalars(prev_seed, prev_g, lr))

    @torch.no_grad()
    def eval_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.step.eval_logits(input_ids, attention_mask)

    @torch.no_grad()
    def eval_losses(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        return self.step.eval_losses(input_ids, attention_mask, labels)

    @torch.no_grad()
    def next_token_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.step.next_token_logits(input_ids, attention_mask)

    def get_adapter(self) -> Tensor:
        return self.step.get_adapter()

    @torch.no_grad()
    def set_adapter(self, flat: Tensor) -> None:
        self.step.set_adapter(flat)


class EagerSequential(EagerPRGE):
    """MeZO-style estimation: the same update from 2q sequential forwards of the plain batch."""

    @torch.no_grad()
    def train_step(self, input_ids, attention_mask, labels, prev_seed, new_seed, prev_g, lr, eps) -> Tensor:
        prev, new, g, lr_t, eps_t = step_scalars(prev_seed, new_seed, prev_g, lr, eps)
        self.step.apply_update(prev, g, lr_t)
        return self.step.sequential_losses(input_ids, attention_mask, labels, new, eps_t)


class EagerFullMeZO(EagerPRGE):
    """Full-parameter MeZO in eager PyTorch. Its "adapter" (get_adapter, set_adapter,
    checkpoints, replay) is the flat weight vector in the step's WeightSlot order."""

    completion_len = None

    def __init__(self, step: FullMeZOStep, model_dir: Path, seq_len: int, eval_batch_size: int = EAGER_EVAL_BATCH) -> None:
        self.step = step
        self.num_queries = 1
        self.seq_len = seq_len
        self.eval_batch_size = eval_batch_size
        self.slots = step.slots
        self.adapter = AdapterConfig(num_queries=1, loss=step.loss, estimator=DEFAULT_ESTIMATOR)
        self.estimator = estimator_named(DEFAULT_ESTIMATOR)  # MeZO: Gaussian directions, plain finite differences
        self.base_model = str(Path(model_dir).resolve())
        self.model_type = step.model.config.model_type

    @torch.no_grad()
    def apply_update(self, prev_seed: int, prev_g: list[float], lr: float) -> None:
        self.step.apply_weight_update(*update_scalars(prev_seed, prev_g, lr))

    def set_adapter(self, flat: Tensor) -> None:
        self.step.set_weights(flat)


# ---- ExecuTorch -----------------------------------------------------------------------------
class ExecuTorchProgram:
    """An exported program loaded for the named methods, checked against its manifest and the
    program contract before anything runs."""

    def __init__(self, program_dir: str | Path, methods: tuple[str, ...] | None = None, etdump: bool = False) -> None:
        """methods: None = every method a driver of this program calls (the training methods of
        its loss, or a generation program's). etdump: record an
        ExecuTorch profile of every call (write_etdump collects it)."""
        from executorch.runtime import Runtime

        self.program_dir = Path(program_dir)
        self.manifest = read_manifest(self.program_dir)
        verify_program_files(self.program_dir, self.manifest)
        self.loss = self.manifest["task"]["loss"]
        if methods is None:
            kind = program_kind(self.manifest)
            methods = (tuple(self.manifest["methods"]) if kind == SIDE  # its methods depend on whether it is trained
                       else {GENERATION: GENERATION_METHODS, FULL_MEZO: FULL_MEZO_METHODS}.get(kind, training_methods(self.loss)))
        missing = [name for name in methods if name not in self.manifest["methods"]]
        if missing:
            raise ManifestError(f"{self.program_dir}: the program has no {', '.join(missing)} method "
                                f"(it has {', '.join(self.manifest['methods'])})")
        files = self.manifest["program"]
        self.pte = self.program_dir / files["pte"]["file"]
        ptd = self.program_dir / files["ptd"]["file"] if files.get("ptd") else None
        try:
            with runtime_logs_filtered():
                # Keep the Program alive as long as its methods: a method of a dropped program crashes.
                self._program = Runtime.get().load_program(self.pte, data_path=ptd, enable_etdump=etdump)
                # Load every method before the first execute: they share the adapter buffers.
                self._methods = {name: self._program.load_method(name) for name in methods}
        except Exception as e:  # the runtime raises RuntimeError/ValueError with terse messages
            raise ManifestError(f"{self.pte}: ExecuTorch could not load the program ({e})") from None
        self._check_signatures()

    def _check_signatures(self) -> None:
        """Every input and the output of every loaded method has the dtype and shape the
        contract gives for this manifest's shapes: a manifest edited, or paired with another
        program, is refused here, before a mismatched tensor reaches the runtime."""
        dims = program_shapes(self.manifest)
        where = f"{self.program_dir / MANIFEST_FILE}: does not match {self.pte}"
        for name, method in self._methods.items():
            meta = method.metadata
            inputs = inputs_of(name, self.loss)
            if meta.num_inputs() != len(inputs):
                raise ManifestError(f"{where}: {name} takes {meta.num_inputs()} inputs, the contract {len(inputs)}")
            expected = [(f"input {i} ({a.name})", meta.input_tensor_meta(i), a) for i, a in enumerate(inputs)]
            expected.append(("output", meta.output_tensor_meta(0), OUTPUTS[name]))
            for what, info, arg in expected:
                actual = (_SCALAR_TYPES.get(info.dtype(), f"dtype {info.dtype()}"), list(info.sizes()))
                wanted = (arg.dtype, dims.resolve(arg))
                if actual != wanted:
                    raise ManifestError(f"{where}: {name} {what} is {actual[0]} {actual[1]} in the program, "
                                        f"{wanted[0]} {wanted[1]} by the manifest")

    def write_etdump(self, path: Path) -> None:
        """Write the calls profiled since the last write (or the load) to path, and start over."""
        # The second path is for intermediate outputs, which only a debug buffer records (none here).
        self._program.write_etdump_result_to_file(str(path), str(path.with_suffix(".debug")))

    def run(self, name: str, inputs: list[Tensor]) -> Tensor:
        """The method's output, in memory of its own. The runtime reuses its planned memory on
        the next execute; the Python bindings copy every output out of it (Method.execute's
        default clone_outputs=True; tests/runtime_driver/test_engines.py holds this), while the
        C++ Module API returns views, so the native driver copies (android_harness/src/program.cpp)."""
        return self._methods[name].execute(inputs)[0]


def program_adapter_config(manifest: dict) -> AdapterConfig:
    """The adapter settings a training or first-order program was exported with (an eager twin is
    built from them)."""
    a = manifest["adapter"]
    quantization = manifest["model"].get("quantization") or {"scheme": "none"}  # older programs: float32
    # A first-order program records no queries: one call takes the batch.
    return AdapterConfig(num_queries=int(manifest.get("num_queries", 1)), rank=a["rank"], alpha=a["alpha"], targets=a["targets"],
                         loss=manifest["task"]["loss"], a_seed=a["a_seed"], adapted=[s["name"] for s in a["slots"]],
                         completion_len=manifest["shapes"].get("completion_len") or DEFAULT_COMPLETION_LEN,
                         micro_batch=manifest["shapes"].get("micro_batch"), quantize=quantization["scheme"],
                         group_size=quantization.get("group_size") or DEFAULT_GROUP_SIZE,
                         estimator=program_estimator(manifest).name)


class ExecuTorchPRGE:
    """Train through the ExecuTorch runtime alone: the exported program's methods are the step."""

    fixed_eval_batch = True
    kind = TRAINING  # the program kind this engine drives

    def __init__(self, program_dir: str | Path) -> None:
        m = self._load(program_dir)
        self.num_queries = int(m["num_queries"])
        self.adapter_numel = int(m["adapter"]["numel"])
        self.slots = slots_from_json(m["adapter"]["slots"])
        self.adapter = program_adapter_config(m)
        self.estimator = estimator_named(self.adapter.estimator)  # as the eager engine derives it
        self.completion_len = m["shapes"].get("completion_len")
        # The runtime starts mutable buffers at zero; make the initial state explicit anyway.
        self.set_adapter(torch.zeros(self.adapter_numel))

    def _load(self, program_dir: str | Path) -> dict:
        """Load the program, refuse one of another kind, and take what every training-program
        engine reads from its manifest (shapes, base model, the .pte's hash); returns the manifest."""
        self.program = ExecuTorchProgram(program_dir)
        m = self.manifest = self.program.manifest
        if program_kind(m) != self.kind:
            raise ManifestError(self._wrong_kind(program_dir, program_kind(m)))
        self.program_dir = self.program.program_dir
        shapes = m["shapes"]
        self.batch_size = int(shapes["batch_size"])
        self.seq_len = int(shapes["seq_len"])
        self.eval_batch_size = int(shapes["eval_batch_size"])
        self.base_model = m["model"]["path"]
        self.model_type = m["model"]["model_type"]
        self.program_sha256 = m["program"]["pte"]["sha256"]
        return m

    @staticmethod
    def _wrong_kind(program_dir: str | Path, kind: str) -> str:
        hint = {FULL_MEZO: "train it with --method mezo-full"}.get(kind, "train with a program from `prge export`")
        return f"{program_dir}: a {kind} program has no P-RGE training step; {hint}"

    def _check_batch(self, input_ids: Tensor, rows: int, what: str) -> None:
        if tuple(input_ids.shape) != (rows, self.seq_len):
            raise ValueError(
                f"{what} takes [{rows}, {self.seq_len}] token ids (fixed at export), got {list(input_ids.shape)}"
            )

    def train_step(self, input_ids, attention_mask, labels, prev_seed, new_seed, prev_g, lr, eps) -> Tensor:
        self._check_batch(input_ids, self.batch_size, "train_step")
        scalars = step_scalars(prev_seed, new_seed, prev_g, lr, eps)
        return self.program.run("train_step", [input_ids, attention_mask, labels, *scalars])

    def apply_update(self, prev_seed: int, prev_g: list[float], lr: float) -> None:
        self.program.run("apply_update", list(update_scalars(prev_seed, prev_g, lr)))

    def eval_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        self._check_batch(input_ids, self.eval_batch_size, "eval_logits")
        return self.program.run("eval_logits", [input_ids, attention_mask])

    def eval_losses(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        self._check_batch(input_ids, self.eval_batch_size, "eval_losses")
        return self.program.run("eval_losses", [input_ids, attention_mask, labels])

    def next_token_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        self._check_batch(input_ids, self.eval_batch_size, "next_token_logits")
        return self.program.run("next_token_logits", [input_ids, attention_mask])

    def get_adapter(self) -> Tensor:
        return self.program.run("get_adapter", [])

    def set_adapter(self, flat: Tensor) -> None:
        self.program.run("set_adapter", [self._checked_flat(flat)])

    def _checked_flat(self, flat: Tensor) -> Tensor:
        flat = flat.reshape(-1).to(torch.float32).contiguous()
        if flat.numel() != self.adapter_numel:
            raise ValueError(f"adapter has {flat.numel()} values, this program's has {self.adapter_numel}")
        return flat


class ExecuTorchFullMeZO(ExecuTorchPRGE):
    """Full-parameter MeZO through the ExecuTorch runtime: the program holds every weight as
    mutable state, set here from the export folder's weights.safetensors (verified against the
    manifest with the program's other files); get_adapter / set_adapter exchange the flat weight
    vector, as EagerFullMeZO's do."""

    kind = FULL_MEZO

    def __init__(self, program_dir: str | Path, on_phase: Callable[[str], None] = lambda _: None) -> None:
        """on_phase(name) is called after each part of the set-up (`prge bench` reads the
        process's memory there: where a full-parameter program's peak comes from)."""
        m = self._load(program_dir)
        on_phase("program loaded (every method)")
        self.num_queries = 1
        self.adapter_numel = int(m["weights"]["numel"])
        self.slots = weight_slots_from_json(m["weights"]["slots"])
        self.adapter = AdapterConfig(num_queries=1, loss=m["task"]["loss"], estimator=DEFAULT_ESTIMATOR)
        self.estimator = estimator_named(DEFAULT_ESTIMATOR)
        self.completion_len = None
        # The runtime starts the weights at zero: set the base model's.
        weights = read_flat_weights(self.program_dir / m["program"]["weights"]["file"], self.slots)
        on_phase("base weights read (weights.safetensors)")
        self.set_adapter(weights)
        del weights
        on_phase("base weights set (set_weights), the flat copy freed")

    @staticmethod
    def _wrong_kind(program_dir: str | Path, kind: str) -> str:
        return f"{program_dir}: not a full-parameter program (kind {kind!r}); export one with `prge export --mezo-full`"

    def apply_update(self, prev_seed: int, prev_g: list[float], lr: float) -> None:
        self.program.run("apply_weight_update", list(update_scalars(prev_seed, prev_g, lr)))

    def set_adapter(self, flat: Tensor) -> None:
        self.program.run("set_weights", [self._checked_flat(flat)])
