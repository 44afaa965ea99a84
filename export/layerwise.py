"""Lowering a program whose weights are its own mutable state (a full-parameter program, whose
forward computes each layer's perturbed weights just before the layer runs) so that memory
planning can keep those weights and the noise behind them short-lived.

Two steps of ordinary lowering keep them alive together:
- XnnpackPartitioner fuses every connected run of supported nodes into one delegate. The decoder
  layers chain through supported ops only, so the whole stack becomes a few delegates, and every
  input of a delegate must exist before it starts: the perturbed weights of all its layers.
  Pure data-movement ops (reshapes of each weight) fuse the same way across tensors that never
  meet. LayerwiseXnnpackPartitioner cuts each partition by decoder layer and leaves the pieces
  that do no arithmetic worth a delegate to the portable kernels.
- Fusing partitions re-sorts the graph breadth-first, which interleaves independent chains (the
  noise of every draw), so all their temporaries are alive at once. schedule_depth_first puts
  each value just before its first use.
And one step of serializing: a method that writes a buffer returns the new value, and
to_executorch copies every new value into its buffer at the end of the method, so every new
weight is alive until then (all of them: the whole model's worth, twice in set_weights with its
input). write_back_early (export/write_back.py, applied to every program) copies each one as
soon as nothing reads the old value any more, and InputsFromCaller keeps set_weights' input
(every weight) out of its plan.

train_step's planned arena on the default model (BENCHMARKS.md, "Full-parameter MeZO"): 5,107 MB
as ordinarily lowered, 2,043 MB with the layer cut and the schedule, 692 MB with the write-backs
early as well (the weights themselves, 538 MB, are the shared buffers, outside it). The tiny
model's arenas are bounded by tests/runtime_driver/test_full_mezo_program.py.

A node's layer is the index of the first numbered module on its module path (model.layers.<i>);
a node with none (rotary tables, the final norm) takes the largest layer among its inputs, so
along every edge the layer never decreases and the cut pieces cannot form a cycle that the
original partitions did not have.
"""
from __future__ import annotations

import re

import torch
from executorch.exir.backend.partitioner import PartitionResult
from executorch.exir.pass_base import PassResult
from torch.export import ExportedProgram

from export.loops import LoopAwareXnnpackPartitioner

_LAYER_IN_PATH = re.compile(r"\.(\d+)(?:\.|$)")
# A delegate earns its call only if it computes; views, slices and copies run as well outside.
_COMPUTE_OPS = ("linear", "mm", "bmm", "addmm", "convolution", "_softmax")


def node_layer(node: torch.fx.Node, layer_of: dict[torch.fx.Node, int]) -> int:
    """The decoder layer a node belongs to (-1: before the first), never below its inputs'."""
    own = -1
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        found = _LAYER_IN_PATH.search(path)
        if found:
            own = int(found.group(1))
            break
    return max([own] + [layer_of[i] for i in node.all_input_nodes if i in layer_of])


class LayerwiseXnnpackPartitioner(LoopAwareXnnpackPartitioner):
    def partition(self, exported_program: ExportedProgram) -> PartitionResult:
        result = super().partition(exported_program)
        layer_of: dict[torch.fx.Node, int] = {}
        pieces: dict[str, list[torch.fx.Node]] = {}
        for node in exported_program.graph_module.graph.nodes:  # topological order
            layer_of[node] = node_layer(node, layer_of)
            tag = node.meta.get("delegation_tag")
            if tag in result.partition_tags:  # top-level partitions only (loop bodies keep theirs)
                pieces.setdefault(f"{tag}_layer{layer_of[node]}", []).append(node)
        for tag in [t for t in result.partition_tags if any(p.startswith(f"{t}_layer") for p in pieces)]:
            del result.partition_tags[tag]
        for piece, nodes in pieces.items():
            if any(_computes(n) for n in nodes):
                for n in nodes:
                    n.meta["delegation_tag"] = piece
                result.partition_tags[piece] = self.delegation_spec
            else:
                for n in nodes:
                    del n.meta["delegation_tag"]
        return result


