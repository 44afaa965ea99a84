"""First-order LoRA-FA through ExecuTorch's training extension (a `prge export --first-order`
program): each step is one call of the joint forward-backward method, then the extension's SGD
updates the program's B in place. Only the ExecuTorch runtime runs; no torch autograd.

The extension hands out its parameters only after a first forward_backward call (its
TrainingModule says so), so the engine makes one warm-up call on a padding batch before it
reads or writes the adapter; the call changes nothing (no optimizer step follows it).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from export.contract.manifest import FIRST_ORDER, ManifestError, program_kind, read_manifest, slots_from_json, verify_program_files
from export.contract.methods import FIRST_ORDER_METHODS
from models.console import runtime_logs_filtered
from runtime_driver.engines import program_adapter_config

METHOD = FIRST_ORDER_METHODS[0]


class ExecuTorchFirstOrder:
    """A first-order program loaded for training: first_order_step (forward, backward, SGD),
    eval_logits (the same method's logits output), get_adapter / set_adapter."""

    fixed_eval_batch = True

    def __init__(self, program_dir: str | Path) -> None:
        self.program_dir = Path(program_dir)
        m = self.manifest = read_manifest(self.program_dir)
        if program_kind(m) != FIRST_ORDER:
            raise ManifestError(f"{program_dir}: a {program_kind(m)} program; --method fo with --engine executorch trains a "
                                "program from `prge export --first-order`")
        verify_program_files(self.program_dir, m)
        self.batch_size = self.eval_batch_size = int(m["shapes"]["batch_size"])
        self.seq_len = int(m["shapes"]["seq_len"])
        self.slots = slots_from_json(m["adapter"]["slots"])
        self.adapter_numel = int(m["adapter"]["numel"])
        self.adapter = program_adapter_config(m)
        self.base_model = m["model"]["path"]
        self.model_type = m["model"]["model_type"]
        self.program_sha256 = m["program"]["pte"]["sha256"]
        self.parameter_names: list[str] = m["parameters"]
        self.pte = self.program_dir / m["program"]["pte"]["file"]
        try:
            with runtime_logs_filtered(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the extension marks every entry point experimental, each time
                from executorch.extension.training import _load_for_executorch_for_training

                self._module = _load_for_executorch_for_training(str(self.pte))
        except Exception as e:  # the runtime raises RuntimeError/ValueError with terse messages
            raise ManifestError(f"{self.pte}: ExecuTorch could not load the program ({e})") from None
        self._params: dict[str, Tensor] | None = None
        self._optimizer, self._optimizer_lr = None, None

    def _check_batch(self, input_ids: Tensor) -> None:
        if tuple(input_ids.shape) != (self.batch_size, self.seq_len):
            raise ValueError(f"{METHOD} takes [{self.batch_size}, {self.seq_len}] token ids (fixed at export), "
                             f"got {list(input_ids.shape)}")

    def _forward_backward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        self._check_batch(input_ids)
        loss, logits = self._module.forward_backward(METHOD, (input_ids, attention_mask, labels))[:2]
        if self._params is None:
            named = self._module.named_parameters()
            missing = [n for n in self.parameter_names if n not in named]
            if missing or len(named) != len(self.parameter_names):
                raise ManifestError(f"{self.pte}: its parameters {sorted(named)} are not the manifest's {self.parameter_names}")
            self._params = {n: named[n] for n in self.parameter_names}
        return loss, logits

    def _parameters(self) -> list[Tensor]:
        """The program's B tensors in slot order (views of its memory: writes reach the program)."""
        if self._params is None:
            rows = torch.zeros(self.batch_size, self.seq_len, dtype=torch.int64)
            self._forward_backward(rows, torch.ones_like(rows), torch.zeros(self.batch_size, dtype=torch.int64))
        return [self._params[n] for n in self.parameter_names]

    def first_order_step(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, lr: float) -> float:
        """One SGD step on the batch's mean loss; returns the loss (before the step)."""
        from executorch.extension.training import get_sgd_optimizer

        loss, _ = self._forward_backward(input_ids, attention_mask, labels)
        if self._optimizer is None or lr != self._optimizer_lr:  # plain SGD keeps no state: a new lr is a new optimizer
            self._optimizer, self._optimizer_lr = get_sgd_optimizer(self._params, lr), lr
        self._optimizer.step(self._module.named_gradients())
        return float(loss)

    def eval_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Label-word logits [batch, num_labels]; the method's gradients are computed and dropped."""
        labels = torch.zeros(input_ids.shape[0], dtype=torch.int64)
        return self._forward_backward(input_ids, attention_mask, labels)[1]

    def get_adapter(self) -> Tensor:
        return torch.cat([p.reshape(-1) for p in self._parameters()]).clone()

    def set_adapter(self, flat: Tensor) -> None:
        flat = flat.reshape(-1).to(torch.float32)
        if flat.numel() != self.adapter_numel:
            raise ValueError(f"adapter has {flat.numel()} values, this program's has {self.adapter_numel}")
        for slot, p in zip(self.slots, self._parameters()):
            p.copy_(flat[slot.offset: slot.offset + slot.numel].reshape(p.shape))
