"""The methods of an exported P-RGE program: names, inputs in order (name, dtype, shape),
outputs, and how a driver's Python numbers become those inputs.

This is the single definition both sides of the program boundary derive from: the exporter
traces these inputs, the Python engines build their calls and check a loaded program's own
signatures against them, the manifest records them for drivers without Python, and the native
driver (android_harness/src/contract.hpp, checked against this module by a test) refuses a
manifest whose contract differs from the one it was built for.

Shapes are written with named dimensions, resolved by a program's `ProgramShapes`:
  batch (b, examples per perturbed copy), seq_len, eval_batch, num_queries (q), adapter_numel,
  num_labels, vocab, features (a side-tuning program's feature row).

A program is for a classification task (label words: labels are class indices [batch], and
eval_logits scores the label words) or for a completion task (labels are per-position targets
[batch, seq_len], prge/step.py; eval_losses and next_token_logits replace eval_logits).
inputs_of and training_methods give a method's inputs and a program's methods for its loss.
A generation program (GENERATION_METHODS) decodes one row with a KV cache; its seq_len is the
prefill window. A first-order program (FIRST_ORDER_METHODS, ExecuTorch's training extension)
has one joint forward-backward method; its outputs after OUTPUTS' loss are the label-word
logits [batch, num_labels], then the gradients and the parameters the extension appends.
A side-tuning program (SIDE_FEATURES_METHODS, SIDE_TUNED_METHODS) runs the frozen model only:
its features are [batch, features], the taps' hidden states then the label logits per row.
A full-parameter MeZO program (FULL_MEZO_METHODS) has a training program's methods with q = 1
and every weight in place of the adapter (adapter_numel = the model's parameter count), except
that its flush, apply_weight_update, and its setter, set_weights, return one value instead of
the whole state (a weight-sized output would be one more copy of the model in the method's memory).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prge.step import COMPLETION

# Bump when a method, an input, its order, dtype or shape changes: recorded in manifests, and
# a driver built for another version refuses the program.
CONTRACT_VERSION = 1

DTYPES = {"int64": torch.int64, "float32": torch.float32}


@dataclass(frozen=True)
class Arg:
    name: str
    dtype: str  # a key of DTYPES
    shape: tuple[str | int, ...]  # named dimensions (see the module docstring) or sizes


def _tokens(prefix: str = "") -> tuple[Arg, Arg]:
    rows = "eval_batch" if prefix else "batch"
    return Arg("input_ids", "int64", (rows, "seq_len")), Arg("attention_mask", "int64", (rows, "seq_len"))


_SEED = Arg("seed", "int64", (1,))
_LABELS = Arg("labels", "int64", ("batch",))
_TARGETS = Arg("labels", "int64", ("batch", "seq_len"))  # a completion program's labels

# Inputs in call order. The PRGEStep methods of the same names take exactly these parameters
# (a test checks the names), and each returns one tensor, OUTPUTS[name].
INPUTS: dict[str, tuple[Arg, ...]] = {
    "train_step": (*_tokens(), _LABELS, Arg("prev_seed", "int64", (1,)), Arg("new_seed", "int64", (1,)),
                   Arg("prev_g", "float32", ("num_queries",)), Arg("lr", "float32", (1,)), Arg("eps", "float32", (1,))),
    "apply_update": (Arg("prev_seed", "int64", (1,)), Arg("prev_g", "float32", ("num_queries",)), Arg("lr", "float32", (1,))),
    "eval_logits": _tokens("eval"),
    "get_adapter": (),
    "set_adapter": (Arg("flat", "float32", ("adapter_numel",)),),
    # The MeZO-style single forward at B + eps z (eps may be negative), for the benchmark's
    # sequential baseline on the same runtime.
    "perturbed_loss": (*_tokens(), _LABELS, _SEED, Arg("eps", "float32", (1,))),
    # Completion programs: held-out loss per row, and the next token's logits for greedy decoding.
    "eval_losses": (*_tokens("eval"), Arg("labels", "int64", ("eval_batch", "seq_len"))),
    "next_token_logits": _tokens("eval"),
    # Generation programs (one row, a KV cache inside the program): the prompt right-padded to
    # seq_len and its true length, then one token at a time at its absolute position.
    "prefill": (Arg("input_ids", "int64", (1, "seq_len")), Arg("length", "int64", (1,))),
    "decode": (Arg("token", "int64", (1, 1)), Arg("position", "int64", (1,))),
    # First-order programs: the batch's mean loss and its gradient in B, in one call.
    "first_order_step": (*_tokens(), _LABELS),
    # Full-parameter MeZO programs: apply_update without returning the (weight-sized) state.
    "apply_weight_update": (Arg("prev_seed", "int64", (1,)), Arg("prev_g", "float32", ("num_queries",)), Arg("lr", "float32", (1,))),
    "set_weights": (Arg("flat", "float32", ("adapter_numel",)),),
    # Side-tuning programs: the frozen model's taps and label logits per row (what the device
    # sends), and base + trained side network's label logits (what it then predicts with).
    "side_features": _tokens(),
    "side_logits": _tokens(),
}
OUTPUTS: dict[str, Arg] = {
    "train_step": Arg("losses", "float32", ("2q",)),  # + copies first, then - copies
    "apply_update": Arg("adapter", "float32", ("adapter_numel",)),
    "eval_logits": Arg("logits", "float32", ("eval_batch", "num_labels")),
    "get_adapter": Arg("adapter", "float32", ("adapter_numel",)),
    "set_adapter": Arg("adapter", "float32", ("adapter_numel",)),
    "perturbed_loss": Arg("loss", "float32", (1,)),
    "eval_losses": Arg("losses", "float32", ("eval_batch",)),
    "next_token_logits": Arg("logits", "float32", ("eval_batch", "vocab")),
    "prefill": Arg("logits", "float32", (1, "vocab")),  # at the prompt's last token
    "decode": Arg("logits", "float32", (1, "vocab")),
    "first_order_step": Arg("loss", "float32", ()),  # a scalar: the extension differentiates output 0
    "apply_weight_update": Arg("first_weight", "float32", (1,)),  # a method must return something
    "set_weights": Arg("first_weight", "float32", (1,)),
    "side_features": Arg("features", "float32", ("batch", "features")),  # taps x hidden, then the label logits
    "side_logits": Arg("logits", "float32", ("batch", "num_labels")),
}
# What a training driver calls; all of them share one adapter state inside the program.
TRAINING_METHODS = ("train_step", "apply_update", "eval_logits", "get_adapter", "set_adapter")
COMPLETION_TRAINING_METHODS = ("train_step", "apply_update", "eval_losses", "next_token_logits", "get_adapter", "set_adapter")
# A generation program (`prge export --generate`): what a decoding loop calls.
GENERATION_METHODS = ("prefill", "decode", "get_adapter", "set_adapter")
# A first-order program (`prge export --first-order`): what its SGD driver calls.
FIRST_ORDER_METHODS = ("first_order_step",)
# A full-parameter MeZO program (`prge export --mezo-full`): its "adapter" is every weight.
FULL_MEZO_METHODS = ("train_step", "apply_weight_update", "eval_logits", "get_adapter", "set_weights")
# Side-tuning programs (`prge side-tune`): the device's features before training; after it, the
# same program with the trained side network's logits beside them.
SIDE_FEATURES_METHODS = ("side_features",)
SIDE_TUNED_METHODS = ("side_features", "side_logits")
# Exported only on request.
OPTIONAL_METHODS = ("perturbed_loss",)
KNOWN_METHODS = tuple(dict.fromkeys(TRAINING_METHODS + COMPLETION_TRAINING_METHODS + OPTIONAL_METHODS
                                    + GENERATION_METHODS + FIRST_ORDER_METHODS + FULL_MEZO_METHODS + SIDE_TUNED_METHODS))


def side_methods(trained: bool) -> tuple[str, ...]:
    """A side-tuning program's methods: side_logits only once a side network is in it."""
    return SIDE_TUNED_METHODS if trained else SIDE_FEATURES_METHODS


