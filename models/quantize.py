"""Quantizing the frozen base: the linears training never changes, stored as integers.

P-RGE perturbs and updates only LoRA-FA's B; the base weights are read, never written, so they
can be stored in fewer bits. The schemes are the ones ExecuTorch's XNNPACK backend runs as
integer kernels (torchao's `Int8DynamicActivationIntxWeightConfig`): activations quantized to
int8 per token on the fly, weights int8 per output channel ("8da8w") or int4 in groups of
`group_size` input columns ("8da4w").

What stays float32, and why:
- LoRA-FA's A x and B (A x): B is the trained state and its perturbations are eps-sized, far
  below an int8 step; A is tiny. The wrapper's base linear is quantized, the LoRA path is not.
- The output head: the classification loss reads only the label words' rows of it, and tied
  models share it with the input embedding (embeddings are not quantized yet).

The eager engine runs this same quantized module (torchao's reference kernels), and export
traces it; the tensor subclasses are unwrapped into plain tensors first (torchao's
`unwrap_tensor_subclass`), which torch.export needs. XNNPACK's integer kernels do not round
exactly as torchao's reference, so a quantized program's parity with eager has its own
(measured) tolerance.
"""
from __future__ import annotations

from torch import nn

SCHEMES = ("none", "8da8w", "8da4w")
DEFAULT_GROUP_SIZE = 32


class QuantizationError(ValueError):
    """A scheme the model's layers cannot take (e.g. a width not divisible by the group size)."""


def _config(scheme: str, group_size: int):
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if scheme == "8da8w":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))


def frozen_linears(body: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear of the body (the LoRA-FA wrappers' bases included): the layers a scheme
    quantizes. LoRA's own matrices are buffers used through F.linear, never nn.Linear modules."""
    return [(name, m) for name, m in body.named_modules() if type(m) is nn.Linear]


def check_scheme(scheme: str, group_size: int, body: nn.Module) -> None:
    """Refuse, naming the layers, what the scheme cannot do on this model: before any quantizing
    or export work."""
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown --quantize {scheme!r}; choose from {', '.join(SCHEMES)}")
    if scheme == "none":
        return
    linears = frozen_linears(body)
    if not linears:
        raise QuantizationError(f"--quantize {scheme}: the model has no nn.Linear layers to quantize")
    if scheme == "8da4w":
        if group_size < 1:
            raise QuantizationError(f"--group-size must be >= 1, got {group_size}")
        bad = [f"{name} ({m.in_features})" for name, m in linears if m.in_features % group_size]
        if bad:
            raise QuantizationError(
                f"--quantize 8da4w --group-size {group_size}: input widths must be multiples of the group size; "
                f"{len(bad)} layer(s) are not, e.g. {', '.join(bad[:3])}; choose a group size that divides them"
            )


def quantize_frozen_linears(body: nn.Module, scheme: str, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Quantize the body's frozen linears in place (their float32 weights are freed); returns
    how many. The module then computes as the exported program will, up to kernel rounding."""
    check_scheme(scheme, group_size, body)
    if scheme == "none":
        return 0
    from torchao.quantization import quantize_
    from torchao.utils import unwrap_tensor_subclass

    targets = {id(m) for _, m in frozen_linears(body)}
    quantize_(body, _config(scheme, group_size), filter_fn=lambda m, _fqn: id(m) in targets)
    unwrap_tensor_subclass(body)  # plain tensors: what torch.export traces
    return len(targets)
