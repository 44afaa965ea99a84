"""Load a local Hugging Face causal LM, add LoRA-FA adapters and wrap it as a PRGEStep."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from models.adapters import DEFAULT_A_SEED, DEFAULT_ALPHA, DEFAULT_RANK, default_targets, inject_lora_fa
from models.delegatable import (
    ATTENTION_NAME,
    RewriteReport,
    register_attention,
    relative_difference,
    replace_rms_norms,
)
from models.quantize import DEFAULT_GROUP_SIZE, check_scheme, quantize_frozen_linears, quantize_input_embedding
from models.side_network import SideFeatures, default_taps
from prge.estimators import DEFAULT_ESTIMATOR, estimator_named
from prge.full_mezo import FullMeZOStep
from prge.pieces import DEFAULT_MICRO_BATCH
from prge.step import COMPLETION, PRGEStep

# The Hub is never used: models come from local folders only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Families the tests cover with a tiny config each (models/sources/tiny.py): prge's rewrites are
# tried on these. Any other model_type loads with Hugging Face's own layers and trains if its
# forward passes the parity check below.
TESTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "opt", "gpt2", "gemma3_text", "smollm3")
# prge's forward (rewrites, LoRA-FA with B = 0, answer position) must give Hugging Face's
# next-token logits to this relative difference (in norm) on a probe batch with left padding.
PARITY_REL_TOL = 1e-5
PROBE_LEN, PROBE_PADDING = 12, 4
# Completion tasks: the most tokens of a row that are scored (its completion and end token).
DEFAULT_COMPLETION_LEN = 16


class ModelError(ValueError):
    """A model folder prge cannot use."""


@dataclass
class AdapterConfig:
    """How the model is adapted, estimated and stored; fixed at export time."""

    num_queries: int = 4  # q: perturbation directions per step (2q copies in one forward)
    rank: int = DEFAULT_RANK  # LoRA rank r
    alpha: float = DEFAULT_ALPHA  # LoRA scaling numerator (scaling = alpha / r)
    targets: list[str] | None = None  # module names (peft semantics); None = family default
    loss: str | None = None  # prge/step.py LOSS_KINDS; None: the task's, else classification
    completion_len: int = DEFAULT_COMPLETION_LEN  # completion loss: most scored tokens per row
    a_seed: int = DEFAULT_A_SEED  # seed of the frozen A matrices
    micro_batch: int | None = DEFAULT_MICRO_BATCH  # most rows per forward pass; None = all at once
    quantize: str = "none"  # the frozen base linears: none | 8da8w | 8da4w (models/quantize.py)
    group_size: int = DEFAULT_GROUP_SIZE  # input columns per int4 weight scale (8da4w)
    estimator: str = DEFAULT_ESTIMATOR  # prge/estimators.py ESTIMATORS: the step draws its noise
    adapted: list[str] = field(default_factory=list)  # filled in: the adapted module names


class FinalHidden(nn.Module):
    """(input_ids, attention_mask) -> the final hidden states, [B, T, H].

    Prompts are left-padded, so the last position is the answer position of every row.
    position_ids are derived from the mask so padding does not shift absolute positions
    (OPT, GPT-2) or relative ones.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


@dataclass
class ParityProbe:
    """A small left-padded batch and Hugging Face's own next-token logits for it, taken from the
    unmodified model before prge touches it: what prge's forward must reproduce."""

    input_ids: Tensor  # [2, PROBE_LEN]; row 1 left-padded
    attention_mask: Tensor
    logits: Tensor  # [2, vocab] at the last position


@dataclass
class LoadedModel:
    model: nn.Module
    rewrites: RewriteReport
    probe: ParityProbe


def _probe_batch(vocab_size: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, PROBE_LEN), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :PROBE_PADDING] = 0
    return ids, mask


def _position_ids(mask: Tensor) -> Tensor:
    # What Hugging Face's generate() derives for a left-padded batch, and what FinalHidden uses.
    return torch.clamp(torch.cumsum(mask, dim=1) - 1, min=0)


def _hf_answer_logits(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask), use_cache=False)
    return out.logits[:, -1, :].float()


