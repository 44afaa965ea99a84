"""The P-RGE step as one export-friendly nn.Module.

One call of `train_step` does a whole step of parallel randomized gradient estimation:
  1. regenerate the previous step's noise z_prev from its seed and apply the update folded
     into this call:  B <- B - lr * (1/q) * sum_i g_i z_prev_i
  2. draw the new noise z_i from the new seed and write the 2q perturbed copies
     B + eps z_i (copies 0..q-1) and B - eps z_i (copies q..2q-1),
  3. run one forward over the minibatch tiled 2q times and return the 2q per-copy losses.
     With `micro_batch` rows set, that forward streams through the 2q*b rows in pieces of at
     most micro_batch rows, one after the other: activation memory then stays that of
     micro_batch rows however large b is (zeroth-order needs no activations kept for backprop).
The driver turns the losses into projected gradients g_i = (L_i+ - L_i-) / (2 eps) and passes
them back in the next call. Shapes are static and there is no data-dependent control flow, so
torch.export traces exactly this module; the eager engine calls it directly.

B of all adapters is handled as one flat vector (adapter order, each B row-major): noise is
generated once for the whole vector, and the flat layout is what manifests, checkpoints and
the runtime's get/set_adapter exchange. Update and perturbation arithmetic is float64 on the
flat vector (portable kernels, so eager and runtime agree bit for bit) and cast to float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prge.lora import LoRAFALinear, adapters_of, perturbed_mode
from prge.estimators import perturbed_copies, updated_adapter
from prge.noise import gaussian

LOSS_KINDS = ("classification", "lm")
# Rows per forward pass by default. 64 rows x 64 tokens already saturates the GEMMs on a
# 2-core CPU (the b=4 columns of BENCHMARKS.md), so streaming larger batches in pieces of 64
# costs no speed while keeping activation memory at 64 rows' worth.
DEFAULT_MICRO_BATCH = 64


@dataclass(frozen=True)
class MicroBatch:
    """One piece of the tiled forward: rows [row_start, row_stop) of the minibatch, run under
    each of the perturbed copies [copy_start, copy_stop)."""

    copy_start: int
    copy_stop: int
    row_start: int
    row_stop: int


def micro_batches(num_copies: int, batch: int, max_rows: int | None) -> list[MicroBatch]:
    """Split the copy-major tiled batch (num_copies x batch rows) into pieces of at most
    max_rows rows, in row order: whole copies at a time when a copy fits, else parts of one
    copy. None (or a limit above the total) is one piece: the whole forward at once."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"micro-batch must be >= 1 row, got {max_rows}")
    if max_rows is None or max_rows >= num_copies * batch:
        return [MicroBatch(0, num_copies, 0, batch)]
    if batch <= max_rows:
        per_piece = max_rows // batch
        return [MicroBatch(c, min(c + per_piece, num_copies), 0, batch) for c in range(0, num_copies, per_piece)]
    return [MicroBatch(c, c + 1, r, min(r + max_rows, batch)) for c in range(num_copies) for r in range(0, batch, max_rows)]


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

    body: maps (input_ids [B,T], attention_mask [B,T]) to the hidden state at the answer
          position, [B, H]. Prompts are left-padded so the answer position is always T-1.
    head: the output embedding (a Linear from H to the vocabulary).
    label_token_ids: one vocabulary id per class (the label words).
    adapter_names: names of the adapted modules in the original model (for PEFT files);
          defaults to their paths inside body.
    loss: "classification" = cross-entropy over the label words only;
          "lm" = full-vocabulary next-token cross-entropy of the label word at the answer position.
    micro_batch: most rows one forward pass runs at a time (train_step's tiled batch and
          eval_logits' batch are streamed in pieces); None = every row in one pass.
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
    ) -> None:
        super().__init__()
        micro_batches(1, 1, micro_batch)  # validates it
        if loss not in LOSS_KINDS:
            raise ValueError(f"unknown loss {loss!r}; expected one of {LOSS_KINDS}")
        self.body = body
        self.head = head
        self.num_queries = num_queries
        self.loss = loss
        self.micro_batch = micro_batch
        self.register_buffer("label_token_ids", torch.tensor(label_token_ids, dtype=torch.int64))
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
        return gaussian(seed, self.num_queries, self.adapter_numel)

    # ---- losses -------------------------------------------------------------------------
    def answer_logits(self, input_ids: Tensor, attention_mask: Tensor, full_vocab: bool) -> Tensor:
        hidden = self.body(input_ids, attention_mask)
        if full_vocab:
            return self.head(hidden)
        # Only the label-word rows of the output embedding: never a [B, vocab] tensor.
        weight = self.head.weight.index_select(0, self.label_token_ids)
        logits = hidden @ weight.t()
        if self.head.bias is not None:
            logits = logits + self.head.bias.index_select(0, self.label_token_ids)
        return logits

    def per_example_loss(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy per example, [B]. labels are class indices into label_token_ids."""
        if self.loss == "classification":
            logits, targets = self.answer_logits(input_ids, attention_mask, full_vocab=False), labels
        else:
            logits = self.answer_logits(input_ids, attention_mask, full_vocab=True)
            targets = self.label_token_ids.index_select(0, labels)
        log_probs = torch.log_softmax(logits, dim=-1)
        return -log_probs.gather(1, targets.reshape(-1, 1)).reshape(-1)

    # ---- the exported methods -----------------------------------------------------------
    def train_step(
        self,
        input_ids: Tensor,  # [b, T] int64, left-padded
        attention_mask: Tensor,  # [b, T] int64
        labels: Tensor,  # [b] int64 class indices
        prev_seed: Tensor,  # [1] int64: seed of the previous step's noise
        new_seed: Tensor,  # [1] int64: seed of this step's noise
        prev_g: Tensor,  # [q] float32: previous projected gradients (zeros on the first step)
        lr: Tensor,  # [1] float32: learning rate of the previous step's update
        eps: Tensor,  # [1] float32: perturbation scale of this step
    ) -> Tensor:
        """One P-RGE step; returns the 2q per-copy mean losses (+ copies first), float32 [2q]."""
        adapter = updated_adapter(self.flat_adapter(), prev_seed, prev_g, lr).to(torch.float32)
        self._write_adapter(adapter)
        self._write_copies(perturbed_copies(adapter, self.noise(new_seed), eps))
        copies, batch = 2 * self.num_queries, input_ids.shape[0]
        pieces: list[Tensor] = []
        # A Python loop, so export unrolls it into one forward per piece, each chained after
        # the previous one (_after) so their activations have disjoint lifetimes.
        for piece in micro_batches(copies, batch, self.micro_batch):
            rows = slice(piece.row_start, piece.row_stop)
            tiles = piece.copy_stop - piece.copy_start
            with perturbed_mode(self.body, copy_range=(piece.copy_start, piece.copy_stop)):
                pieces.append(self.per_example_loss(
                    _after(_rows(input_ids, rows, batch), pieces).repeat(tiles, 1),
                    _after(_rows(attention_mask, rows, batch), pieces).repeat(tiles, 1),
                    _rows(labels, rows, batch).repeat(tiles),
                ))
        losses = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # copy-major, as unsplit
        return losses.reshape(copies, -1).mean(dim=1)

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
        scaled = eps.to(torch.float64).reshape(1, 1) * gaussian(seed, 1, self.adapter_numel)
        self._write_adapter((adapter.to(torch.float64).reshape(1, -1) + scaled).to(torch.float32)[0])
        loss = self.per_example_loss(input_ids, attention_mask, labels).mean().reshape(1)
        self._write_adapter(adapter)
        return loss

    def apply_update(self, prev_seed: Tensor, prev_g: Tensor, lr: Tensor) -> Tensor:
        """Apply a pending update without a forward (before eval, checkpoint, or at the end)."""
        adapter = updated_adapter(self.flat_adapter(), prev_seed, prev_g, lr).to(torch.float32)
        self._write_adapter(adapter)
        return adapter

    def eval_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Label-word logits [b, num_labels] with the unperturbed adapter (micro-batched like
        train_step)."""
        batch = input_ids.shape[0]
        pieces: list[Tensor] = []
        for piece in micro_batches(1, batch, self.micro_batch):
            rows = slice(piece.row_start, piece.row_stop)
            ids, mask = _after(_rows(input_ids, rows, batch), pieces), _after(_rows(attention_mask, rows, batch), pieces)
            pieces.append(self.answer_logits(ids, mask, full_vocab=False))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def get_adapter(self) -> Tensor:
        return self.flat_adapter().clone()

    def set_adapter(self, flat: Tensor) -> Tensor:
        self._write_adapter(flat.reshape(-1).to(torch.float32))
        return self.flat_adapter().clone()


def _after(ids: Tensor, previous: list[Tensor]) -> Tensor:
    """ids (or a mask) unchanged, but made to depend on the last finished piece of a
    micro-batched forward.

    Without a data path between the pieces, XNNPACK's partitioner merges the same layer of
    every piece into one delegate call, so all pieces' activations are alive at once and
    streaming saves nothing. Adding an integer zero computed from the previous piece's output
    (an int64 op, which stays outside XNNPACK) orders the pieces and keeps their delegate
    calls apart; doing the same to the mask keeps the next piece's attention mask from being
    built (and held) early. x != x is False even for NaN, so the zero is exact for any value.
    """
    if not previous:
        return ids
    last = previous[-1].reshape(-1)[:1]
    return ids + (last != last).to(ids.dtype)


def _rows(t: Tensor, rows: slice, batch: int) -> Tensor:
    """t[rows], without a slice op in the traced graph when rows is all of them."""
    return t if (rows.start, rows.stop) == (0, batch) else t[rows]