def _computes(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "")  # aten.linear.default (edge) or linear.default (ATen)
    return name.removeprefix("aten.").split(".")[0] in _COMPUTE_OPS


def schedule_depth_first(graph: torch.fx.Graph) -> None:
    """Reorder graph's nodes so each value is computed just before its first consumer: a
    depth-first post-order from the outputs, each node's deepest input first.
    After each node, any node that is now the last consumer of one of its inputs, and can run,
    runs too, so that input is freed: the minus piece of a weight right after the plus piece,
    not after every other plus piece (their shared float64 base and noise would wait).

    Fusing partitions re-sorts the graph breadth-first (torch.fx's legalize_graph), which
    interleaves independent chains, here the noise of every draw, so that all their
    temporaries are alive at once, and memory planning gives each its own space."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise ValueError("schedule_depth_first expects a method with inputs (its buffers count)")
    output = graph.output_node()
    order: list[torch.fx.Node] = []
    done = set(placeholders)
    waiting = {n: len(n.users) for n in graph.nodes}  # consumers of each node not yet scheduled

    def schedule(node: torch.fx.Node) -> None:
        ready = [node]
        while ready:
            n = ready.pop()
            if n in done:
                continue
            done.add(n)
            order.append(n)
            for i in n.all_input_nodes:
                waiting[i] -= 1
                if waiting[i] == 1 and i.op not in ("placeholder", "get_attr"):  # inputs, weights: never freed
                    last = next(u for u in i.users if u not in done)
                    if last is not output and all(j in done for j in last.all_input_nodes):
                        ready.append(last)

    # A node's deepest input (the longest chain of ops behind it) is visited first, the others
    # in the order the node takes them: a layer takes the hidden state from below and its own
    # weights, so the forward descends to the first layer before any weight is made, and each
    # layer's weights are made just before it runs, rather than every layer's weights first,
    # all alive through the forward (and the loss comes before the buffers' new values). The
    # others keep their order: consecutive weights share a draw of noise, freed once they are made.
    depth: dict[torch.fx.Node, int] = {}
    for n in graph.nodes:  # topological order
        depth[n] = 1 + max((depth[i] for i in n.all_input_nodes), default=0)

    def deepest_first(node: torch.fx.Node):
        inputs = node.all_input_nodes
        if not inputs:
            return iter(())
        deepest = max(inputs, key=depth.__getitem__)
        return iter([deepest] + [i for i in inputs if i is not deepest])

    for sink in [n for n in graph.nodes if not n.users and n not in done]:  # the output last, as it is
        stack = [(sink, deepest_first(sink))]
        while stack:
            node, inputs = stack[-1]
            for i in inputs:
                if i not in done:  # a DAG: an input is never on the stack above it
                    stack.append((i, deepest_first(i)))
                    break
            else:
                stack.pop()
                schedule(node)
    cursor = placeholders[-1]
    for node in order:
        cursor.append(node)
        cursor = node


class InputsFromCaller:
    """Plan one method with a planner the program's methods share (they share its mutable
    buffers), leaving the method's inputs out of the plan: the runtime then reads an input from
    the caller's tensor (Method::set_input aliases an input that has no planned memory) instead
    of copying it into the method's arena. For set_weights, whose input is every weight: the
    caller holds them anyway, and a planned copy would stay resident for the program's life.
    Given in ExecutorchBackendConfig's per-method memory_planning_pass."""

    def __init__(self, planner) -> None:
        self.planner = planner

    def run(self, graph_module: torch.fx.GraphModule, graph_signature=None) -> PassResult:
        self.planner.alloc_graph_input = False
        try:
            return self.planner.run(graph_module, graph_signature)
        finally:
            self.planner.alloc_graph_input = True
