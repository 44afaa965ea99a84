"""Numerically equivalent rewrites of two layers that XNNPACK cannot take as Hugging Face writes them.

Every op XNNPACK does not delegate splits the graph into another delegate island, and each
island costs lowering time and runtime hand-offs. In HF's Llama-family code two layers do
that in every decoder block (measured on SmolLM2: 155 islands in train_step):
  * RMSNorm's `mean(x^2, dim=-1)` (XNNPACK's mean.dim only takes 4D inputs): here the mean
    is a linear layer against a constant 1/H vector, which XNNPACK runs as a GEMM.
  * grouped-query attention's `repeat_kv` (expand_copy) and 4D `matmul` (which decomposes
    into more expand_copy): here queries are regrouped per KV head with reshapes and the
    products are 3D `bmm`s, so K and V are never copied.
Both engines (eager and the exported program) run these same modules, so they still agree;
against the original HF layers they differ only by float rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

ATTENTION_NAME = "prge_gqa"


class DelegatableRMSNorm(nn.Module):
    def __init__(self, weight: Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.eps = eps
        hidden = weight.shape[-1]
        self.register_buffer("mean_weight", torch.full((1, hidden), 1.0 / hidden), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        mean_square = nn.functional.linear(x * x, self.mean_weight)
        return self.weight * (x * torch.rsqrt(mean_square + self.eps))


def replace_rms_norms(model: nn.Module) -> int:
    """Swap every HF RMSNorm (weight * x / rms(x), e.g. LlamaRMSNorm) for DelegatableRMSNorm."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None or not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DelegatableRMSNorm(module.weight, float(eps)))
        replaced += 1
    return replaced


def grouped_query_attention(
    module: nn.Module,
    query: Tensor,  # [b, heads, s, d]
    key: Tensor,  # [b, kv_heads, s_k, d]
    value: Tensor,  # [b, kv_heads, s_k, d]
    attention_mask: Tensor | None,  # additive [b, 1, s, s_k]
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """Same result as HF's eager attention. Query head j uses KV head j // n_rep (repeat_kv's
    order), so reshaping queries to [b, kv, n_rep * s, d] pairs each group with its KV head."""
    b, heads, s, d = query.shape
    kv_heads, s_k = key.shape[1], key.shape[2]
    n_rep = heads // kv_heads
    q = query.reshape(b * kv_heads, n_rep * s, d)
    k = key.reshape(b * kv_heads, s_k, d)
    v = value.reshape(b * kv_heads, s_k, d)
    scores = torch.bmm(q, k.transpose(1, 2)) * scaling
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
