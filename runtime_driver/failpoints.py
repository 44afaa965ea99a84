"""Kill points for the crash tests: `PRGE_FAILPOINT=NAME[@STEP]` makes the process SIGKILL itself
when it reaches the named point (at that step, if given).

A kill sent from outside lands at a random moment, which rarely hits the few microseconds
between a checkpoint's two renames; these points put a real kill -9 exactly there. Unset (the
normal case) each check is one environment lookup.

Points: ckpt-tmp-written, ckpt-old-moved (checkpoint.py), metrics-torn-line (metrics.py),
adapter-tmp-written (run.py, the final PEFT adapter), after-step (train.py); for a federation
(federation/flower.py, @ROUND): federated-client (a ClientApp), federated-node (its SuperNode
too), federated-server (the SuperLink and ServerApp, once the round is logged). The native driver
has the same points but the federation's (android_harness/src/failpoints.cpp). They live in the driver, never in
the algorithm: lower layers only offer callbacks (models/files.py replace_dir_atomically).
"""
from __future__ import annotations

import os
import signal

ENV = "PRGE_FAILPOINT"


def armed(name: str, step: int | None = None) -> bool:
    """Whether `reached(name, step)` would kill (to set up a torn write just before it)."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    wanted, _, at = spec.partition("@")
    return wanted == name and (not at or (step is not None and int(at) == step))


def reached(name: str, step: int | None = None) -> None:
    if armed(name, step):
        os.kill(os.getpid(), signal.SIGKILL)