def _load_hf(model_dir: Path, model_type: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    except Exception as e:  # any failure of an unknown architecture: one line, with its cause
        raise ModelError(f"{model_dir}: Hugging Face could not load this {model_type!r} model: {e}") from e


def _use_prge_attention(model: nn.Module, probe: ParityProbe, report: RewriteReport) -> None:
    """Switch to prge's grouped-query attention if the model's logits stay the same, else keep HF's."""
    if not model._can_set_attn_implementation():
        report.kept["attention"] = "the family does not take a pluggable attention"
        return
    model.set_attn_implementation(register_attention())
    try:
        gap = relative_difference(_hf_answer_logits(model, probe.input_ids, probe.attention_mask), probe.logits)
    except Exception as e:  # noqa: BLE001 - whatever breaks, HF's own attention is the answer
        gap, why = None, f"prge's attention failed: {type(e).__name__}: {e}"
    else:
        why = f"prge's attention changes the logits by {gap:.1e} (relative)"
    if gap is not None and gap <= PARITY_REL_TOL:
        report.attention = ATTENTION_NAME
    else:
        model.set_attn_implementation("eager")
        report.kept["attention"] = why


def load_causal_lm(model_dir: str | Path, rewrites: bool = True) -> LoadedModel:
    """A float32 causal LM from a local folder, in eval mode with a static-shape attention path.

    rewrites: prge's export-friendly RMSNorm and attention (models/delegatable.py) where each is
    shown equal to the layer it replaces; tried on the families the tests cover, and never on
    others (they run Hugging Face's own layers with eager attention). Without rewrites HF's own
    layers stay everywhere, as a baseline to compare against.
    """
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    try:
        model_type = AutoConfig.from_pretrained(str(model_dir)).model_type
    except Exception as e:  # transformers does not know the architecture, or config.json is bad
        raise ModelError(f"{model_dir}: unreadable model config: {e}") from e
    model = _load_hf(model_dir, model_type)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids, mask = _probe_batch(model.get_input_embeddings().num_embeddings)
    try:
        probe = ParityProbe(ids, mask, _hf_answer_logits(model, ids, mask))
    except Exception as e:
        raise ModelError(
            f"{model_dir}: a {model_type!r} model must take input_ids, attention_mask and position_ids "
            f"(left padding needs them); its forward failed: {type(e).__name__}: {e}"
        ) from e
    report = RewriteReport()
    if not rewrites:
        report.kept["all"] = "rewrites turned off (--no-rewrites)"
    elif model_type not in TESTED_MODEL_TYPES:
        report.kept["all"] = f"model type {model_type!r} is not among the tested families: Hugging Face's own layers"
    else:
        replace_rms_norms(model, report)
        _use_prge_attention(model, probe, report)
    return LoadedModel(model, report, probe)


def _check_parity(next_token_logits, probe: ParityProbe, model_dir: Path, model_type: str) -> float:
    """prge's next-token logits (a PRGEStep's with B = 0, a FullMeZOStep's with the stored
    weights) against Hugging Face's own on the probe batch."""
    try:
        with torch.no_grad():
            logits = next_token_logits(probe.input_ids, probe.attention_mask)
    except Exception as e:
        raise ModelError(f"{model_dir}: prge's forward of this {model_type!r} model failed: {type(e).__name__}: {e}") from e
    gap = relative_difference(logits, probe.logits)
    if not gap <= PARITY_REL_TOL:
        raise ModelError(
            f"{model_dir}: prge's forward of this {model_type!r} model gives other next-token logits than "
            f"Hugging Face's (relative difference {gap:.2e} > {PARITY_REL_TOL:g}); prge cannot train it as is"
        )
    return gap


def build_step(model_dir: str | Path, adapter: AdapterConfig, label_ids: list[int], rewrites: bool = True) -> PRGEStep:
    """The PRGEStep both engines use: eager calls it, export traces it. Checked against Hugging
    Face's own forward on a probe batch before it is returned."""
    loaded = load_causal_lm(model_dir, rewrites)
    model = loaded.model
    model_type = model.config.model_type
    targets = adapter.targets or default_targets(model_type)
    adapter.targets = list(targets) if isinstance(targets, list) else targets
    adapter.loss = adapter.loss or "classification"
    adapter.adapted = inject_lora_fa(
        model, targets, adapter.rank, adapter.alpha, 2 * adapter.num_queries, adapter.a_seed
    )
    backbone = getattr(model, model.base_model_prefix, None)
    if backbone is None:
        raise ModelError(f"{model_dir}: no backbone at {type(model).__name__}.{model.base_model_prefix}")
    check_scheme(adapter.quantize, adapter.group_size, backbone)  # before the parity check and any export work
    step = PRGEStep(
        FinalHidden(backbone), model.get_output_embeddings(), label_ids, adapter.num_queries, adapter.loss,
        adapter_names=adapter.adapted, micro_batch=adapter.micro_batch,
        logit_softcap=getattr(model.config, "final_logit_softcapping", None),
        noise=estimator_named(adapter.estimator).noise,
        completion_len=adapter.completion_len if adapter.loss == COMPLETION else None,
    )
    step.eval()
    answer_logits = lambda ids, mask: step.answer_logits(ids, mask, full_vocab=True)  # noqa: E731
    loaded.rewrites.parity = _check_parity(answer_logits, loaded.probe, Path(model_dir), model_type)
    step.rewrites = loaded.rewrites
    step.quantization = _quantize(step, adapter, loaded.probe)
    return step


def _quantize(step: PRGEStep, adapter: AdapterConfig, probe: ParityProbe) -> dict:
    """Quantize the frozen base after the float32 forward has been proven equal to Hugging
    Face's, and record how far quantization moves the answer logits (a measurement, not a gate:
    that is the price of the scheme, judged by accuracy)."""
    linears = quantize_frozen_linears(step.body, adapter.quantize, adapter.group_size)
    report = {"scheme": adapter.quantize, "linears": linears}
    if adapter.quantize == "none":
        return report
    quantize_input_embedding(step.body.backbone, probe.input_ids)
    if step.loss != "classification":  # the full-vocabulary loss needs every row of the head
        # (in a container: torchao's quantize_ visits a module's children, not the module itself)
        quantize_frozen_linears(nn.ModuleList([step.head]), adapter.quantize, adapter.group_size)
    with torch.no_grad():
        logits = step.answer_logits(probe.input_ids, probe.attention_mask, full_vocab=True)
    if step.loss == "classification":
        step.drop_full_head()  # after the measurement above, which reads the whole (float32) head
    report.update(group_size=adapter.group_size if adapter.quantize == "8da4w" else None,
                  embedding="int8 per row", head="label rows, float32" if step.head is None else adapter.quantize,
                  answer_logits_rel_diff=relative_difference(logits, probe.logits))
    return report


def build_full_mezo_step(model_dir: str | Path, label_ids: list[int], loss: str = "classification",
                         noise: str = "gaussian") -> FullMeZOStep:
    """The FullMeZOStep both engines use (every weight trained), checked like build_step: its
    next-token logits with the stored weights equal Hugging Face's on the probe batch."""
    loaded = load_causal_lm(model_dir)
    config = loaded.model.config
    step = FullMeZOStep(loaded.model, label_ids, loss, noise, getattr(config, "final_logit_softcapping", None))
    step.eval()
    loaded.rewrites.parity = _check_parity(step.next_token_logits, loaded.probe, Path(model_dir), config.model_type)
    step.rewrites = loaded.rewrites
    return step


def build_side_features(model_dir: str | Path, label_ids: list[int], taps: tuple[int, ...] | None = None) -> SideFeatures:
    """The device part of side tuning over the frozen model (taps: default_taps of its layers),
    checked like build_step: its next-token logits equal Hugging Face's on the probe batch."""
    loaded = load_causal_lm(model_dir)
    config = loaded.model.config
    features = SideFeatures(loaded.model, label_ids, taps or default_taps(config.num_hidden_layers),
                            getattr(config, "final_logit_softcapping", None))
    features.eval()
    loaded.rewrites.parity = _check_parity(features.next_token_logits, loaded.probe, Path(model_dir), config.model_type)
    features.rewrites = loaded.rewrites
    return features
