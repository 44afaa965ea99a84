"""The P-RGE step as one export-friendly nn.Module.

One call of `train_step` does a whole step of parallel randomized gradient estimation:
  1. apply the update folded into this call, B <- B - lr * (1/q) * sum_i g_i z_prev_i, with
     the previous step's noise z_prev kept from the call that drew it (or regenerated from its
     seed when this call does not follow that one: `updated`),
  2. draw the new noise z_i from the new seed, keep it, and write the 2q perturbed copies
     B + eps z_i (copies 0..q-1) and B - eps z_i (copies q..2q-1),
  3. run one forward over the minibatch tiled 2q times and return the 2q per-copy losses.
     With `micro_batch` rows set, that forward streams through the 2q*b rows in equal pieces
     of at most micro_batch rows, one after the other: activation memory then stays that of
     one piece however large b is (zeroth-order needs no activations kept for backprop).
     Exported, the pieces are one loop (torch scan), so the program holds a single piece's
     graph whatever the number of pieces; eager runs the same piece function in a Python loop.
The driver turns the losses into projected gradients g_i = (L_i+ - L_i-) / (2 eps) and passes
them back in the next call. Shapes are static and the one data-dependent choice (kept or
regenerated noise, the same numbers either way) is a torch.cond, so torch.export traces exactly
this module; the eager engine calls it directly.

B of all adapters is handled as one flat vector (adapter order, each B row-major): noise is
generated once for the whole vector, and the flat layout is what manifests, checkpoints and
the runtime's get/set_adapter exchange. Update and perturbation arithmetic is float64 on the
flat vector (portable kernels, so eager and runtime agree bit for bit) and cast to float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prge.estimators import perturbed_copies, update_along, updated_adapter
from prge.lora import LoRAFALinear, adapters_of, perturbed_mode
from prge.noise import NOISE_KINDS, directions
from prge.pieces import check_micro_batch, piece_layout, stream

# "classification" and "lm" score a label word at the answer position (the last one);
# "completion" scores a completion's tokens, each predicted from the position before it.
LOSS_KINDS = ("classification", "lm", "completion")
COMPLETION = "completion"
# In a completion task's targets: this position predicts nothing that is scored.
IGNORE_TARGET = -100


@dataclass(frozen=True)
class AdapterSlot:
    """Where one adapter's B lives in the flat adapter vector."""

    name: str  # module path in the HF model, e.g. "model.layers.0.self_attn.q_proj"
    shape: tuple[int, int]  # (out_features, rank)
    offset: int  # first element in the flat vector
    in_features: int  # input width of the adapted layer (A is [rank, in_features])
    a_stream: int  # noise stream of this adapter's frozen A

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


