"""Buffer write-backs as early as the buffer's old value allows.

A method that writes a mutable buffer (an adapter, its perturbed copies, the directions a step
keeps, a full-parameter program's weights) returns the new value, and to_executorch copies each
new value into its buffer at the end of the method: every new value is then alive, in the
method's planned arena, until the method ends, across the whole forward. write_back_early copies
each one as soon as nothing reads the old value any more, so its memory is free for the rest.
Applied to every program's methods (export/exporter.py). On the default model it took a
full-parameter train_step's arena from 2,043 to 692 MB (export/layerwise.py); in a P-RGE
train_step it frees the directions the step keeps (PRGEStep.updated) before the forward.
"""
from __future__ import annotations

import torch
from executorch.exir.pass_base import PassResult

from export.loops import is_buffer_write_back


def write_back_early(graph_module: torch.fx.GraphModule) -> PassResult:
    """Move each buffer write-back (the copy_ that to_executorch puts before the output) to just
    after the last node that reads the buffer's old value, or the new value's own node if later,
    so the new value's memory is free from there on rather than alive to the end of the method.

    Reading the old value includes reading it through views: ExecuTorch turns view_copy into a
    view of the same memory after this pass, so a reader of such a view reads the buffer. An
    ExecutorchBackendConfig pass: it runs after the write-backs are inserted, before planning."""
    graph = graph_module.graph
    position = {n: i for i, n in enumerate(graph.nodes)}
    returned = set(graph.output_node().all_input_nodes)
    for node in list(graph.nodes):
        if not (is_buffer_write_back(node) and node in returned):
            continue
        buffer, new = node.args[0], node.args[1]
        readers = _readers_through_views(buffer) - {node}
        after = max([new, *readers], key=position.__getitem__)
        if after.next is not node:
            after.append(node)
    graph.lint()
    graph_module.recompile()
    return PassResult(graph_module, True)


def _readers_through_views(value: torch.fx.Node) -> set[torch.fx.Node]:
    readers, todo = set(), [value]
    while todo:
        for user in todo.pop().users:
            if user.op != "output" and user not in readers:
                readers.add(user)
                if "view" in str(user.target) or "alias" in str(user.target):
                    todo.append(user)
    return readers
