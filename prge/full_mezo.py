"""Full-parameter MeZO (PocketLLM's design) as one export-friendly nn.Module.

Every weight of the model is trained, not an adapter. A step is MeZO's two-point estimate
along one Gaussian direction z over ALL weights, with P-RGE's inner loop: the + and - forwards
run as one batched forward (rows [0, b) at W + eps z, rows [b, 2b) at W - eps z), and the
update of the previous step is folded into the next call, exactly as PRGEStep does for B:
    W <- W - lr * g_prev * z_prev,   then losses (L+, L-) of this step's z.
The driver turns the losses into g = (L+ - L-) / (2 eps) (projected_grads with q = 1).

Two choices keep memory at about one copy of the weights plus one forward:
  * the weights are never perturbed in place. MeZO's +eps z, -2 eps z, +eps z cycle does not
    give the weights back bit for bit in float32; here each layer computes its perturbed weights
    just before it runs (a temporary of that one layer's size) and the stored weights change only
    by the update. With g = 0 they stay bit-identical, however many steps run.
  * the noise is drawn in spans of at most SPAN elements (plan_draws: a run of small tensors
    shares one, a large tensor is cut up), so its float64 and int64 temporaries stay small; z is
    one stream over the flat weight vector (WeightSlot offsets), a pure function of (seed,
    element index), so how it is cut into draws never changes a number, and a run is still
    (initial weights, (seed, g, lr)...).

The weights become buffers (mutable state of the exported program, under their Hugging Face
names); tied weights (an output head tied to the input embedding) are one slot, perturbed and
updated once. Each module that owns weights gets a forward that binds the tensors it should
run with: the stored ones, or the perturbed pair, one for each half of the rows.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from prge.noise import NOISE_KINDS, keyed_directions, stream_keys

Keys = tuple[Tensor, Tensor]  # prge/noise.py stream_keys of a step's seed: computed once, used by every draw

# Most elements of the flat weight stream drawn at once (plan_draws). Fewer, larger draws make a
# smaller program: the graph holds one copy of the noise generator per draw, and lowering and
# serializing time grow with it (one draw per tensor: 37k nodes and two hours for the default
# model). A draw's float64 and int64 temporaries stay a few tens of MB at this size; one decoder
# layer of the default model (3.5M weights) is one draw.
SPAN = 1 << 22
FULL_MEZO_LOSSES = ("classification", "lm")


@dataclass(frozen=True)
class WeightSlot:
    """Where one weight tensor lives in the flat weight vector (the noise's element index)."""

    name: str  # Hugging Face parameter name (a tied weight: its first name)
    shape: tuple[int, ...]
    offset: int  # counter of its first element; even, so a Gaussian draw starts on a pair

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def weight_slots(named_shapes: list[tuple[str, tuple[int, ...]]]) -> tuple[WeightSlot, ...]:
    """The layout of the flat weight vector: tensors in order, each starting at an even offset."""
    slots, offset = [], 0
    for name, shape in named_shapes:
        slot = WeightSlot(name, tuple(shape), offset)
        slots.append(slot)
        offset += slot.numel + slot.numel % 2
    return tuple(slots)


def flat_numel(slots: tuple[WeightSlot, ...]) -> int:
    """Values in the flat weight vector (the even-offset padding is not stored)."""
    return sum(s.numel for s in slots)


def named_weights(slots: tuple[WeightSlot, ...], flat: Tensor) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of each slot, cut from a flat weight vector (get_adapter's)."""
    start = 0
    for slot in slots:
        yield slot.name, flat[start:start + slot.numel].reshape(slot.shape)
        start += slot.numel


@dataclass(frozen=True)
class Piece:
    """Elements start .. start + count - 1 of weight tensor `slot`, at `at` within its draw."""

    slot: int
    start: int
    count: int
    at: int


@dataclass(frozen=True)
class Draw:
    """One call of the noise generator: elements first_element .. first_element + count - 1 of
    the flat stream (gaps of odd-sized tensors included), cut into the pieces of the tensors."""

    first_element: int
    count: int
    pieces: tuple[Piece, ...]


def plan_draws(slots: tuple[WeightSlot, ...]) -> tuple[Draw, ...]:
    """The flat stream cut into draws of SPAN elements (the last one shorter): a draw holds
    consecutive tensors, or pieces of them, and every piece starts at an even element (slot
    offsets and SPAN are even)."""
    span = SPAN  # read per call: tests shrink it
    draws: list[Draw] = []
    pieces: list[Piece] = []
    first = end = 0
    for k, slot in enumerate(slots):
        start = 0
        while start < slot.numel:
            at = slot.offset + start
            if pieces and at - first >= span:
                draws.append(Draw(first, end - first, tuple(pieces)))
                pieces = []
            if not pieces:
                first = at
            count = min(span - (at - first), slot.numel - start)
            pieces.append(Piece(k, start, count, at - first))
            start, end = start + count, at + count
    if pieces:
        draws.append(Draw(first, end - first, tuple(pieces)))
    return tuple(draws)


def draw_noise(noise: str, keys: Keys, draw: Draw) -> Tensor:
    """The draw's part of the step's direction z, float64 [draw.count]."""
    return keyed_directions(noise, keys, draw.count, first_element=draw.first_element)[0]


def _piece_of(weight: Tensor, piece: Piece) -> Tensor:
    return weight.reshape(-1)[piece.start:piece.start + piece.count].to(torch.float64)


def _noise_of(z: Tensor, piece: Piece) -> Tensor:
    return z[piece.at:piece.at + piece.count]


def updated_weights(weights: list[Tensor], draws: tuple[Draw, ...], keys: Keys, g: Tensor, lr: Tensor,
                    noise: str = "gaussian") -> Iterator[tuple[int, Tensor]]:
    """(k, W_k - lr * g * z_k) for every tensor k, as soon as its last draw is done (so eager
    writes each one back before drawing on: one tensor's copy at a time), computed in float64,
    float32 out; keys: the stream_keys of the step's seed. Called by the step (traced into its
    methods) and by replay, so both compute the same arithmetic."""
    step = lr.to(torch.float64).reshape(1) * g.to(torch.float64).reshape(1)
    parts: dict[int, list[Tensor]] = {}
    for draw in draws:
        z = draw_noise(noise, keys, draw)
        for piece in draw.pieces:
            w = weights[piece.slot]
            parts.setdefault(piece.slot, []).append((_piece_of(w, piece) - step * _noise_of(z, piece)).to(torch.float32))
            if piece.start + piece.count == w.numel():
                yield piece.slot, _joined(parts.pop(piece.slot), w.shape)


def perturbed_pieces(weights: list[Tensor], draw: Draw, keys: Keys, eps: Tensor,
                     noise: str = "gaussian") -> list[tuple[int, Tensor, Tensor]]:
    """(slot, piece of W + eps z, piece of W - eps z) of each piece of one draw, float32."""
    scale = eps.to(torch.float64).reshape(1)
    z = draw_noise(noise, keys, draw)
    out = []
    for piece in draw.pieces:
        base, scaled = _piece_of(weights[piece.slot], piece), scale * _noise_of(z, piece)
        out.append((piece.slot, (base + scaled).to(torch.float32), (base - scaled).to(torch.float32)))
    return out


def _joined(parts: list[Tensor], shape: torch.Size | tuple[int, ...]) -> Tensor:
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(shape)


class _Perturbation:
    """The + and - weights of one train_step's forward, drawn a draw at a time when a module
    first asks for a tensor of it (so the program makes each layer's noise where it runs)."""

    def __init__(self, step: "FullMeZOStep", keys: Keys, eps: Tensor) -> None:
        self.step, self.keys, self.eps = step, keys, eps
        # The weights this forward perturbs: the step's update is already applied when it starts.
        self.weights = [step.weight(j) for j in range(len(step.slots))]
        self.done: set[int] = set()
        self.pieces: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def pair(self, k: int) -> tuple[Tensor, Tensor]:
        for d in self.step.draws_of_slot[k]:
            if d not in self.done:
                self.done.add(d)
                for slot, plus, minus in perturbed_pieces(self.weights, self.step.draws[d], self.keys, self.eps,
                                                          self.step.noise_kind):
                    self.pieces.setdefault(slot, []).append((plus, minus))
        shape = self.step.slots[k].shape
        return (_joined([p for p, _ in self.pieces[k]], shape), _joined([m for _, m in self.pieces[k]], shape))


@dataclass
class _Binding:
    attr: str  # the module's attribute (weight, bias)
    slot: int  # index into FullMeZOStep.slots


class FullMeZOStep(nn.Module):
    """Full-parameter MeZO training and evaluation over a Hugging Face causal LM.

    model: the causal LM (float32, eval mode), e.g. from models/causal_lm.load_causal_lm; it is
          taken over: its parameters become this module's buffers.
    label_token_ids: one vocabulary id per class (the label words); prompts are left-padded, so
          the answer position is the last one.
    loss: "classification" (cross-entropy over the label words) or "lm" (over the vocabulary).
    """

    num_queries = 1  # MeZO: one direction a step

    def __init__(self, model: nn.Module, label_token_ids: list[int], loss: str = "classification",
                 noise: str = "gaussian", logit_softcap: float | None = None) -> None:
        super().__init__()
        if loss not in FULL_MEZO_LOSSES:
            raise ValueError(f"full-parameter MeZO trains label-word tasks (loss {' or '.join(FULL_MEZO_LOSSES)}), not {loss!r}")
        if noise not in NOISE_KINDS:
            raise ValueError(f"unknown noise {noise!r}; expected one of {NOISE_KINDS}")
        self.model = model
        self.loss = loss
        self.noise_kind = noise
        self.logit_softcap = logit_softcap
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.register_buffer("label_token_ids", torch.tensor(label_token_ids, dtype=torch.int64))
        self._perturbation: _Perturbation | None = None  # while train_step's forward runs
        self._owners: list[tuple[nn.Module, str]] = []  # slot -> (module holding the buffer, attribute)
        named_shapes = []
        first_slot: dict[int, int] = {}
        module_names = {id(m): name for name, m in model.named_modules()}
        for module in list(model.modules()):
            own = list(module.named_parameters(recurse=False))
            if not own:
                continue
            if any(True for child in module.children() for _ in child.parameters()):
                # Its forward would split the rows, and its children's again.
                raise ValueError(f"{module_names[id(module)]}: holds weights and has children with weights; full-parameter "
                                 "MeZO takes models whose weights sit in leaf modules (linears, embeddings, norms)")
            bindings = []
            for attr, param in own:
                if id(param) not in first_slot:  # the first owner keeps it, as a buffer of the same name
                    first_slot[id(param)] = len(self._owners)
                    self._owners.append((module, attr))
                    prefix = module_names[id(module)]
                    named_shapes.append((f"{prefix}.{attr}" if prefix else attr, tuple(param.shape)))
                    del module._parameters[attr]
                    module.register_buffer(attr, param.detach().to(torch.float32))
                else:  # a tied weight: read from its first owner
                    del module._parameters[attr]
                bindings.append(_Binding(attr, first_slot[id(param)]))
            self._take_over_forward(module, bindings)
        self.slots = weight_slots(named_shapes)
        self.numel = flat_numel(self.slots)
        self.draws = plan_draws(self.slots)
        self.draws_of_slot: list[list[int]] = [[] for _ in self.slots]
        for d, draw in enumerate(self.draws):
            for piece in draw.pieces:
                self.draws_of_slot[piece.slot].append(d)

    # ---- the weights ---------------------------------------------------------------------
    def weight(self, k: int) -> Tensor:
        module, attr = self._owners[k]
        return module._buffers[attr]

    def get_adapter(self) -> Tensor:
        """The trained state as one flat float32 vector in slot order (checkpoints, replay)."""
        return torch.cat([self.weight(k).reshape(-1) for k in range(len(self.slots))])

    def set_weights(self, flat: Tensor) -> Tensor:
        """Set every weight from a flat vector (get_adapter's layout); returns the first weight's
        first value, as apply_weight_update does (returning the state would copy all of it)."""
        flat = flat.reshape(-1).to(torch.float32)
        for k, (_, tensor) in enumerate(named_weights(self.slots, flat)):
            self.weight(k).copy_(tensor)
        return self.weight(0).reshape(-1)[:1].clone()

    def apply_weight_update(self, prev_seed: Tensor, prev_g: Tensor, lr: Tensor) -> Tensor:
        """W <- W - lr * g * z(prev_seed), tensor by tensor; returns the first weight's first value
        (a method needs an output; returning the weights would copy all of them)."""
        weights = [self.weight(k) for k in range(len(self.slots))]
        for k, new in updated_weights(weights, self.draws, stream_keys(prev_seed), prev_g, lr, self.noise_kind):
            weights[k].copy_(new)
        return self.weight(0).reshape(-1)[:1].clone()

    # ---- binding weights to the modules that use them ------------------------------------
    def _take_over_forward(self, module: nn.Module, bindings: list[_Binding]) -> None:
        original = module.forward

        def forward(x: Tensor, *args, **kwargs):
            return self._run_module(module, original, bindings, x, *args, **kwargs)

        module.forward = forward

    def _run_module(self, module: nn.Module, original, bindings: list[_Binding], x: Tensor, *args, **kwargs) -> Tensor:
        if self._perturbation is None:
            with _bound(module, {b.attr: self.weight(b.slot) for b in bindings}):
                return original(x, *args, **kwargs)
        if any(isinstance(a, Tensor) for a in (*args, *kwargs.values())):
            raise ValueError(f"{type(module).__name__} takes more than one tensor; full-parameter MeZO splits a weight "
                             "module's one input into its + and - rows")
        pairs = {b.attr: self._perturbation.pair(b.slot) for b in bindings}
        half = x.shape[0] // 2
        outs = []
        for sign, rows in ((0, x[:half]), (1, x[half:])):  # + rows first, then - rows
            with _bound(module, {attr: pair[sign] for attr, pair in pairs.items()}):
                outs.append(original(rows, *args, **kwargs))
        return torch.cat(outs)

    # ---- losses and the exported methods -------------------------------------------------
    def next_token_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Vocabulary logits [b, vocab] at the last position (softcapped where the family caps)."""
        positions = torch.clamp(torch.cumsum(attention_mask, dim=1) - 1, min=0)
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                  use_cache=False).last_hidden_state[:, -1, :]
        logits = self.model.get_output_embeddings()(hidden)
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def _answer_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Label-word (classification) or vocabulary (lm) logits at the answer position."""
        logits = self.next_token_logits(input_ids, attention_mask)
        return logits.index_select(1, self.label_token_ids) if self.loss == "classification" else logits

    def per_example_loss(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        logits = self._answer_logits(input_ids, attention_mask)
        targets = labels if self.loss == "classification" else self.label_token_ids.index_select(0, labels)
        return -torch.log_softmax(logits, dim=-1).gather(1, targets.reshape(-1, 1)).reshape(-1)

    def train_step(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, prev_seed: Tensor, new_seed: Tensor,
                   prev_g: Tensor, lr: Tensor, eps: Tensor) -> Tensor:
        """One MeZO step (the previous update folded in); returns (L+, L-), float32 [2]. Same
        inputs as PRGEStep.train_step with q = 1."""
        self.apply_weight_update(prev_seed, prev_g, lr)
        rows = input_ids.shape[0]
        self._perturbation = _Perturbation(self, stream_keys(new_seed), eps)
        try:
            losses = self.per_example_loss(input_ids.repeat(2, 1), attention_mask.repeat(2, 1), labels.repeat(2))
        finally:
            self._perturbation = None
        return losses.reshape(2, rows).mean(dim=1)

    def eval_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Label-word logits [b, num_labels] of the stored weights."""
        logits = self._answer_logits(input_ids, attention_mask)
        return logits if self.loss == "classification" else logits.index_select(1, self.label_token_ids)


@contextmanager
def _bound(module: nn.Module, tensors: dict[str, Tensor]) -> Iterator[None]:
    """Run module with the given tensors as its weights, then put back what was there."""
    saved = {}
    for attr, t in tensors.items():
        if attr in module._buffers:
            saved[attr] = module._buffers[attr]
            module._buffers[attr] = t
        else:  # a tied weight's second user: a plain attribute while it runs
            module.__dict__[attr] = t
    try:
        yield
    finally:
        for attr in tensors:
            if attr in saved:
                module._buffers[attr] = saved[attr]
            else:
                module.__dict__.pop(attr, None)