def training_methods(loss: str) -> tuple[str, ...]:
    """The methods a training driver calls on a program of this loss."""
    return COMPLETION_TRAINING_METHODS if loss == COMPLETION else TRAINING_METHODS


def inputs_of(method: str, loss: str) -> tuple[Arg, ...]:
    """The method's inputs in a program of this loss (a completion program's labels are targets)."""
    if loss == COMPLETION:
        return tuple(_TARGETS if a is _LABELS else a for a in INPUTS[method])
    return INPUTS[method]


@dataclass(frozen=True)
class ExportShapes:
    """The static shapes a user chooses at export."""

    batch_size: int  # b: examples per perturbed copy; train_step takes [b, seq_len]
    seq_len: int  # prompt length in tokens
    eval_batch_size: int  # rows per eval_logits call


@dataclass(frozen=True)
class ProgramShapes:
    """Every named dimension of a program: the export's shapes plus what the model fixes."""

    batch: int
    seq_len: int
    eval_batch: int
    num_queries: int
    adapter_numel: int
    num_labels: int
    vocab: int = 0  # read by next_token_logits only
    loss: str = "classification"  # which inputs the methods take (inputs_of)
    features: int = 0  # read by side_features only

    @classmethod
    def of(cls, shapes: ExportShapes, num_queries: int, adapter_numel: int, num_labels: int, vocab: int,
           loss: str) -> "ProgramShapes":
        return cls(shapes.batch_size, shapes.seq_len, shapes.eval_batch_size, num_queries, adapter_numel, num_labels,
                   vocab, loss)

    @classmethod
    def for_generation(cls, seq_len: int, adapter_numel: int, vocab: int) -> "ProgramShapes":
        """A generation program's: one row, seq_len the prefill window, no queries or labels."""
        return cls(1, seq_len, 1, 0, adapter_numel, 0, vocab, "lm")

    @classmethod
    def for_first_order(cls, batch: int, seq_len: int, adapter_numel: int, num_labels: int, vocab: int) -> "ProgramShapes":
        """A first-order program's: one call takes the batch (of a label-word task); no queries."""
        return cls(batch, seq_len, batch, 1, adapter_numel, num_labels, vocab, "classification")

    @classmethod
    def for_side(cls, batch: int, seq_len: int, num_labels: int, features: int) -> "ProgramShapes":
        """A side-tuning program's: a fixed batch of prompts, no adapter or queries."""
        return cls(batch, seq_len, batch, 0, 0, num_labels, 0, "classification", features)

    def size(self, dim: str | int) -> int:
        if isinstance(dim, int):
            return dim
        if dim == "2q":
            return 2 * self.num_queries
        return getattr(self, dim)

    def resolve(self, arg: Arg) -> list[int]:
        return [self.size(d) for d in arg.shape]


