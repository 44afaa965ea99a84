"""What a program asks the runtime to allocate, read from its .pte.

ExecuTorch plans each method's intermediate tensors into an arena ahead of time (memory planning
at export), and the runtime allocates it when it loads the method. Sizes per method are
[reserved, the method's arena, the mutable buffers' arena]: prge's exports share the mutable
buffers (an adapter, a full-parameter program's weights) between all methods
(share_mutable_buffers), so that last arena is one allocation, reported once.
"""
from __future__ import annotations

from pathlib import Path

MUTABLE_BUFFERS = "mutable_buffers"


def planned_arenas(pte: str | Path) -> dict[str, int]:
    """{method: bytes of its planned arena, MUTABLE_BUFFERS: bytes of the shared buffers}."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    plans = deserialize_pte_binary(Path(pte).read_bytes()).program.execution_plan
    out = {plan.name: (plan.non_const_buffer_sizes[1:2] or [0])[0] for plan in plans}
    out[MUTABLE_BUFFERS] = max((sum(plan.non_const_buffer_sizes[2:]) for plan in plans), default=0)
    return out
