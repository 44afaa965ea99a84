"""The engines side by side: one interface, and the rule for the ExecuTorch outputs' memory."""
from __future__ import annotations

import torch

from export.contract.methods import step_scalars
from runtime_driver.engines import EagerPRGE, EagerSequential, ExecuTorchPRGE, ExecuTorchProgram

INTERFACE = ("train_step", "apply_update", "eval_logits", "get_adapter", "set_adapter")
DESCRIPTION = ("num_queries", "seq_len", "eval_batch_size", "fixed_eval_batch", "slots", "adapter", "base_model",
               "model_type", "program_sha256")


def test_every_engine_has_the_interface():
    for engine in (EagerPRGE, EagerSequential, ExecuTorchPRGE):
        assert all(callable(getattr(engine, name)) for name in INTERFACE), engine


def test_engines_describe_what_they_train_alike(tiny_program, tiny_model_dir):
    from runtime_driver.engines import program_adapter_config
    from runtime_driver.run import eager_engine

    et = ExecuTorchPRGE(tiny_program("llama"))
    eager = eager_engine(tiny_model_dir("llama"), program_adapter_config(et.manifest), et.manifest["task"]["label_token_ids"],
                         et.seq_len)
    for name in DESCRIPTION:
        assert hasattr(et, name) and hasattr(eager, name), name
    assert et.slots == eager.slots and et.num_queries == eager.num_queries and et.model_type == eager.model_type
    assert et.base_model == eager.base_model
    assert (et.fixed_eval_batch, eager.fixed_eval_batch) == (True, False)
    assert len(et.program_sha256) == 64 and eager.program_sha256 is None


def test_outputs_outlive_the_next_execute(tiny_program, tiny_batch):
    """The runtime reuses its planned memory on every execute: an output must not be a view of
    it, or the next call would change a result the driver still holds (the losses it logs, the
    logits it scores). The Python bindings copy outputs (clone_outputs=True); this holds them to it."""
    program = ExecuTorchProgram(tiny_program("llama"))
    ids, mask, labels = tiny_batch(b=2)
    first = program.run("train_step", [ids, mask, labels, *step_scalars(0, 1, [0.0, 0.0], 0.0, 1e-2)])
    kept = first.clone()
    second = program.run("train_step", [ids.flip(0), mask.flip(0), labels.flip(0), *step_scalars(1, 2, [0.5, -0.5], 0.1, 1e-2)])
    assert not torch.equal(second, kept)  # the second call did compute something else
    assert torch.equal(first, kept)
    eval_ids, eval_mask, _ = tiny_batch(b=8)
    logits = program.run("eval_logits", [eval_ids, eval_mask])
    kept = logits.clone()
    program.run("eval_logits", [eval_ids.flip(0), eval_mask.flip(0)])
    assert torch.equal(logits, kept)
