"""Numerically equivalent rewrites of two layers that XNNPACK cannot take as Hugging Face writes them.

Every op XNNPACK does not delegate splits the graph into another delegate island, and each
island costs lowering time and runtime hand-offs. In HF's Llama-family code two layers do
that in every decoder block (measured on SmolLM2: 155 islands in train_step):
  * RMSNorm's `mean(x^2, dim=-1)` (XNNPACK's mean.dim only takes 4D inputs): here the mean
    is a linear layer against a constant 1/H vector, which XNNPACK runs as a GEMM.
  * grouped-query attention's `repeat_kv` (expand_copy) and 4D `matmul` (which decomposes
    into more expand_copy): here queries are regrouped per KV head with reshapes and the
    products are 3D `bmm`s, so K and V are never copied.
A rewrite is never trusted by a class name: each RMSNorm is replaced only after its
replacement gave the same output on a random input (`replace_rms_norms`), and the attention
only after the whole model gave the same logits with it (models/causal_lm.py). Anything not
shown equal stays as Hugging Face wrote it. Both engines run the same modules, so they agree;
against the original HF layers the rewrites differ only by float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

ATTENTION_NAME = "prge_gqa"
# A rewritten layer must match the layer it replaces to float32 rounding (relative, in norm).
REWRITE_REL_TOL = 1e-5


def relative_difference(value: Tensor, reference: Tensor) -> float:
    """||value - reference|| / ||reference||, in float64 (0 when both are 0)."""
    value, reference = value.double(), reference.double()
    scale = float(reference.norm())
    gap = float((value - reference).norm())
    return gap / scale if scale > 0 else gap


class DelegatableRMSNorm(nn.Module):
    """scale * x / rms(x), with the mean of squares as a GEMM. `scale` is the effective per-channel
    factor: HF's weight for Llama-style norms, 1 + weight for Gemma-style ones."""

    def __init__(self, scale: Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(scale.detach().clone(), requires_grad=False)
        self.eps = eps
        hidden = scale.shape[-1]
        self.register_buffer("mean_weight", torch.full((1, hidden), 1.0 / hidden), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        mean_square = nn.functional.linear(x * x, self.mean_weight)
        return self.weight * (x * torch.rsqrt(mean_square + self.eps))


# The per-channel factors RMSNorms are written with: weight * x / rms (Llama, Qwen, Mistral,
# Phi-3, SmolLM) and (1 + weight) * x / rms (Gemma). A norm matching neither stays as it is.
_RMS_NORM_SCALES = {
    "weight": lambda w: w,
    "1 + weight": lambda w: 1.0 + w,
}


@dataclass
class RewriteReport:
    """What the rewrites replaced, and what they left as Hugging Face wrote it (and why)."""

    rms_norms: dict[str, int] = field(default_factory=dict)  # scale form -> how many replaced
    attention: str = "eager"  # the attention implementation in effect
    kept: dict[str, str] = field(default_factory=dict)  # module (or "attention") -> why it was kept
    parity: float | None = None  # the whole forward's relative difference from HF's (causal_lm)

    def as_json(self) -> dict:
        return {"rms_norms": dict(self.rms_norms), "attention": self.attention, "kept": dict(self.kept),
                "parity_rel_diff": self.parity}


def _rms_norm_probe(width: int) -> Tensor:
    # Fixed, not the caller's RNG: the same model must get the same rewrites every time.
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, width, generator=generator) * 3.0 + 0.5


def _equivalent_rms_norm(module: nn.Module) -> tuple[str, DelegatableRMSNorm] | None:
    """The rewrite that reproduces `module` on a random input, with the name of its scale form."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    weight = getattr(module, "weight", None)
    if eps is None or not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return None
    probe = _rms_norm_probe(weight.shape[0]).to(weight.dtype)
    with torch.no_grad():
        expected = module(probe)
        for form, scale_of in _RMS_NORM_SCALES.items():
            candidate = DelegatableRMSNorm(scale_of(weight.detach()), float(eps))
            if relative_difference(candidate(probe), expected) <= REWRITE_REL_TOL:
                return form, candidate
    return None


def replace_rms_norms(model: nn.Module, report: RewriteReport) -> None:
    """Swap every RMSNorm-like module (by class name) for a DelegatableRMSNorm proven equal to it."""
    for name, module in list(model.named_modules()):
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        found = _equivalent_rms_norm(module)
        if found is None:
            report.kept[name] = f"{type(module).__name__}: no rewrite reproduces it"
            continue
        form, replacement = found
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
        report.rms_norms[form] = report.rms_norms.get(form, 0) + 1


def grouped_query_attention(
    module: nn.Module,
    query: Tensor,  # [b, heads, s, d]
    key: Tensor,  # [b, kv_heads, s_k, d]
    value: Tensor,  # [b, kv_heads, s_k, d]
    attention_mask: Tensor | None,  # additive [b, 1, s, s_k]
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Same result as HF's eager attention. Query head j uses KV head j // n_rep (repeat_kv's
    order), so reshaping queries to [b, kv, n_rep * s, d] pairs each group with its KV head.
    A sliding window arrives already folded into the additive mask."""
    b, heads, s, d = query.shape
    kv_heads, s_k = key.shape[1], key.shape[2]
    n_rep = heads // kv_heads
    if scaling is None:
        scaling = d**-0.5
    q = query.reshape(b * kv_heads, n_rep * s, d)
    k = key.reshape(b * kv_heads, s_k, d)
    v = value.reshape(b * kv_heads, s_k, d)
    scores = torch.bmm(q, k.transpose(1, 2)) * scaling
    if softcap is not None:  # Gemma 2's logit soft-capping, before the mask as HF does it
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        # Viewed per query head the scores are [b, heads, s, s_k]; the mask broadcasts over the
        # heads. (Repeating the mask to the heads instead costs a copy of it in every layer.)
        scores = (scores.reshape(b, heads, s, s_k) + attention_mask[:, :, :, :s_k]).reshape(b * kv_heads, n_rep * s, s_k)
    probs = torch.softmax(scores, dim=-1)
    out = torch.bmm(probs, v).reshape(b, heads, s, d)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Make `attn_implementation=ATTENTION_NAME` available (with HF's eager additive mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, grouped_query_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
    return ATTENTION_NAME
