"""`prge bench --profile`: where the time of one program call goes, operator by operator.

The program is loaded with ExecuTorch's event tracer (ETDump); one call after a warm-up is
recorded, and its events become a table. ETDump nests its events: `Method::execute` holds one
OPERATOR_CALL per portable kernel call (each around a `native_call_<op>` event) and one
DELEGATE_CALL per XNNPACK subgraph (around XNNPACK's own op events, named in
delegate_debug_id_str, e.g. "Dynamic Fully Connected (NC, F32) GEMM #3"). The table's rows are
those innermost events, grouped by name (XNNPACK's per-instance " #k" dropped), plus the time
the wrappers spend outside them, so the rows add up to Method::execute exactly.
XNNPACK reports whole microseconds, so its smallest ops show as 0.
"""
from __future__ import annotations

import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from torch import Tensor

from runtime_driver.engines import ExecuTorchProgram

_WRAPPERS = {"OPERATOR_CALL": "[portable kernel dispatch]", "DELEGATE_CALL": "[XNNPACK delegate, outside its ops]"}


def _op_rows(events: list) -> tuple[dict[str, list], int]:
    """{row name: [calls, ns]} and Method::execute's ns, from one run's profile events (in log
    order: an event is logged when it ends, so a wrapper comes after the events it holds)."""
    rows: dict[str, list] = defaultdict(lambda: [0, 0])
    unclaimed: list = []  # innermost events no wrapper has taken yet
    execute_ns = 0
    for event in events:
        ns = event.end_time - event.start_time
        if event.name == "Method::execute":
            execute_ns += ns
        elif event.name in _WRAPPERS:
            inner = 0
            while unclaimed and unclaimed[-1].start_time >= event.start_time and unclaimed[-1].end_time <= event.end_time:
                child = unclaimed.pop()
                inner += child.end_time - child.start_time
            rows[_WRAPPERS[event.name]][0] += 1
            rows[_WRAPPERS[event.name]][1] += ns - inner
        else:
            name = event.name if event.name is not None else "xnnpack: " + re.sub(r" #\d+$", "", event.delegate_debug_id_str or "?")
            rows[name][0] += 1
            rows[name][1] += ns
            unclaimed.append(event)
    rows["[runtime, outside any op]"] = [1, execute_ns - sum(ns for _, ns in rows.values())]
    return dict(rows), execute_ns


def profile_call(program_dir: Path, method: str, inputs: list[Tensor], warmup: int = 1) -> dict[str, Any]:
    """The op table of one `method(inputs)` call of the program, after `warmup` calls."""
    from executorch.devtools.etdump.serialize import deserialize_from_etdump_flatcc

    program = ExecuTorchProgram(program_dir, methods=(method,), etdump=True)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(warmup):
            program.run(method, inputs)
        program.write_etdump(Path(tmp) / "warmup.etdp")  # writing starts the record over
        began = time.perf_counter()
        program.run(method, inputs)
        wall_ms = (time.perf_counter() - began) * 1000
        program.write_etdump(Path(tmp) / "call.etdp")
        etdump = deserialize_from_etdump_flatcc((Path(tmp) / "call.etdp").read_bytes())
    (run,) = [r for r in etdump.run_data if r.name == "Execute"]
    rows, execute_ns = _op_rows([e.profile_event for e in run.events or [] if e.profile_event is not None])
    ops = [{"op": name, "calls": calls, "ms": round(ns / 1e6, 3), "share": round(ns / execute_ns, 4)}
           for name, (calls, ns) in sorted(rows.items(), key=lambda kv: -kv[1][1])]
    return {"method": method, "program": str(program_dir), "wall_ms": round(wall_ms, 3),
            "execute_ms": round(execute_ns / 1e6, 3), "ops": ops}


def format_profile(profile: dict[str, Any], top: int = 20) -> str:
    lines = [f"ETDump profile of one {profile['method']} call: Method::execute {profile['execute_ms']:.1f} ms "
             f"(wall {profile['wall_ms']:.1f} ms)", f"{'op':<58}{'calls':>7}{'ms':>11}{'share':>8}"]
    for row in profile["ops"][:top]:
        lines.append(f"{row['op'][:57]:<58}{row['calls']:>7}{row['ms']:>11.2f}{100 * row['share']:>7.1f}%")
    rest = profile["ops"][top:]
    if rest:
        lines.append(f"{f'({len(rest)} more rows)':<58}{sum(r['calls'] for r in rest):>7}"
                     f"{sum(r['ms'] for r in rest):>11.2f}{100 * sum(r['share'] for r in rest):>7.1f}%")
    return "\n".join(lines)
