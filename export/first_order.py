"""`prge export --first-order`: first-order LoRA-FA as ExecuTorch's training extension runs it.

This is the route ExecuTorch documents for training on a device (executorch.extension.training):
a joint forward-backward graph exported ahead of time, whose gradients the runtime's SGD applies
to the program's parameters in place. It is the peer P-RGE is measured against, so it trains the
same thing: the B of every LoRA-FA adapter, on the same model, prompts and label words.

The program has one method, first_order_step(input_ids, attention_mask, labels) -> the batch's
mean cross-entropy (the extension differentiates output 0) and the label-word logits (detached),
followed by what the extension appends: the gradient of every B, then every B itself. B is a
constant of the program that the optimizer rewrites in place, so the XNNPACK partitioner is told
to take every linear's weight as an input at run time (force_non_static_weights), never to pack a
copy when the program loads; the parity test against eager SGD holds that the updates are seen.
The extension's own examples lower without a delegate: on the default model that is ~8x slower a
step (portable matmuls), which would make this baseline weaker than a user can get.

Validation runs the same method (its logits output) and drops the gradients: an eval method
exported beside it keeps constants of its own (tried: it went on returning the initial B's
logits after SGD steps), so it would not see the trained adapter.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from export.contract.manifest import build_first_order_manifest, write_manifest
from export.contract.methods import FIRST_ORDER_METHODS, ExportShapes, ProgramShapes, example_inputs
from export.exporter import delegation_summary
from export.pipeline import adapter_entry, check_shapes, export_seconds, step_model_entry, write_program_and_tokenizer
from models.causal_lm import AdapterConfig, ModelError, build_step, load_tokenizer
from models.console import say
from models.files import replace_dir_atomically
from models.tasks.labels import label_token_ids
from models.tasks.spec import TaskSpec
from prge.step import PRGEStep

METHOD = FIRST_ORDER_METHODS[0]


class FirstOrderLoss(nn.Module):
    """A PRGEStep whose adapters' B are trainable parameters (and nothing else is): what the
    joint graph differentiates. Built from a step the caller gives up (its B buffers move)."""

    def __init__(self, step: PRGEStep) -> None:
        super().__init__()
        self.step = step
        for p in step.parameters():
            p.requires_grad_(False)
        for layer in step.adapter_layers:
            b = layer._buffers.pop("lora_B")
            layer.lora_B = nn.Parameter(b.clone(), requires_grad=True)

    def parameter_names(self) -> list[str]:
        """The program's name of each slot's B, in slot order."""
        names = {id(p): name for name, p in self.named_parameters()}
        return [names[id(layer.lora_B)] for layer in self.step.adapter_layers]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        losses, logits = self.step.label_losses_and_logits(input_ids, attention_mask, labels)
        return losses.mean(), logits.detach()


def _empty_permuted_as_empty(program: torch.export.ExportedProgram) -> None:
    """The joint graph's activation backward allocates with aten.empty_permuted, which is not in
    the Core ATen opset ExecuTorch lowers; with the identity order it is aten.empty."""
    for node in program.graph.nodes:
        if node.target == torch.ops.aten.empty_permuted.default:
            size, order = node.args
            if list(order) != list(range(len(order))):
                raise ModelError(f"cannot lower {node.format_node()}: not the identity layout")
            node.target, node.args = torch.ops.aten.empty.memory_format, (size,)
    program.graph_module.recompile()


def lower_first_order(loss: FirstOrderLoss, dims: ProgramShapes, progress: Callable[[str], Any] = say):
    """The joint forward-backward program of loss (ExecutorchProgramManager), its delegation
    summary and its timings."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from torch.export.experimental import _export_forward_backward

    timings: dict[str, float] = {}
    began = time.perf_counter()
    progress(f"  tracing {METHOD} (forward and backward) ...")
    program = torch.export.export(loss, example_inputs(METHOD, dims), strict=False)
    program = _export_forward_backward(program)
    _empty_permuted_as_empty(program)
    timings["torch_export_s"] = time.perf_counter() - began
    began = time.perf_counter()
    progress("  lowering to edge + XNNPACK ...")
    edge = to_edge_transform_and_lower({METHOD: program},
                                       partitioner=[XnnpackPartitioner(force_non_static_weights_for_f32_linear=True)])
    delegation = {METHOD: delegation_summary(edge, METHOD)}
    timings["lower_s"] = time.perf_counter() - began
    began = time.perf_counter()
    progress("  serializing ...")
    manager = edge.to_executorch(ExecutorchBackendConfig())
    timings["to_executorch_s"] = time.perf_counter() - began
    return manager, delegation, timings


def export_first_order(
    model_dir: Path,
    task: TaskSpec,
    adapter: AdapterConfig,
    shapes: ExportShapes,
    out_dir: Path,
    defaults: dict[str, float] | None = None,
    progress: Callable[[str], Any] = say,
) -> dict[str, Any]:
    """Export the first-order program into out_dir atomically; returns its manifest."""
    if task.loss != "classification":
        raise ModelError(f"--first-order exports label-word (classification) tasks; this task's loss is {task.loss!r}")
    adapter.num_queries, adapter.micro_batch = 1, None  # one call, the whole batch: no copies, no pieces
    check_shapes(model_dir, shapes, adapter.num_queries)
    if adapter.quantize != "none":
        raise ModelError("--first-order exports a float32 base; --quantize is for P-RGE programs")
    tokenizer = load_tokenizer(model_dir)
    adapter.loss = task.loss
    label_ids = label_token_ids(tokenizer, task)
    progress(f"Building {model_dir.name} with LoRA-FA (r={adapter.rank}) for first-order training ...")
    step = build_step(model_dir, adapter, label_ids)
    loss = FirstOrderLoss(step)
    dims = ProgramShapes.for_first_order(shapes.batch_size, shapes.seq_len, step.adapter_numel, len(label_ids), step.vocab_size)
    began = time.perf_counter()
    program, delegation, timings = lower_first_order(loss, dims, progress)
    with replace_dir_atomically(Path(out_dir)) as tmp:
        pte, _ = write_program_and_tokenizer(program, model_dir, tmp)
        manifest = build_first_order_manifest(
            pte=pte, shapes=shapes, adapter=adapter_entry(adapter), slots=step.slots,
            parameters=loss.parameter_names(), task=task, label_ids=label_ids,
            tokenizer_file=tmp / "tokenizer.json" if (tmp / "tokenizer.json").is_file() else None,
            pad_token_id=tokenizer.pad_token_id, model=step_model_entry(model_dir, step, True), defaults=defaults or {},
            vocab_size=step.vocab_size, delegation=delegation,
            export_seconds=export_seconds(timings, began),
        )
        write_manifest(tmp, manifest)
    return manifest
