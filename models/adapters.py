"""Inject LoRA-FA layers into a Hugging Face model by module name (peft's target_modules rules)."""
from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from prge.lora import LoRAFALinear

# peft's defaults for the families we test (phi3 has none in peft); other families take peft's
# own table, and a family in neither must name its targets.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],  # fused projection; peft has no default for phi3
    "mistral": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gemma3_text": ["q_proj", "v_proj"],
    "smollm3": ["q_proj", "v_proj"],
}
DEFAULT_RANK = 8
DEFAULT_ALPHA = 16.0
# Seed of the frozen A matrices. Fixed so a model's adapters are the same everywhere.
DEFAULT_A_SEED = 20240811


class AdapterError(ValueError):
    """A target that matches nothing, or matches a module we cannot adapt."""


def default_targets(model_type: str) -> list[str] | str:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    targets = DEFAULT_TARGETS.get(model_type, PEFT_TARGETS.get(model_type))
    if targets is None:
        raise AdapterError(
            f"no default LoRA targets for model type {model_type!r}; pass --targets "
            f"(prge's defaults: {', '.join(sorted(DEFAULT_TARGETS))}; and peft's)"
        )
    return list(targets) if isinstance(targets, list) else targets


def _matches(name: str, targets: list[str] | str) -> bool:
    """peft semantics: a string is a regex that must match the whole name; a list entry matches
    the name itself or its last components."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2 style: weight is [in, out]
        return module.weight.shape[0], module.weight.shape[1]
    raise AdapterError(f"cannot adapt {type(module).__name__}; only Linear and Conv1D layers")


def inject_lora_fa(
    model: nn.Module,
    targets: list[str] | str,
    rank: int,
    alpha: float,
    num_copies: int,
    a_seed: int = DEFAULT_A_SEED,
) -> list[str]:
    """Replace every targeted layer by a LoRAFALinear wrapping it; returns the adapted names."""
    if rank < 1:
        raise AdapterError(f"rank must be >= 1, got {rank}")
    chosen = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets)]
    if isinstance(targets, list):
        for t in targets:
            if not any(n == t or n.endswith("." + t) for n, _ in chosen):
                linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})
                raise AdapterError(f"target {t!r} matches no module; linear layers here: {', '.join(linear_names)}")
    if not chosen:
        raise AdapterError(f"target pattern {targets!r} matches no module")
    for stream, (name, module) in enumerate(chosen):
        in_f, out_f = _features(module)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRAFALinear(module, in_f, out_f, rank, alpha, num_copies, a_seed, stream))
    return [name for name, _ in chosen]
