"""Server-assisted side tuning (MobiLLM's design): the phone runs only forward passes of the frozen
model; a server trains a small side network by backprop on what the phone sends.

What leaves the phone, per example (`SideFeatures`, the device part):
  taps          the frozen model's hidden states after a few of its layers (`taps`, indices
                into Hugging Face's hidden_states: 1 = after the first layer, num_layers =
                after the last layer and the final norm), at the answer position only,
                int8-quantized with one float32 scale per tap (`quantize_taps`);
  base_logits   the frozen model's label-word logits (float32), what it predicts zero-shot.
The answer position only (prompts are left-padded, so it is the last one): the frozen layers
have already mixed the prompt into it, and it keeps the bytes per example at taps x hidden
instead of taps x hidden x seq_len. This is a simplification of MobiLLM's side network, which
reads every position; the text itself never leaves, but activations do, and activations of a
language model can be inverted to recover much of the text that produced them.

`SideNetwork` (the server part) maps (taps, base_logits) to label-word logits: each tap
RMS-normalized (layers differ in scale by orders of magnitude), concatenated, a two-layer MLP,
added to base_logits. Its last layer starts at zero, so an untrained side network predicts
exactly what the frozen model does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INT8_MAX = 127


def default_taps(num_layers: int, count: int = 4) -> tuple[int, ...]:
    """count layer indices spread evenly over 1 .. num_layers, the last layer always among them."""
    if num_layers < 1 or count < 1:
        raise ValueError(f"need a positive layer count and tap count, got {num_layers} and {count}")
    count = min(count, num_layers)
    return tuple(sorted({round(num_layers * (k + 1) / count) for k in range(count)}))


def check_taps(taps: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    if not taps or any(not 1 <= t <= num_layers for t in taps) or list(taps) != sorted(set(taps)):
        raise ValueError(f"taps must be increasing layer indices in 1..{num_layers}, got {list(taps)}")
    return tuple(taps)


class SideFeatures(nn.Module):
    """The device part: the frozen causal LM's forward, returning per row its hidden states at
    the taps and its label-word logits at the answer position, as one float32 row
    [len(taps) * hidden + num_labels] (a program method returns one tensor; `split_features`
    cuts it)."""

    def __init__(self, model: nn.Module, label_token_ids: list[int], taps: tuple[int, ...],
                 logit_softcap: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.taps = check_taps(tuple(taps), model.config.num_hidden_layers)
        self.hidden_size = model.config.hidden_size
        self.logit_softcap = logit_softcap
        head = model.get_output_embeddings()
        ids = torch.tensor(label_token_ids, dtype=torch.int64)
        with torch.no_grad():  # only the label words' rows of the head are ever read
            self.register_buffer("label_rows", head.weight.index_select(0, ids).to(torch.float32).clone())
            bias = None if head.bias is None else head.bias.index_select(0, ids).to(torch.float32).clone()
        self.register_buffer("label_bias", bias)

    @property
    def num_labels(self) -> int:
        return self.label_rows.shape[0]

    def _backbone(self, input_ids: Tensor, attention_mask: Tensor, hidden_states: bool):
        positions = torch.clamp(torch.cumsum(attention_mask, dim=1) - 1, min=0)
        backbone = getattr(self.model, self.model.base_model_prefix)
        return backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                        use_cache=False, output_hidden_states=hidden_states)

    def next_token_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Vocabulary logits at the answer position (the parity check against Hugging Face)."""
        return self._capped(self.model.get_output_embeddings()(self._backbone(input_ids, attention_mask, False).last_hidden_state[:, -1, :]))

    def _capped(self, logits: Tensor) -> Tensor:
        """The family's final logit soft-capping (Gemma), c * tanh(logits / c), where it has one."""
        return logits if self.logit_softcap is None else torch.tanh(logits / self.logit_softcap) * self.logit_softcap

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self._backbone(input_ids, attention_mask, True)
        taps = [out.hidden_states[t][:, -1, :] for t in self.taps]
        logits = out.last_hidden_state[:, -1, :] @ self.label_rows.t()
        if self.label_bias is not None:
            logits = logits + self.label_bias
        return torch.cat([*taps, self._capped(logits)], dim=1)