def example_inputs(method: str, shapes: ProgramShapes) -> tuple[Tensor, ...]:
    """Tensors of the method's inputs for tracing: masks all ones, everything else zeros. Every
    input is its own tensor object (one object passed twice, say lr and eps, makes export treat
    the two as one aliased input, silently)."""
    make = {"attention_mask": torch.ones, "length": torch.ones}  # a prompt has at least one token
    return tuple(make.get(a.name, torch.zeros)(*shapes.resolve(a), dtype=DTYPES[a.dtype])
                 for a in inputs_of(method, shapes.loss))


def step_scalars(prev_seed: int, new_seed: int, prev_g: list[float], lr: float, eps: float) -> tuple[Tensor, ...]:
    """train_step's scalar inputs (after the batch) from a driver's Python numbers: seeds as
    int64 [1], g as float32 [q], lr and eps as float32 [1]. The float32 rounding of g and lr
    happens here, the same for every engine and for replay."""
    return (
        torch.tensor([prev_seed], dtype=torch.int64),
        torch.tensor([new_seed], dtype=torch.int64),
        torch.tensor(prev_g, dtype=torch.float32),
        torch.tensor([lr], dtype=torch.float32),
        torch.tensor([eps], dtype=torch.float32),
    )


def update_scalars(prev_seed: int, prev_g: list[float], lr: float) -> tuple[Tensor, ...]:
    """apply_update's inputs, encoded exactly as train_step's update part."""
    seed, _, g, lr_t, _ = step_scalars(prev_seed, 0, prev_g, lr, 0.0)
    return seed, g, lr_t


def signatures_json(methods: tuple[str, ...] | list[str], shapes: ProgramShapes) -> dict[str, Any]:
    """The manifest's "contract": the version and every method's inputs and output with
    resolved shapes, for drivers that check a program without this module."""

    def arg(a: Arg) -> dict[str, Any]:
        return {"name": a.name, "dtype": a.dtype, "shape": shapes.resolve(a)}

    return {
        "version": CONTRACT_VERSION,
        "methods": {m: {"inputs": [arg(a) for a in inputs_of(m, shapes.loss)], "output": arg(OUTPUTS[m])} for m in methods},
    }
