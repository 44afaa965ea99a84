"""What prge prints: progress on stderr (so a command's stdout stays its result), and nothing
from the libraries underneath that a user cannot act on.

Known-harmless lines are silenced at their source, each by its exact message, so every other
warning still shows; `configure(verbose=True)` (`prge ... --verbose`) brings them all back:
  - torchao's "Failed to load .../_C_mxfp8...so" and "_C_cutlass_90a" (CUDA-only kernels a CPU
    build cannot load; logger "torchao", at import, reached through executorch, peft and
    transformers' model loading);
  - torch pytree's "<enum 'KernelPreference'> / <enum 'ScaleCalculationMode'> is an Enum
    subclass ..." (logger "torch.utils._pytree", torchao registering its enums at import);
  - torch.export's FutureWarning "`isinstance(treespec, LeafSpec)` is deprecated" (repeated
    during lowering);
  - ExecuTorch's emitter note that mutated buffers start with a meaningless value (prge sets
    its adapter buffers explicitly before any use);
  - transformers' "Loading weights" progress bars;
  - the ExecuTorch runtime's "[cpuinfo_utils.cpp:..]" lines about midr files and its
    "Resetting threadpool" line: C++ logs the bindings forward to sys.stderr, with no log-level
    switch in the Python API, so `runtime_logs_filtered()` drops exactly those lines around the
    calls that print them (first method load, thread pool reset).
configure() must run before torchao and transformers are first imported (the `prge` entry
point calls it first thing); until it is called, nothing is filtered.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from typing import Iterator

_state = {"configured": False, "verbose": True}

_LOG_NOISE = {
    "torchao": r"^Failed to load .*/torchao/_C_(mxfp8|cutlass_90a)\b",
    "torch.utils._pytree": r"^<enum '(KernelPreference|ScaleCalculationMode)'> is an Enum subclass",
}
# (message regex, category, module regex) of warnings.filterwarnings entries.
_WARNING_NOISE = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, ""),
    (r"Mutation on a buffer in the model is detected", UserWarning, r"executorch\.exir\.emit\._emitter"),
)
_RUNTIME_NOISE = re.compile(
    r"^\[(cpuinfo_utils\.cpp:\d+\] (Reading file |Failed to open midr file |CPU info and manual query"
    r"|Number of efficient cores)|threadpool\.cpp:\d+\] Resetting threadpool to \d+ threads\.)"
)


def say(message: str) -> None:
    """A progress or status line on stderr (e.g. `prge eval > result.json` stays valid JSON)."""
    print(message, file=sys.stderr, flush=True)


class _DropKnownNoise(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return _state["verbose"] or not self.pattern.search(record.getMessage())


def configure(verbose: bool) -> None:
    """Silence the known-harmless lines above (verbose=False) or show everything (True)."""
    _state["verbose"] = verbose
    if not _state["configured"]:
        _state["configured"] = True
        for logger, pattern in _LOG_NOISE.items():
            logging.getLogger(logger).addFilter(_DropKnownNoise(pattern))
    ours = {message for message, _, _ in _WARNING_NOISE}
    warnings.filters[:] = [f for f in warnings.filters
                           if not (f[0] == "ignore" and f[1] is not None and f[1].pattern in ours)]
    if not verbose:
        for message, category, module in _WARNING_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read once, at `import transformers`
    if "transformers" in sys.modules:  # imported already: switch its bars directly
        from transformers.utils import logging as hf_logging

        (hf_logging.enable_progress_bar if verbose else hf_logging.disable_progress_bar)()


class _LineFilter:
    """A sys.stderr stand-in that forwards every line but the runtime's known noise."""

    def __init__(self, target) -> None:
        self.target, self.pending = target, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not _RUNTIME_NOISE.match(line):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def __getattr__(self, name: str):
        return getattr(self.target, name)


@contextlib.contextmanager
def runtime_logs_filtered() -> Iterator[None]:
    """Around ExecuTorch runtime calls that log: drops the known-harmless runtime lines."""
    if _state["verbose"]:
        yield
        return
    stream = _LineFilter(sys.stderr)
    try:
        with contextlib.redirect_stderr(stream):
            yield
    finally:
        if stream.pending:
            stream.target.write(stream.pending)
