"""Quantizing the frozen base: the linears training never changes, stored as integers.

P-RGE perturbs and updates only LoRA-FA's B; the base weights are read, never written, so they
can be stored in fewer bits. The schemes are the ones ExecuTorch's XNNPACK backend runs as
integer kernels (torchao's `Int8DynamicActivationIntxWeightConfig`): activations quantized to
int8 per token on the fly, weights int8 per output channel ("8da8w") or int4 in groups of
`group_size` input columns ("8da4w").

What stays float32, and why:
- LoRA-FA's A x and B (A x): B is the trained state and its perturbations are eps-sized, far
  below an int8 step; A is tiny. The wrapper's base linear is quantized, the LoRA path is not.
- The output head of a classification program: the loss reads only the label words' rows, kept
  as a small float32 copy (prge/step.py), so the full head is not in the program at all. A
  full-vocabulary ("lm") loss needs every row: its head is quantized like the body's linears.

The input embedding is a gather, not a matmul, so XNNPACK does not run it and the Python
runtime has no quantized embedding kernels; it becomes int8 with one float32 scale per row,
looked up by the portable `embedding` op (which copies rows of any dtype) and rescaled
(`Int8RowEmbedding`). For the 0.5B-1B models its float32 table is most of the program.

The eager engine runs this same quantized module (torchao's reference kernels), and export
traces it; the tensor subclasses are unwrapped into plain tensors first (torchao's
`unwrap_tensor_subclass`), which torch.export needs. XNNPACK's integer kernels do not round
exactly as torchao's reference, so a quantized program's parity with eager has its own
(measured) tolerance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCHEMES = ("none", "8da8w", "8da4w")
DEFAULT_GROUP_SIZE = 32


class QuantizationError(ValueError):
    """A scheme the model's layers cannot take (e.g. a width not divisible by the group size)."""


class Int8RowEmbedding(nn.Module):
    """An input embedding stored as int8 with one float32 scale per row (symmetric, 127 steps
    per row's largest magnitude): a quarter of the float32 table. A row is rebuilt exactly as
    int8 * scale, so eager and the program compute the same numbers.

    multiplier: a family's scaling inside its embedding module (Gemma 3 multiplies by
    sqrt(hidden)); kept so the module stays a drop-in replacement."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        weight = embedding.weight.detach().to(torch.float32)
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
        # Frozen parameters, not buffers: they are the model's weights, and `--external-weights`
        # moves parameters to the .ptd.
        self.weight_int8 = nn.Parameter(torch.round(weight / scale).clamp(-127, 127).to(torch.int8), requires_grad=False)
        self.row_scale = nn.Parameter(scale, requires_grad=False)  # [vocab, 1]: looked up like the rows
        multiplier = getattr(embedding, "embed_scale", None)
        self.register_buffer("multiplier", None if multiplier is None else torch.as_tensor(multiplier, dtype=torch.float32).clone())
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, input_ids: Tensor) -> Tensor:
        rows = F.embedding(input_ids, self.weight_int8).to(torch.float32) * F.embedding(input_ids, self.row_scale)
        return rows if self.multiplier is None else rows * self.multiplier


def quantize_input_embedding(backbone: nn.Module, probe_ids: Tensor) -> None:
    """Replace the backbone's input embedding by its Int8RowEmbedding, after checking on the
    probe tokens that the new module returns the old one's rows up to half an int8 step (a
    family whose embedding module does more than a lookup and a scale is refused, not guessed)."""
    old = backbone.get_input_embeddings()
    if not isinstance(old, nn.Embedding):
        raise QuantizationError(f"the input embedding is a {type(old).__name__}, not an nn.Embedding; cannot quantize it")
    new = Int8RowEmbedding(old)
    with torch.no_grad():
        expected, got = old(probe_ids).to(torch.float32), new(probe_ids)
    half_step = new.row_scale[probe_ids] / 2 * (1.0 if new.multiplier is None else new.multiplier.abs())
    if not bool(((got - expected).abs() <= half_step * (1 + 1e-5) + 1e-7).all()):
        raise QuantizationError(
            f"{type(old).__name__} does more than look up and scale rows; prge cannot quantize this model's embedding"
        )
    backbone.set_input_embeddings(new)


def _config(scheme: str, group_size: int):
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


def quantize_frozen_linears(module: nn.Module, scheme: str, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Quantize the module's frozen linears in place (their float32 weights are freed); returns
    how many. The module then computes as the exported program will, up to kernel rounding."""
    check_scheme(scheme, group_size, module)
    if scheme == "none":
        return 0
    from torchao.quantization import quantize_
    from torchao.utils import unwrap_tensor_subclass

    targets = {id(m) for _, m in frozen_linears(module)}
    quantize_(module, _config(scheme, group_size), filter_fn=lambda m, _fqn: id(m) in targets)
    unwrap_tensor_subclass(module)  # plain tensors: what torch.export traces
    return len(targets)
