"""Lowering a loop: a micro-batched forward exports as a torch scan whose body is the model's
forward over one piece (prge.step.stream). ExecuTorch 1.5.1 emits it as a loop, but two of
its lowering steps need help with such a body:

- LoopAwareXnnpackPartitioner: ExecuTorch lowers delegates inside control-flow bodies, but
  XnnpackPartitioner only tags nodes of the top-level graph, so the body would stay on
  portable kernels (and fail lowering: linear is kept undecomposed for XNNPACK).
- LoopAwareMemoryPlanningPass: the memory plan of a scan body allocates space for every body
  input, including the model weights the body reads (scan passes them in as extra inputs).
  The emitted loop binds those inputs to the weights themselves and never uses that space,
  but the runtime would still allocate (and zero) a second model's worth of arena.
"""
from __future__ import annotations

import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir.backend.partitioner import PartitionResult
from executorch.exir.graph_module import get_control_flow_submodules
from executorch.exir.passes import MemoryPlanningPass
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, OutputKind, OutputSpec, TensorArgument


class LoopAwareXnnpackPartitioner(XnnpackPartitioner):
    def partition(self, exported_program: ExportedProgram) -> PartitionResult:
        result = super().partition(exported_program)
        for name, body, _ in get_control_flow_submodules(exported_program.graph_module):
            original_of, body_program = _body_as_program(body, exported_program)
            for partition in self.generate_partitions(body_program):
                tag = f"{name}_tag{partition.id}"  # partition ids restart per graph
                for node in partition.nodes:
                    original_of[node].meta["delegation_tag"] = tag
                result.partition_tags[tag] = self.delegation_spec
        return result


def _body_as_program(body: torch.fx.GraphModule, owner: ExportedProgram) -> tuple[dict, ExportedProgram]:
    """A stand-alone program over a copy of the body's graph, every input a user input (the
    body's weights are loop inputs, so XNNPACK treats them as dynamic, as the top level does
    with force_non_static_weights_for_f32_linear), plus the map from copied nodes back to the
    body's nodes, which are the ones to tag. A copy, because building a program over the
    body's own graph would re-parent that graph."""
    graph, copy_of = torch.fx.Graph(), {}
    graph.output(graph.graph_copy(body.graph, copy_of))
    inputs = [InputSpec(InputKind.USER_INPUT, TensorArgument(n.name), None) for n in graph.nodes if n.op == "placeholder"]
    outputs = [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(a.name), None) for a in graph.output_node().args[0]]
    program = ExportedProgram(root=body, graph=graph, graph_signature=ExportGraphSignature(inputs, outputs),
                              state_dict={}, range_constraints={}, module_call_graph=[], verifiers=owner.verifiers)
    return {copied: original for original, copied in copy_of.items()}, program


class LoopAwareMemoryPlanningPass(MemoryPlanningPass):
    def run(self, graph_module: torch.fx.GraphModule, graph_signature=None):
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.higher_order.scan:
                body_attr, init, xs = node.args[0], node.args[1], node.args[2]
                body = getattr(graph_module, body_attr.target)
                placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
                # Body inputs are (carry, x slices, extra inputs); only the first two are
                # written into the body's own memory by the loop (ExecuTorch's _emit_scan).
                for extra in placeholders[len(init) + len(xs):]:
                    extra.meta["spec"].const = True  # planning skips const specs
        _outputs_written_back_are_their_buffers(graph_module.graph)
        return super().run(graph_module, graph_signature)

    def run_multimethod(self):
        # Planners given per method (export/layerwise.py InputsFromCaller) name this one planner
        # for several methods, and to_executorch asks each entry; the shared buffers' arena is
        # appended to every method's plan, so only once.
        if not getattr(self, "_multimethod_done", False):
            super().run_multimethod()
            self._multimethod_done = True


def _outputs_written_back_are_their_buffers(graph: torch.fx.Graph) -> None:
    """Give the output's entry of each buffer write-back (copy_(buffer, new value), the last op
    to_executorch puts in a method that mutates a buffer) the buffer's own spec.

    Planning aliases the copy_ node's result onto the buffer (ExecuTorch 1.5.1,
    _alias_inplace_result_specs), but the output node keeps the result specs spec propagation
    gave it, so each written buffer was also planned a second time in the method's arena: the
    size of every weight, never used, in each method of a full-parameter program that writes
    them (538 MB apiece on the default model; an adapter's 0.7 MB in a P-RGE program)."""
    output = graph.output_node()
    specs = output.meta.get("spec")
    returned = output.args[0]
    if not isinstance(specs, (list, tuple)) or not isinstance(returned, (list, tuple)) or len(specs) != len(returned):
        return
    fixed = [value.args[0].meta["spec"] if is_buffer_write_back(value) and "spec" in value.args[0].meta else spec
             for value, spec in zip(returned, specs)]
    output.meta["spec"] = type(specs)(fixed)


def is_buffer_write_back(value) -> bool:
    """A copy_ into one of the method's inputs: how to_executorch writes a mutated buffer back."""
    return (isinstance(value, torch.fx.Node) and value.op == "call_function" and value.target is torch.ops.aten.copy_.default
            and value.args[0].op == "placeholder")