class PRGEStep(nn.Module):
    """P-RGE training and evaluation over a causal LM whose adapted layers are LoRAFALinear.

    body: maps (input_ids [B,T], attention_mask [B,T]) to the final hidden states, [B, T, H].
          Prompts are left-padded so the answer position is always T-1.
    head: the output embedding (a Linear from H to the vocabulary).
    label_token_ids: one vocabulary id per class (the label words).
    adapter_names: names of the adapted modules in the original model (for PEFT files);
          defaults to their paths inside body.
    loss: "classification" = cross-entropy over the label words only;
          "lm" = full-vocabulary next-token cross-entropy of the label word at the answer position;
          "completion" = mean full-vocabulary cross-entropy of a completion's tokens: labels are
          then [B, T] targets, labels[i, p] the token position p must predict or IGNORE_TARGET.
    completion_len: "completion" only: the most scored tokens a row may have. The head runs at
          that many positions per row (the scored ones), never at all T, so the logits take
          rows x completion_len x vocab, not rows x T x vocab.
    micro_batch: most rows one forward pass runs at a time (train_step's tiled batch and
          eval_logits' batch are streamed in pieces); None = every row in one pass.
    logit_softcap: the family's final logit soft-capping (Gemma 2), c * tanh(logits / c); None = none.
    noise: the distribution of the perturbation directions (prge/noise.py NOISE_KINDS), the
          estimator's choice (prge/estimators.py).
    """

    def __init__(
        self,
        body: nn.Module,
        head: nn.Linear,
        label_token_ids: list[int],
        num_queries: int,
        loss: str = "classification",
        adapter_names: list[str] | None = None,
        micro_batch: int | None = None,
        logit_softcap: float | None = None,
        noise: str = "gaussian",
        completion_len: int | None = None,
    ) -> None:
        super().__init__()
        if (loss == COMPLETION) != (completion_len is not None) or (completion_len is not None and completion_len < 1):
            raise ValueError(f"completion_len ({completion_len}) is a positive count for the completion loss and None otherwise")
        self.completion_len = completion_len
        check_micro_batch(micro_batch)
        if noise not in NOISE_KINDS:
            raise ValueError(f"unknown noise {noise!r}; expected one of {NOISE_KINDS}")
        self.noise_kind = noise
        if loss not in LOSS_KINDS:
            raise ValueError(f"unknown loss {loss!r}; expected one of {LOSS_KINDS}")
        self.body = body
        self.head = head
        self.num_queries = num_queries
        self.loss = loss
        self.micro_batch = micro_batch
        self.logit_softcap = logit_softcap
        self.register_buffer("label_token_ids", torch.tensor(label_token_ids, dtype=torch.int64))
        self.vocab_size = head.weight.shape[0]
        # The label words' rows of the head, copied: the classification loss and eval_logits read
        # only these, never a [B, vocab] tensor, and a program may then leave the full head out
        # (drop_full_head).
        with torch.no_grad():
            self.register_buffer("label_rows", head.weight.index_select(0, self.label_token_ids).to(torch.float32).clone())
            bias = None if head.bias is None else head.bias.index_select(0, self.label_token_ids).to(torch.float32).clone()
        self.register_buffer("label_bias", bias)
        self.adapter_layers: list[LoRAFALinear] = [m for _, m in adapters_of(body)]
        if not self.adapter_layers:
            raise ValueError("the model has no LoRA-FA adapters")
        for layer in self.adapter_layers:
            if layer.num_copies != 2 * num_queries:
                raise ValueError(f"adapter holds {layer.num_copies} copies, need 2q = {2 * num_queries}")
        names = adapter_names or [name for name, _ in adapters_of(body)]
        slots, offset = [], 0
        for name, layer in zip(names, self.adapter_layers, strict=True):
            slots.append(AdapterSlot(name, (layer.out_features, layer.rank), offset, layer.in_features, layer.a_stream))
            offset += layer.out_features * layer.rank
        self.slots: tuple[AdapterSlot, ...] = tuple(slots)
        self.adapter_numel = offset
        # The directions the last train_step drew, and 1 + its seed (0 = none: a program's
        # mutable buffers start at zero), so that the next call's folded update reads them
        # instead of drawing them again (`updated`). Not state: a pure function of the seed.
        self.register_buffer("last_directions", torch.zeros(num_queries, offset, dtype=torch.float64), persistent=False)
        self.register_buffer("last_directions_key", torch.zeros(1, dtype=torch.int64), persistent=False)
        # Names under which a piece's copies replace each adapter's lora_B_copies in the body.
        self._copies_names = [f"{name}.lora_B_copies" for name, _ in adapters_of(body)]

    # ---- adapter state -------------------------------------------------------------------
    def flat_adapter(self) -> Tensor:
        return torch.cat([layer.lora_B.reshape(-1) for layer in self.adapter_layers])

    def _write_adapter(self, flat: Tensor) -> None:
        for slot, layer in zip(self.slots, self.adapter_layers):
            layer.lora_B.copy_(flat[slot.offset : slot.offset + slot.numel].reshape(slot.shape))

    def _write_copies(self, copies: Tensor) -> None:
        """copies: [2q, adapter_numel] float32."""
        for slot, layer in zip(self.slots, self.adapter_layers):
            part = copies[:, slot.offset : slot.offset + slot.numel]
            layer.lora_B_copies.copy_(part.reshape(2 * self.num_queries, *slot.shape))

    def noise(self, seed: Tensor) -> Tensor:
        """The q perturbation directions of a step, float64 [q, adapter_numel]."""
        return directions(self.noise_kind, seed, self.num_queries, self.adapter_numel)

    def updated(self, prev_seed: Tensor, prev_g: Tensor, lr: Tensor) -> Tensor:
        """The adapter after the folded update (float32, not yet written), along the directions
        of prev_seed: read from last_directions when the last train_step drew them (the update of
        the step right after it, the common case), drawn again otherwise (after a set_adapter, a
        resume, a replayed or skipped step). Both give the same numbers; on the runtime's
        portable float64 kernels, drawing is most of what a step adds to a forward.

        Exported, the choice is a torch.cond holding the whole update, so that only the new
        adapter leaves it. ExecuTorch plans a branch's temporaries in space of their own, beside
        (not over) the rest of the method's, so the branch draws and adds one direction at a
        time (update_along): its temporaries are those of one direction, not of q. Eager takes
        the branch in Python (torch.cond in eager mode compiles its branches)."""
        hit = (self.last_directions_key == _directions_key(prev_seed)).reshape(())

        def along_kept(adapter, kept, seed, g, rate):
            return update_along(adapter, lambda i: kept[i], g, rate).to(torch.float32)

        def along_drawn(adapter, kept, seed, g, rate):  # replay's own update
            return updated_adapter(adapter, seed, g, rate, self.noise_kind).to(torch.float32)

        operands = (self.flat_adapter(), self.last_directions, prev_seed, prev_g, lr)
        if not torch.compiler.is_exporting():
            return (along_kept if bool(hit) else along_drawn)(*operands)
        # Cloned at once: ExecuTorch 1.5.1 leaves a cond's result in the branch's planned space,
        # which other control-flow bodies (the forward's scan) reuse, so a result still alive
        # when the scan runs is overwritten (measured: wrong adapters in micro-batched programs).
        return torch.cond(hit, along_kept, along_drawn, operands).clone()

    def _keep_directions(self, seed: Tensor, z: Tensor) -> None:
        self.last_directions.copy_(z)
        self.last_directions_key.copy_(_directions_key(seed))

    # ---- losses -------------------------------------------------------------------------
    def answer_logits(self, input_ids: Tensor, attention_mask: Tensor, full_vocab: bool) -> Tensor:
        return self.head_logits(self.body(input_ids, attention_mask)[:, -1, :], full_vocab)

    def drop_full_head(self) -> None:
        """Forget the full output head: a classification step reads only label_rows. For a
        quantized program whose head is tied to the (now int8) input embedding, this is what
        keeps the float32 vocabulary table out of the program."""
        if self.loss != "classification":
            raise ValueError(f"the {self.loss!r} loss reads the full head; only a classification step can drop it")
        self.head = None

    def head_logits(self, hidden: Tensor, full_vocab: bool) -> Tensor:
        """Logits of final hidden states [..., H]: over the whole vocabulary, or the label words
        only; soft-capped where the model caps them (Gemma)."""
        if full_vocab:
            if self.head is None:
                raise ValueError("this step dropped its full output head; it has label-word logits only")
            logits = self.head(hidden)
        else:
            logits = hidden @ self.label_rows.t()
            if self.label_bias is not None:
                logits = logits + self.label_bias
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def per_example_loss(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy per example, [B]. labels: class indices into label_token_ids, or for
        the completion loss [B, T] targets (see the class docstring)."""
        return self._loss(self.body(input_ids, attention_mask), labels)

    def _loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        if self.loss == COMPLETION:
            return self._completion_loss(hidden, labels)
        hidden = hidden[:, -1, :]
        if self.loss == "classification":
            logits, targets = self.head_logits(hidden, full_vocab=False), labels
        else:
            logits = self.head_logits(hidden, full_vocab=True)
            targets = self.label_token_ids.index_select(0, labels)
        return _nll(logits, targets)

    def label_losses_and_logits(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """A classification step's per-example cross-entropy [B] and label-word logits [B, num_labels]
        from one forward: what a first-order program returns (export/first_order.py)."""
        logits = self.head_logits(self.body(input_ids, attention_mask)[:, -1, :], full_vocab=False)
        return _nll(logits, labels), logits

    def _completion_loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over each row's scored positions, [B].

        The scored positions are picked with a fixed-size top-k (static shapes, no data-dependent
        control flow): ranking key = scored * T + position puts every scored position above every
        other one, so the completion_len picked per row hold all of its scored ones (the data
        readers guarantee there are at most completion_len) and the rest are masked out.
        """
        rows, seq_len, width = hidden.shape
        scored = targets != IGNORE_TARGET
        positions = torch.arange(seq_len, dtype=torch.int64).reshape(1, -1)
        key = scored.to(torch.int64) * seq_len + positions
        picked = torch.topk(key, self.completion_len, dim=1).indices  # [B, C]
        picked_hidden = hidden.gather(1, picked.unsqueeze(-1).expand(rows, self.completion_len, width))
        picked_targets = targets.gather(1, picked)
        valid = (picked_targets != IGNORE_TARGET).to(torch.float32)
        log_probs = torch.log_softmax(self.head_logits(picked_hidden, full_vocab=True), dim=-1)  # [B, C, V]
        token_nll = -log_probs.gather(2, picked_targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (token_nll * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)

    def _piece_losses(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *copies: Tensor) -> Tensor:
        """Per-row losses of one piece, its rows run under the given perturbed copies (one
        [copies_per_piece, out, rank] tensor per adapter). The copies come in as arguments,
        not as module state, because a scan body must be a pure function."""
        hidden = torch.func.functional_call(self.body, dict(zip(self._copies_names, copies)), (input_ids, attention_mask))
        return self._loss(hidden, labels)

    # ---- the exported methods -----------------------------------------------------------
    def train_step(
        self,
        input_ids: Tensor,  # [b, T] int64, left-padded
        attention_mask: Tensor,  # [b, T] int64
        labels: Tensor,  # [b] int64 class indices ([b, T] targets for the completion loss)
        prev_seed: Tensor,  # [1] int64: seed of the previous step's noise
        new_seed: Tensor,  # [1] int64: seed of this step's noise
        prev_g: Tensor,  # [q] float32: previous projected gradients (zeros on the first step)
        lr: Tensor,  # [1] float32: learning rate of the previous step's update
        eps: Tensor,  # [1] float32: perturbation scale of this step
    ) -> Tensor:
        """One P-RGE step; returns the 2q per-copy mean losses (+ copies first), float32 [2q]."""
        adapter = self.updated(prev_seed, prev_g, lr)
        self._write_adapter(adapter)
        z = self.noise(new_seed)
        self._keep_directions(new_seed, z)
        self._write_copies(perturbed_copies(adapter, z, eps))
        copies, batch = 2 * self.num_queries, input_ids.shape[0]
        layout = piece_layout(copies, batch, self.micro_batch)

        def split(t: Tensor) -> Tensor:  # the tiled batch, copy-major, cut into the pieces
            tiled = t.repeat(copies, *([1] * (t.dim() - 1)))
            return tiled.reshape(layout.count, layout.rows, *t.shape[1:])

        copy_ids = layout.copy_ids().reshape(-1)
        piece_copies = [layer.lora_B_copies.index_select(0, copy_ids).reshape(layout.count, layout.copies_per_piece, *layer.lora_B_copies.shape[1:])
                        for layer in self.adapter_layers]
        with perturbed_mode(self.body):
            losses = stream(self._piece_losses, [split(input_ids), split(attention_mask), split(labels), *piece_copies])
        return losses.reshape(copies, -1).mean(dim=1)  # pieces are in row order: copy-major, as unsplit

    def sequential_losses(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, seed: Tensor, eps: Tensor
    ) -> Tensor:
        """MeZO-style estimation: the same 2q losses as train_step, as 2q separate forwards.

        Each forward writes one perturbed copy into B itself (bit-identical to the copy
        train_step would write) and runs the clean model on the un-tiled batch; B is restored.
        """
        adapter = self.flat_adapter().clone()
        copies = perturbed_copies(adapter, self.noise(seed), eps)
        losses = []
        for copy in copies:
            self._write_adapter(copy)
            losses.append(self.per_example_loss(input_ids, attention_mask, labels).mean())
        self._write_adapter(adapter)
        return torch.stack(losses)

    def perturbed_loss(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, seed: Tensor, eps: Tensor
    ) -> Tensor:
        """One MeZO-style forward: the mean loss [1] at B + eps z over the un-tiled batch.

        z is stream 0 of the seed and eps may be negative, so calls with +eps and -eps give
        sequential_losses' two losses for q = 1 bit for bit. It exists so the sequential
        baseline can run on the same runtime as train_step. B is written back unchanged.
        """
        adapter = self.flat_adapter()
        scaled = eps.to(torch.float64).reshape(1, 1) * directions(self.noise_kind, seed, 1, self.adapter_numel)
        self._write_adapter((adapter.to(torch.float64).reshape(1, -1) + scaled).to(torch.float32)[0])
        loss = self.per_example_loss(input_ids, attention_mask, labels).mean().reshape(1)
        self._write_adapter(adapter)
        return loss

    def apply_update(self, prev_seed: Tensor, prev_g: Tensor, lr: Tensor) -> Tensor:
        """Apply a pending update without a forward (before eval, checkpoint, or at the end)."""
        adapter = self.updated(prev_seed, prev_g, lr)
        self._write_adapter(adapter)
        return adapter

    def eval_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Label-word logits [b, num_labels] with the unperturbed adapter (micro-batched like
        train_step)."""
        return self._eval_stream(lambda ids, mask: self.answer_logits(ids, mask, full_vocab=False), input_ids, attention_mask)

    def eval_losses(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Per-row completion loss [b] with the unperturbed adapter (held-out loss, perplexity)."""
        return self._eval_stream(self.per_example_loss, input_ids, attention_mask, labels)

    def next_token_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Full-vocabulary logits [b, vocab] at the last position with the unperturbed adapter:
        one greedy decoding step (the whole window is run again each time; no KV cache)."""
        return self._eval_stream(lambda ids, mask: self.answer_logits(ids, mask, full_vocab=True), input_ids, attention_mask)

    def _eval_stream(self, fn, *batch: Tensor) -> Tensor:
        layout = piece_layout(1, batch[0].shape[0], self.micro_batch)
        pieces = [t.reshape(layout.count, layout.rows, *t.shape[1:]) for t in batch]
        out = stream(fn, pieces)
        return out.reshape(batch[0].shape[0], *out.shape[2:])

    def get_adapter(self) -> Tensor:
        return self.flat_adapter().clone()

    def set_adapter(self, flat: Tensor) -> Tensor:
        self._write_adapter(flat.reshape(-1).to(torch.float32))
        return self.flat_adapter().clone()


def _directions_key(seed: Tensor) -> Tensor:
    """last_directions_key of the directions of seed: 1 + seed, as 0 means none kept."""
    return seed.reshape(1).to(torch.int64) + 1


def _nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of each row's target class, [B]."""
    return -torch.log_softmax(logits, dim=-1).gather(1, targets.reshape(-1, 1)).reshape(-1)