def split_features(rows: Tensor, num_taps: int, hidden_size: int) -> tuple[Tensor, Tensor]:
    """SideFeatures' rows [B, F] -> (taps [B, num_taps, hidden], base_logits [B, num_labels])."""
    cut = num_taps * hidden_size
    if rows.dim() != 2 or rows.shape[1] <= cut:
        raise ValueError(f"feature rows must be [B, {cut} + num_labels], got {list(rows.shape)}")
    return rows[:, :cut].reshape(rows.shape[0], num_taps, hidden_size), rows[:, cut:]


@dataclass
class WireFeatures:
    """What one batch sends off the device: int8 taps, a scale per tap, the base logits."""

    codes: Tensor  # int8 [B, taps, hidden]
    scales: Tensor  # float32 [B, taps]
    base_logits: Tensor  # float32 [B, num_labels]

    def bytes_per_example(self) -> int:
        per = (self.codes[0].numel() * self.codes.element_size() + self.scales[0].numel() * self.scales.element_size()
               + self.base_logits[0].numel() * self.base_logits.element_size())
        return int(per)

    def taps(self) -> Tensor:
        """The server's view of the taps: codes x scale, float32."""
        return self.codes.to(torch.float32) * self.scales.unsqueeze(-1)


def quantize_taps(taps: Tensor, base_logits: Tensor) -> WireFeatures:
    """Symmetric int8 per (row, tap): scale = max |x| / 127, code = round(x / scale). An all-zero
    tap gets scale 0 and codes 0 (dequantizes to zeros)."""
    taps = taps.to(torch.float32)
    scales = taps.abs().amax(dim=-1) / INT8_MAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(taps / safe.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return WireFeatures(codes, scales, base_logits.to(torch.float32).contiguous())


class SideNetwork(nn.Module):
    """The server part: label-word logits from (taps [B, T, H], base_logits [B, L])."""

    def __init__(self, num_taps: int, hidden_size: int, num_labels: int, width: int = 64) -> None:
        super().__init__()
        self.num_taps, self.hidden_size, self.num_labels, self.width = num_taps, hidden_size, num_labels, width
        self.down = nn.Linear(num_taps * hidden_size, width)
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, num_labels)
        nn.init.zeros_(self.out.weight)  # untrained: the frozen model's own predictions
        nn.init.zeros_(self.out.bias)

    def config(self) -> dict[str, int]:
        return {"num_taps": self.num_taps, "hidden_size": self.hidden_size, "num_labels": self.num_labels,
                "width": self.width}

    def forward(self, taps: Tensor, base_logits: Tensor) -> Tensor:
        normed = taps * torch.rsqrt(taps.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        x = F.gelu(self.down(normed.reshape(taps.shape[0], -1)))
        x = F.gelu(self.mid(x))
        return base_logits + self.out(x)


class SideProgram(nn.Module):
    """What a side-tuning program exports: side_features (the device's forward, what it sends),
    and once a side network is trained, side_logits (base + side network, what it predicts
    with). The taps go into the side network unquantized here: the device holds them in float32;
    only the wire is int8."""

    def __init__(self, features: SideFeatures, side: SideNetwork | None = None) -> None:
        super().__init__()
        if side is not None and (side.num_taps, side.hidden_size, side.num_labels) != (
                len(features.taps), features.hidden_size, features.num_labels):
            raise ValueError(f"side network for {side.num_taps} taps x {side.hidden_size}, {side.num_labels} labels does "
                             f"not fit features of {len(features.taps)} taps x {features.hidden_size}, {features.num_labels} labels")
        self.features = features
        self.side = side

    def side_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.features(input_ids, attention_mask)

    def side_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.side is None:
            raise ValueError("no side network: train one first")
        taps, base = split_features(self.features(input_ids, attention_mask), self.side.num_taps, self.side.hidden_size)
        return self.side(taps, base)
