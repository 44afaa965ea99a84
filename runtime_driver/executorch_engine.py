"""Train through the ExecuTorch runtime alone: the exported program's methods are the step.

No torch.nn module runs here; torch tensors are only containers for inputs and outputs.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from export.exporter import METHOD_NAMES as TRAINING_METHODS
from export.manifest import MANIFEST_FILE, ManifestError, read_manifest, verify_program_files
from runtime_driver.executors import step_scalars


def set_runtime_threads(threads: int) -> None:
    """ExecuTorch's own thread pool (torch.set_num_threads does not reach it)."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(threads)


class ExecuTorchPRGE:
    engine = "executorch"

    def __init__(self, program_dir: str | Path, verify: bool = True) -> None:
        from executorch.runtime import Runtime

        self.program_dir = Path(program_dir)
        self.manifest = read_manifest(self.program_dir)
        if verify:
            verify_program_files(self.program_dir, self.manifest)
        files = self.manifest["program"]
        pte = self.program_dir / files["pte"]["file"]
        ptd = self.program_dir / files["ptd"]["file"] if files.get("ptd") else None
        missing = [name for name in TRAINING_METHODS if name not in self.manifest["methods"]]
        if missing:
            raise ManifestError(f"{self.program_dir}: not a training program (no {', '.join(missing)} method)")
        try:
            # Keep the Program alive as long as its methods: a method of a dropped program crashes.
            self.program = Runtime.get().load_program(pte, data_path=ptd)
            # Load every method before the first execute: they share the adapter buffers.
            self.methods = {name: self.program.load_method(name) for name in TRAINING_METHODS}
        except Exception as e:  # the runtime raises RuntimeError/ValueError with terse messages
            raise ManifestError(f"{pte}: ExecuTorch could not load the program ({e})") from None
        self._check_signatures()
        shapes = self.manifest["shapes"]
        self.num_queries = int(self.manifest["num_queries"])
        self.batch_size = int(shapes["batch_size"])
        self.seq_len = int(shapes["seq_len"])
        self.eval_batch_size = int(shapes["eval_batch_size"])
        self.adapter_numel = int(self.manifest["adapter"]["numel"])
        # The runtime starts mutable buffers at zero; make the initial state explicit anyway.
        self.set_adapter(torch.zeros(self.adapter_numel))

    def _check_signatures(self) -> None:
        """The program's own input shapes agree with the manifest (q, shapes, adapter size): a
        manifest edited or paired with another program of a different configuration is refused
        here, before a mismatched tensor reaches the runtime."""
        m, shapes = self.manifest, self.manifest["shapes"]
        expected = {
            ("train_step", 0): [shapes["batch_size"], shapes["seq_len"]],
            ("train_step", 5): [m["num_queries"]],
            ("eval_logits", 0): [shapes["eval_batch_size"], shapes["seq_len"]],
            ("set_adapter", 0): [m["adapter"]["numel"]],
        }
        for (method, index), sizes in expected.items():
            actual = list(self.methods[method].metadata.input_tensor_meta(index).sizes())
            if actual != sizes:
                raise ManifestError(
                    f"{self.program_dir / MANIFEST_FILE}: does not match {self.program_dir / m['program']['pte']['file']}: "
                    f"{method} input {index} is {actual} in the program, {sizes} by the manifest"
                )

    def _run(self, name: str, inputs: list[Tensor]) -> Tensor:
        return self.methods[name].execute(inputs)[0]

    def _check_batch(self, input_ids: Tensor, rows: int, what: str) -> None:
        if tuple(input_ids.shape) != (rows, self.seq_len):
            raise ValueError(
                f"{what} takes [{rows}, {self.seq_len}] token ids (fixed at export), got {list(input_ids.shape)}"
            )

    def train_step(self, input_ids, attention_mask, labels, prev_seed, new_seed, prev_g, lr, eps) -> Tensor:
        self._check_batch(input_ids, self.batch_size, "train_step")
        scalars = step_scalars(prev_seed, new_seed, prev_g, lr, eps)
        return self._run("train_step", [input_ids, attention_mask, labels, *scalars])

    def apply_update(self, prev_seed: int, prev_g: list[float], lr: float) -> None:
        seed, _, g, lr_t, _ = step_scalars(prev_seed, 0, prev_g, lr, 0.0)
        self._run("apply_update", [seed, g, lr_t])

    def eval_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        self._check_batch(input_ids, self.eval_batch_size, "eval_logits")
        return self._run("eval_logits", [input_ids, attention_mask])

    def get_adapter(self) -> Tensor:
        return self._run("get_adapter", []).clone()

    def set_adapter(self, flat: Tensor) -> None:
        flat = flat.reshape(-1).to(torch.float32).contiguous()
        if flat.numel() != self.adapter_numel:
            raise ValueError(f"adapter has {flat.numel()} values, this program's has {self.adapter_numel}")
        self._run("set_adapter", [flat])
