"""The native runner of generation programs (prge-native-generate) decodes what the Python
runtime decodes, and refuses the wrong kind of program or prompt with one error line."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from models.causal_lm import AdapterConfig, build_step
from models.peft_io import save_peft_adapter
from runtime_driver.generate import generate


@pytest.fixture(scope="module")
def runner(native_binary) -> Path:
    return native_binary.parent / "prge-native-generate"


def test_the_native_runner_decodes_the_python_runtimes_tokens(runner, tiny_generation_program, tiny_model_dir,
                                                              randomize_adapter, tmp_path):
    adapter = AdapterConfig(num_queries=1, rank=4, loss="lm")
    step = build_step(tiny_model_dir("llama"), adapter, [])
    flat = randomize_adapter(step, seed=11, scale=0.5)
    peft_dir = save_peft_adapter(tmp_path / "adapter", step.slots, flat, rank=4, alpha=adapter.alpha, a_seed=adapter.a_seed,
                                 targets=adapter.targets, base_model=str(tiny_model_dir("llama")))
    python = generate(tiny_generation_program, "the film was fun", peft_dir, max_new_tokens=12)
    native = generate(tiny_generation_program, "the film was fun", peft_dir, max_new_tokens=12, native=runner)
    assert native["tokens"] == python["tokens"] and len(native["tokens"]) > 0
    assert native["decode_tokens_per_s"] > 0 and native["prefill_s"] > 0
    base = generate(tiny_generation_program, "the film was fun", max_new_tokens=12, native=runner)
    assert base["tokens"] != native["tokens"]  # the adapter reached the program


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", "1,2,x"], "--prompt-ids: expected an integer"),
    (["--prompt-ids", "1,99999999"], "--prompt-ids: expected an integer"),
    (["--prompt-ids", "1,2", "--adapter", "/nonexistent.safetensors"], "nonexistent.safetensors"),
])
def test_bad_native_generate_inputs_are_one_error_line(runner, tiny_generation_program, args, message):
    done = subprocess.run([str(runner), "--program", str(tiny_generation_program), *args], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr
    assert done.stderr.startswith("prge-native-generate: error:")


def test_each_native_binary_refuses_the_other_kind_of_program(runner, native_binary, tiny_generation_program, program,
                                                              tmp_path):
    done = subprocess.run([str(runner), "--program", str(program), "--prompt-ids", "1,2"], capture_output=True, text=True)
    assert done.returncode == 2 and "not a generation program" in done.stderr
    done = subprocess.run([str(native_binary), "--program", str(tiny_generation_program), "--data", str(tmp_path / "d.bin"),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 2 and "a generation program" in done.stderr
