"""Each family as prge loads it against Hugging Face's unmodified model, the rewrites' proofs,
and the generic path for a model type no test covers."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from models.causal_lm import AdapterConfig, ModelError, build_step, load_causal_lm
from models.delegatable import ATTENTION_NAME, RewriteReport, relative_difference, replace_rms_norms
from models.sources.tiny import (
    HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, TINY_FAMILIES, make_tiny_model_dir, make_tiny_tokenizer,
)
from models.tasks.labels import label_token_ids
from models.tasks.vader_snippets import DEFAULT_SENTIMENT_TASK

TEXTS = [
    "Review: the movie was great and I loved it.\nSentiment:",
    "Review: bad\nSentiment:",
    "Review: a boring plot with bad acting , too long .\nSentiment:",
]


def _hf_last_logits(model_dir, ids, mask) -> torch.Tensor:
    """The unmodified Hugging Face model (its own layers, eager attention): next-token logits at
    the last position, with the position ids generate() uses for left padding."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=False)
    return out.logits[:, -1, :]


def _prge_against_hugging_face(model_dir, tok):
    """Rewrites and LoRA-FA (B = 0) on, left-padded real prompts: the same logits as HF's model."""
    step = build_step(model_dir, AdapterConfig(num_queries=1), label_token_ids(tok, DEFAULT_SENTIMENT_TASK))
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask[:, 0] == 0).any(), "expected left padding"
    with torch.no_grad():
        ours = step.answer_logits(ids, mask, full_vocab=True)
    reference = _hf_last_logits(model_dir, ids, mask)
    assert relative_difference(ours, reference) < 1e-5
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert step.rewrites.parity is not None and step.rewrites.parity < 1e-5
    return step.rewrites


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_prge_forward_equals_hugging_face(family, tiny_model_dir, tiny_tokenizer):
    report = _prge_against_hugging_face(tiny_model_dir(family), tiny_tokenizer(family))
    if family not in ("opt", "gpt2"):  # the RMSNorm families: every norm rewritten, attention too
        assert sum(report.rms_norms.values()) > 0 and not report.kept, report
        assert report.attention == ATTENTION_NAME


def test_llama_3_2_rope_scaling_equals_hugging_face(tmp_path, tiny_tokenizer):
    """Llama 3.2's "llama3" rope scaling (its published values), on the llama family's rewrites."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    model_dir = make_tiny_model_dir("llama", tmp_path, rope_parameters=rope)
    assert AutoConfig.from_pretrained(model_dir).rope_parameters["rope_type"] == "llama3"
    report = _prge_against_hugging_face(model_dir, tiny_tokenizer("llama"))
    assert report.attention == ATTENTION_NAME and not report.kept


def test_gemma_norms_take_the_one_plus_weight_form(tiny_model_dir):
    report = load_causal_lm(tiny_model_dir("gemma3_text")).rewrites
    # 2 layers x (input, post-attention, pre-FFN, post-FFN, q, k) + the final norm
    assert report.rms_norms == {"1 + weight": 13}


class ScaledRMSNorm(nn.Module):
    """Named like an RMSNorm, but it is not one of the forms the rewrite knows: 2w * x / rms(x)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.eps = 1e-6

    def forward(self, x):
        return 2 * self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def test_a_norm_no_rewrite_reproduces_stays_as_written():
    model = nn.Sequential(ScaledRMSNorm(8))
    report = RewriteReport()
    replace_rms_norms(model, report)
    assert isinstance(model[0], ScaledRMSNorm)
    assert "0" in report.kept and not report.rms_norms


def _write_untested_family(model_type: str, out_dir, **config) -> str:
    """A tiny random model of a family prge's tests do not list (llama-like sizes)."""
    tok = make_tiny_tokenizer()
    cfg = AutoConfig.for_model(
        model_type, vocab_size=576, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, **config,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


def test_untested_family_runs_hugging_faces_own_layers(tmp_path):
    model_dir = _write_untested_family("stablelm", tmp_path)
    label_ids = label_token_ids(make_tiny_tokenizer(), DEFAULT_SENTIMENT_TASK)
    step = build_step(model_dir, AdapterConfig(num_queries=2), label_ids)  # peft's default targets
    assert "all" in step.rewrites.kept and step.rewrites.attention == "eager"
    assert step.rewrites.parity < 1e-5
    ids = torch.randint(5, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        losses = step.train_step(ids, mask, torch.tensor([0, 1]), torch.tensor(0), torch.tensor(1),
                                 torch.zeros(2), torch.tensor(0.0), torch.tensor(1e-2))
    assert losses.shape == (4,) and torch.isfinite(losses).all()


def test_untested_family_that_prge_would_compute_wrong_is_refused(tmp_path):
    # Granite divides its logits by logits_scaling inside the LM head's caller; prge reads the
    # head directly, so its logits would differ: the parity check must say so, not train.
    model_dir = _write_untested_family("granite", tmp_path, logits_scaling=4.0)
    label_ids = label_token_ids(make_tiny_tokenizer(), DEFAULT_SENTIMENT_TASK)
    with pytest.raises(ModelError, match=r"'granite'.*other next-token logits than Hugging Face's"):
        build_step(model_dir, AdapterConfig(num_queries=1, targets=["q_proj", "v_proj"]), label_ids)
