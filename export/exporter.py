"""Trace a PRGEStep (or a CachedDecoder) into one ExecuTorch program whose methods share the
adapter state (and a decoder's KV cache).

The methods and their inputs are the program contract (export/contract/methods.py); all of
them work on the same mutable buffers, lora_B and lora_B_copies of every adapter. Mutable
buffers start at zero in the runtime (their initial values are not serialized); a zero B is
exactly LoRA-FA's initial adapter, and drivers call set_adapter explicitly anyway.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from export.contract.methods import KNOWN_METHODS, TRAINING_METHODS, ExportShapes, ProgramShapes, example_inputs
from models.console import say
from prge.step import PRGEStep

# Tag under which frozen weights go to the external .ptd file.
EXTERNAL_WEIGHTS_TAG = "model"


def _weight_tagger(target: nn.Module, param_placeholders: dict[str, str]) -> Callable[[Any], str | None]:
    """Tags the frozen model weights (parameters) for the .ptd and nothing else: the adapter
    buffers are mutable state, and the constants export lifts out of code (the noise
    generator's scalars, named c_lifted_tensor_N in every method) would collide by name in
    one shared data file.

    The nodes are the lifted program's placeholders (p_step_...), mapped to their FQN through
    param_placeholders (the graph signatures' inputs_to_parameters). That is where the weights
    are: with force_non_static_weights_for_f32_linear XNNPACK owns no weights, the linears take
    them as delegate inputs, so no delegate-side tagging is needed."""
    weights = {f"step.{name}" for name, _ in target.named_parameters(remove_duplicate=False)}

    def tag(node) -> str | None:
        fqn = param_placeholders.get(node.name) if node.op == "placeholder" else None
        return EXTERNAL_WEIGHTS_TAG if fqn in weights else None

    return tag


class _Method(nn.Module):
    """Exposes one method of the exported module (a PRGEStep, or a CachedDecoder) as forward, so
    each method exports as its own program while all of them keep the same module tree (and so
    the same buffer names to share)."""

    def __init__(self, step: nn.Module, name: str) -> None:
        super().__init__()
        self.step = step
        self.method_name = name

    def forward(self, *args: Tensor) -> Tensor:
        return getattr(self.step, self.method_name)(*args)


def delegation_summary(edge_manager, method: str) -> dict[str, Any]:
    """Delegated vs portable nodes of a method, counting loop bodies (a micro-batched
    forward's piece) once, as they appear in the program."""
    from collections import Counter

    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir.graph_module import get_control_flow_submodules

    top = edge_manager.exported_program(method).graph_module
    graphs = [top] + [body for _, body, _ in get_control_flow_submodules(top)]
    subgraphs = delegated_nodes = portable_nodes = 0
    portable, delegated = Counter(), Counter()
    for graph in graphs:
        info = get_delegation_info(graph)
        subgraphs += info.num_delegated_subgraphs
        delegated_nodes += info.num_delegated_nodes
        portable_nodes += info.num_non_delegated_nodes
        for op, b in info.delegation_by_operator.items():
            portable[op] += b.non_delegated
            delegated[op] += b.delegated
    return {
        "delegated_subgraphs": subgraphs,
        "delegated_nodes": delegated_nodes,
        "portable_nodes": portable_nodes,
        "delegated_ops": dict(sorted((op, n) for op, n in delegated.items() if n)),
        "portable_ops": dict(sorted((op, n) for op, n in portable.items() if n)),
    }


def export_step(
    step: PRGEStep,
    shapes: ExportShapes,
    external_weights: bool = False,
    progress: Callable[[str], Any] = say,
    methods: tuple[str, ...] = TRAINING_METHODS,
):
    """Lower the chosen methods (default: the training methods) to one XNNPACK-delegated program.
    Lowering dominates export time, so a caller that needs fewer methods exports fewer.

    Returns what lower_methods returns.
    """
    dims = ProgramShapes.of(shapes, step.num_queries, step.adapter_numel, len(step.label_token_ids), step.vocab_size,
                            step.loss)
    return lower_methods(step, dims, methods, external_weights, progress)


def lower_methods(target: nn.Module, dims: ProgramShapes, methods: tuple[str, ...], external_weights: bool = False,
                  progress: Callable[[str], Any] = say, layerwise: bool = False, inputs_from_caller: tuple[str, ...] = ()):
    """Trace target's methods (contract names, traced with example inputs of dims) and lower them
    to one XNNPACK-delegated program whose methods share target's mutable buffers. The buffers'
    values are not serialized: the runtime starts them at zero (a full-parameter program's
    weights are set by its engine from the export folder's safetensors).

    Every method writes each buffer as soon as its old value is read (export/write_back.py).
    layerwise: delegate one decoder layer at a time and schedule each value just before its use
    (export/layerwise.py), for a program whose forward computes its own weights.
    inputs_from_caller: methods whose inputs the runtime reads from the caller's tensors instead
    of planned memory (InputsFromCaller).

    Returns (ExecutorchProgramManager, {method: delegation summary}, {phase: seconds}).
    """
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    from export.layerwise import InputsFromCaller, LayerwiseXnnpackPartitioner, schedule_depth_first
    from export.loops import LoopAwareMemoryPlanningPass, LoopAwareXnnpackPartitioner
    from export.write_back import write_back_early

    unknown = set(methods) - set(KNOWN_METHODS)
    if unknown or not methods:
        raise ValueError(f"cannot export methods {sorted(unknown) or '(none)'}; known: {KNOWN_METHODS}")
    target.eval()
    timings: dict[str, float] = {}
    began = time.perf_counter()
    programs = {}
    with torch.no_grad():
        for name in methods:
            progress(f"  tracing {name} ...")
            programs[name] = torch.export.export(_Method(target, name), example_inputs(name, dims), strict=False)
    timings["torch_export_s"] = time.perf_counter() - began

    began = time.perf_counter()
    progress("  lowering to edge + XNNPACK ...")
    # force_non_static_weights: the adapter matmuls multiply by B, a buffer, not a constant.
    partitioner_type = LayerwiseXnnpackPartitioner if layerwise else LoopAwareXnnpackPartitioner
    partitioner = partitioner_type(force_non_static_weights_for_f32_linear=True)
    edge = to_edge_transform_and_lower(programs, partitioner=[partitioner])
    if layerwise:
        for name in methods:
            graph_module = edge.exported_program(name).graph_module
            schedule_depth_first(graph_module.graph)
            graph_module.recompile()
    delegation = {name: delegation_summary(edge, name) for name in methods}
    timings["lower_s"] = time.perf_counter() - began

    began = time.perf_counter()
    progress("  serializing ...")
    # One allocation for each mutable buffer, seen by every method: the adapter is shared.
    planner = LoopAwareMemoryPlanningPass(share_mutable_buffers=True)
    config = ExecutorchBackendConfig(
        memory_planning_pass={name: InputsFromCaller(planner) if name in inputs_from_caller else planner for name in methods},
        passes=[write_back_early],
        emit_mutable_buffer_names=True,
        external_constants=_weight_tagger(target, _param_placeholders(edge)) if external_weights else False,
    )
    program = edge.to_executorch(config)
    timings["to_executorch_s"] = time.perf_counter() - began
    return program, delegation, timings


def _param_placeholders(edge) -> dict[str, str]:
    """Placeholder name -> parameter FQN over every method (names derive from the FQN, so the
    methods agree)."""
    names: dict[str, str] = {}
    for name in edge.methods:
        names.update(edge.exported_program(name).graph_signature.inputs_to_parameters)
    return names


def write_program(program, out_dir: Path) -> tuple[Path, Path | None]:
    """Write model.pte (and model.ptd when weights are external)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pte = out_dir / "model.pte"
    pte.write_bytes(program.buffer)
    ptd = None
    tensor_data = getattr(program, "_tensor_data", None)
    if tensor_data:
        # One file per tag, named <tag>.ptd; only EXTERNAL_WEIGHTS_TAG is ever used.
        if set(tensor_data) != {EXTERNAL_WEIGHTS_TAG}:
            raise RuntimeError(f"unexpected external data tags {sorted(tensor_data)}")
        program.write_tensor_data_to_file(str(out_dir))
        ptd = out_dir / f"{EXTERNAL_WEIGHTS_TAG}.ptd"
        if not ptd.is_file():
            raise RuntimeError(f"write_tensor_data_to_file did not write {ptd}")
    return pte, ptd
