"""Methods exported on request for the benchmark: perturbed_loss (the MeZO-style forward on the
same runtime) and method selection."""
from __future__ import annotations

import pytest
import torch

from export.contract.methods import ExportShapes
from export.exporter import export_step, write_program


def _inputs(batch, seed: int, eps: float):
    ids, mask, labels = batch
    return ids, mask, labels, torch.tensor([seed], dtype=torch.int64), torch.tensor([eps], dtype=torch.float32)


def test_perturbed_loss_is_sequential_losses_one_call_at_a_time(tiny_step, tiny_batch, randomize_adapter):
    step = tiny_step(q=1)
    adapter = randomize_adapter(step, seed=3)
    batch = tiny_batch(b=3)
    with torch.no_grad():
        expected = step.sequential_losses(*_inputs(batch, 11, 1e-2))
        plus = step.perturbed_loss(*_inputs(batch, 11, 1e-2))
        minus = step.perturbed_loss(*_inputs(batch, 11, -1e-2))
    assert torch.equal(torch.cat([plus, minus]), expected)  # bit for bit: same float64 arithmetic
    assert not torch.equal(plus, minus)
    assert torch.equal(step.get_adapter(), adapter)  # B is left as it was


def test_exported_perturbed_loss_matches_eager(tiny_step, tiny_batch, randomize_adapter, tmp_path):
    step = tiny_step(q=1)
    methods = ("perturbed_loss", "set_adapter", "get_adapter")
    program, delegation, _ = export_step(step, ExportShapes(2, 16, 4), progress=lambda _: None, methods=methods)
    assert set(delegation) == set(methods)
    pte, _ = write_program(program, tmp_path)
    from executorch.runtime import Runtime

    loaded = Runtime.get().load_program(pte)
    et = {name: loaded.load_method(name) for name in methods}  # all loaded before the first execute
    adapter = randomize_adapter(step, seed=5)
    et["set_adapter"].execute([adapter])
    batch = tiny_batch(b=2)
    for seed, eps in ((7, 1e-2), (7, -1e-2), (8, 1e-2)):
        with torch.no_grad():
            eager = step.perturbed_loss(*_inputs(batch, seed, eps))
        assert torch.allclose(et["perturbed_loss"].execute(list(_inputs(batch, seed, eps)))[0], eager, rtol=0, atol=1e-5)
    assert torch.equal(et["get_adapter"].execute([])[0], adapter)  # the runtime's B is unchanged too


def test_unknown_method_is_refused(tiny_step):
    with pytest.raises(ValueError, match="cannot export"):
        export_step(tiny_step(q=1), ExportShapes(2, 16, 4), progress=lambda _: None, methods=("train_stepp",))
