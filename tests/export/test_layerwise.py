"""export/layerwise.py on small graphs: the depth-first schedule keeps each chain together (and a
value's two consumers together) without changing what the graph computes; a node's layer never
falls below its inputs'. The effect on a real program's memory plan is tested on the tiny
full-parameter program (tests/runtime_driver/test_full_mezo_program.py)."""
from __future__ import annotations

import torch
from torch import nn

from export.layerwise import node_layer, schedule_depth_first


class TwoChains(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x + 1  # traced in this order: a, b, a2, b2 (the chains interleaved)
        b = x * 2
        a2 = a * 3
        b2 = b - 1
        base, scaled = a2.double(), b2.double()
        plus = (base + scaled).float()
        minus = (base - scaled).float()
        return torch.cat([plus.sin(), plus.cos(), minus])


def _names(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function" or n.op == "call_method"]


def test_depth_first_keeps_chains_together_and_computes_the_same():
    gm = torch.fx.symbolic_trace(TwoChains())
    x = torch.randn(5)
    expected = gm(x)
    before = _names(gm)
    assert before.index("add") < before.index("mul") < before.index("mul_1")  # interleaved as traced
    schedule_depth_first(gm.graph)
    gm.graph.lint()
    gm.recompile()
    after = _names(gm)
    assert sorted(after) == sorted(before)
    assert after.index("mul_1") < after.index("mul")  # a's chain done before b's starts
    # The minus piece right after the plus piece (it frees base and scaled), before plus's other uses.
    assert after.index("sub_1") == after.index("add_1") + 1 < after.index("sin")
    assert torch.equal(gm(x), expected)


def test_a_node_never_sits_in_a_lower_layer_than_its_inputs():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    in_layer_3 = graph.call_function(torch.neg, (x,))
    in_layer_3.meta["nn_module_stack"] = {"a": ("model.layers.3.mlp", nn.Module)}
    no_layer = graph.call_function(torch.neg, (in_layer_3,))  # e.g. the final norm
    layer_of: dict = {}
    for n in (x, in_layer_3, no_layer):
        layer_of[n] = node_layer(n, layer_of)
    assert (layer_of[x], layer_of[in_layer_3], layer_of[no_layer]) == (-1, 3, 3)


class ReadsTheOldValueLate(nn.Module):
    """Writes its buffer with a value computed early, and reads the old value afterwards through
    a view (which ExecuTorch turns into an alias of the buffer's memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = x * 2
        old = self.w.view(2, 2).sum(0)
        self.w.copy_(new)
        return torch.cat([old, new])


def _lowered_with_early_write_backs(module: nn.Module, example: tuple):
    from executorch.exir import ExecutorchBackendConfig, to_edge
    from executorch.runtime import Runtime

    from export.write_back import write_back_early
    from export.loops import LoopAwareMemoryPlanningPass

    edge = to_edge(torch.export.export(module, example, strict=False))
    config = ExecutorchBackendConfig(passes=[write_back_early], memory_planning_pass=LoopAwareMemoryPlanningPass())
    program = edge.to_executorch(config)
    return program, Runtime.get().load_program(program.buffer).load_method("forward")


def test_a_buffer_is_written_back_early_only_after_its_old_value_is_read():
    x = torch.arange(4.0)
    program, method = _lowered_with_early_write_backs(ReadsTheOldValueLate(), (x,))
    nodes = list(program.exported_program().graph.nodes)
    copy = next(i for i, n in enumerate(nodes) if n.target is torch.ops.aten.copy_.default)
    reads = [i for i, n in enumerate(nodes) if "sum" in str(n.target)]
    assert reads and max(reads) < copy < len(nodes) - 1  # after the old value's last reader, before the end
    eager = ReadsTheOldValueLate()
    for _ in range(3):  # the second and third calls see what the first and second wrote
        torch.testing.assert_close(method.execute([x])[0], eager(x), rtol=0, atol=0)
        x = x + 1
