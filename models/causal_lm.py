"""Load a local Hugging Face causal LM, add LoRA-FA adapters and wrap it as a PRGEStep."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from models.adapters import DEFAULT_A_SEED, DEFAULT_ALPHA, DEFAULT_RANK, default_targets, inject_lora_fa
from models.delegatable import register_attention, replace_rms_norms
from prge.pieces import DEFAULT_MICRO_BATCH
from prge.step import PRGEStep

# The Hub is never used: models come from local folders only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Families whose backbones take explicit position_ids (needed for left padding) and were tested.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "opt", "gpt2")


class ModelError(ValueError):
    """A model folder prge cannot use."""


@dataclass
class AdapterConfig:
    """How the model is adapted and estimated; fixed at export time."""

    num_queries: int = 4  # q: perturbation directions per step (2q copies in one forward)
    rank: int = DEFAULT_RANK  # LoRA rank r
    alpha: float = DEFAULT_ALPHA  # LoRA scaling numerator (scaling = alpha / r)
    targets: list[str] | None = None  # module names (peft semantics); None = family default
    loss: str | None = None  # "classification" (label words) or "lm" (full vocabulary); None: the task's, else classification
    a_seed: int = DEFAULT_A_SEED  # seed of the frozen A matrices
    micro_batch: int | None = DEFAULT_MICRO_BATCH  # most rows per forward pass; None = all at once
    adapted: list[str] = field(default_factory=list)  # filled in: the adapted module names


class AnswerHidden(nn.Module):
    """(input_ids, attention_mask) -> final hidden state at the last position, [B, H].

    Prompts are left-padded, so the last position is the answer position of every row.
    position_ids are derived from the mask so padding does not shift absolute positions
    (OPT, GPT-2) or relative ones.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        position_ids = torch.clamp(torch.cumsum(attention_mask, dim=1) - 1, min=0)
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state[:, -1, :]


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(model_dir: str | Path, rewrites: bool = True) -> nn.Module:
    """A float32 causal LM from a local folder, in eval mode with a static-shape attention path.
    rewrites: prge's export-friendly RMSNorm and attention (models/delegatable.py); without
    them Hugging Face's own layers stay (eager attention), as a baseline to compare against."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    config = AutoConfig.from_pretrained(str(model_dir))
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{model_dir}: model type {config.model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    # prge's grouped-query attention where the family supports pluggable attention (it lowers
    # to XNNPACK without splitting the graph), else HF's eager attention; both export cleanly.
    try:
        attention = register_attention() if rewrites else "eager"
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation=attention)
    except ValueError:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    if rewrites:
        replace_rms_norms(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_step(model_dir: str | Path, adapter: AdapterConfig, label_ids: list[int], rewrites: bool = True) -> PRGEStep:
    """The PRGEStep both engines use: eager calls it, export traces it."""
    model = load_causal_lm(model_dir, rewrites)
    targets = adapter.targets or default_targets(model.config.model_type)
    adapter.targets = list(targets) if isinstance(targets, list) else targets
    adapter.loss = adapter.loss or "classification"
    adapter.adapted = inject_lora_fa(
        model, targets, adapter.rank, adapter.alpha, 2 * adapter.num_queries, adapter.a_seed
    )
    backbone = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    step = PRGEStep(
        AnswerHidden(backbone), head, label_ids, adapter.num_queries, adapter.loss, adapter_names=adapter.adapted,
        micro_batch=adapter.micro_batch,
    )
    step.eval()
    return step
