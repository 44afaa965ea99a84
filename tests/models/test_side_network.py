"""Side tuning's model pieces (models/side_network.py) on the tiny model: the device features
equal the unmodified Hugging Face model's hidden states and label logits, the int8 wire keeps
every value within half a quantization step, and an untrained side network predicts exactly what
the frozen model does."""
from __future__ import annotations

import pytest
import torch

from models.causal_lm import build_side_features
from models.side_network import SideNetwork, SideProgram, check_taps, default_taps, quantize_taps, split_features


@pytest.fixture(scope="module")
def label_ids(tiny_tokenizer) -> list[int]:
    from models.tasks.labels import label_token_ids
    from models.tasks.vader_snippets import DEFAULT_SENTIMENT_TASK

    return label_token_ids(tiny_tokenizer("llama"), DEFAULT_SENTIMENT_TASK)


@pytest.fixture(scope="module")
def features(tiny_model_dir, label_ids):
    return build_side_features(tiny_model_dir("llama"), label_ids)


def test_taps_are_spread_over_the_layers_and_checked():
    assert default_taps(30) == (8, 15, 22, 30) and default_taps(2) == (1, 2) and default_taps(1, count=4) == (1,)
    for bad in ((), (0, 2), (3,), (2, 1), (1, 1)):
        with pytest.raises(ValueError, match="increasing layer indices"):
            check_taps(bad, 2)


def test_device_features_equal_hugging_face_hidden_states(features, label_ids, tiny_model_dir, tiny_batch):
    """The rewritten model's taps and label logits against the unmodified model's own."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    ids, mask, _ = tiny_batch(3)
    positions = torch.clamp(torch.cumsum(mask, dim=1) - 1, min=0)
    with torch.no_grad():
        out = reference(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        taps, base = split_features(features(ids, mask), len(features.taps), features.hidden_size)
    expected_taps = torch.stack([out.hidden_states[t][:, -1, :] for t in features.taps], dim=1)
    torch.testing.assert_close(taps, expected_taps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base, out.logits[:, -1, label_ids], rtol=1e-5, atol=1e-5)


def test_the_int8_wire_is_within_half_a_step():
    torch.manual_seed(0)
    taps = torch.randn(5, 3, 16) * torch.tensor([0.01, 1.0, 300.0]).reshape(1, 3, 1)  # layers differ in scale
    taps[2, 1] = 0.0  # an all-zero tap
    wire = quantize_taps(taps, torch.randn(5, 2))
    assert wire.codes.dtype == torch.int8 and int(wire.codes.abs().max()) <= 127
    error = (wire.taps() - taps).abs()
    assert bool((error <= wire.scales.unsqueeze(-1) / 2 + 1e-7 * taps.abs()).all())
    assert bool((wire.taps()[2, 1] == 0).all())
    assert wire.bytes_per_example() == 3 * 16 * 1 + 3 * 4 + 2 * 4


def test_an_untrained_side_network_predicts_what_the_frozen_model_does(features, tiny_batch):
    side = SideNetwork(len(features.taps), features.hidden_size, features.num_labels)
    ids, mask, _ = tiny_batch(4)
    with torch.no_grad():
        taps, base = split_features(features(ids, mask), len(features.taps), features.hidden_size)
        assert torch.equal(side(taps, base), base)
        assert torch.equal(SideProgram(features, side).side_logits(ids, mask), base)
    with pytest.raises(ValueError, match="does not fit"):
        SideProgram(features, SideNetwork(len(features.taps) + 1, features.hidden_size, features.num_labels))
