"""Completion tasks end to end: the exported program against eager, greedy decoding against
Hugging Face's generate, training through ExecuTorch, replay, and the benchmark's table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.causal_lm import AdapterConfig, build_step, load_tokenizer
from runtime_driver.commands.cli import main
from runtime_driver.engines import EagerPRGE, ExecuTorchPRGE
from runtime_driver.evaluate import greedy_completions, token_f1
from runtime_driver.run import RunConfig, program_task, run_training
from runtime_driver.train import TrainConfig

SEQ_LEN = 16
COMPLETION_LEN = 8  # conftest TINY_COMPLETION_LEN


def test_the_exported_completion_step_matches_eager(tiny_model_dir, tiny_completion_program, tiny_completion_data_dir):
    from runtime_driver.commands.compare import compare_engines

    result = compare_engines(tiny_model_dir("llama"), tiny_completion_program, tiny_completion_data_dir, steps=4,
                             lr=0.05, eps=1e-2, eval_examples=8)
    # measured: 1e-6 loss differences, adapters equal under teacher forcing
    assert result["max_loss_diff"] < 1e-4
    assert result["teacher_forced_ok"], result["teacher_forced_max_rel_diff"]
    free = result["free_running"]
    assert free["held_out_loss_eager"] == pytest.approx(free["held_out_loss_et"], rel=1e-4)


def test_greedy_decoding_equals_hugging_face_generate(tiny_model_dir, tiny_completion_program, tiny_completion_data_dir,
                                                      randomize_adapter):
    """The eager engine's greedy tokens equal HF generate on the model with the adapter merged
    into its weights, and the program's next_token_logits decode the same tokens."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from models.peft_io import save_peft_adapter

    model_dir = tiny_model_dir("llama")
    et = ExecuTorchPRGE(tiny_completion_program)
    adapter = AdapterConfig(num_queries=2, rank=4, loss="completion", completion_len=COMPLETION_LEN, targets=et.adapter.targets)
    step = build_step(model_dir, adapter, [])
    eager = EagerPRGE(step, model_dir, adapter, SEQ_LEN, eval_batch_size=8)
    flat = randomize_adapter(step, seed=3, scale=0.5)  # a trained-looking adapter: B = 0 would hide the LoRA path
    et.set_adapter(flat)
    task = program_task(et.program_dir, et.manifest, tiny_completion_data_dir)
    split = task.split("test", SEQ_LEN, limit=6)
    tok = task.tokenizer
    new_tokens = 4  # prompt + new tokens stay within seq_len: no window sliding, as in HF's generate
    assert max(len(p) for p in split.prompts) + new_tokens <= SEQ_LEN
    ours = greedy_completions(eager.next_token_logits, split.prompts, SEQ_LEN, tok.pad_token_id, set(), new_tokens, 8, False)
    program = greedy_completions(et.next_token_logits, split.prompts, SEQ_LEN, tok.pad_token_id, set(), new_tokens, 8, True)
    assert program == ours

    peft_dir = save_peft_adapter(Path(et.program_dir).parent / "peft-greedy", step.slots, flat, rank=4, alpha=adapter.alpha,
                                 a_seed=adapter.a_seed, targets=adapter.targets, base_model=str(model_dir))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
                                       str(peft_dir)).merge_and_unload().eval()
    for prompt, tokens in zip(split.prompts, ours):
        out = merged.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id)
        assert out[0, len(prompt):].tolist() == tokens


def test_token_f1_is_word_overlap():
    assert token_f1("T AY1 T AH0 N", "T AY1 T AH0 N") == 1.0
    assert token_f1("and I loved it", "and I hated it.") == pytest.approx(0.75)
    assert token_f1("", "x") == 0.0 and token_f1("", "") == 1.0


@pytest.fixture(scope="module")
def completion_run(tiny_completion_program, tiny_completion_data_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("completion-run") / "run"
    cfg = RunConfig(engine="executorch", program=str(tiny_completion_program), data=str(tiny_completion_data_dir), out=str(out),
                    eval_before=True,
                    train=TrainConfig(steps=40, batch_size=2, lr=0.2, eps=1e-2, eval_every=20, eval_examples=16,
                                      checkpoint_every=20, seed=1))
    return out, run_training(cfg, quiet=True, progress=lambda _: None)


def test_training_through_executorch_lowers_the_held_out_completion_loss(completion_run):
    run_dir, summary = completion_run
    before, after = summary["test_before"], summary["test"]
    assert set(after) == {"loss", "perplexity", "exact_match", "token_f1"}
    assert after["loss"] < before["loss"] - 0.1, (before, after)
    assert after["perplexity"] == pytest.approx(float(torch.tensor(after["loss"]).exp()), rel=1e-6)
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["type"] == "eval"] == [0, 20, 40]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_a_completion_run_replays_bit_for_bit(completion_run, capsys):
    run_dir, _ = completion_run
    assert main(["replay", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["identical"] is True


def test_bench_programs_sets_a_completion_step_beside_a_classification_one(tiny_program, tiny_completion_program):
    from runtime_driver.commands.bench import compare_programs

    rows = compare_programs([str(tiny_program("llama")), str(tiny_completion_program)], reps=1, warmup=0, rss=False)
    completion = rows[str(tiny_completion_program)]
    assert completion["train_step_ms"] > 0 and completion["step_overhead"] > 0


def test_eval_reports_completion_metrics_of_the_base_model(tiny_model_dir, tiny_completion_data_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir("llama")), "--data", str(tiny_completion_data_dir),
                 "--seq-len", str(SEQ_LEN), "--completion-len", str(COMPLETION_LEN), "--limit", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"loss", "perplexity", "exact_match", "token_f1"} <= set(result)


def test_generate_streams_the_trained_adapters_greedy_tokens(completion_run, tiny_completion_program, tiny_program, capsys):
    """`prge generate` decodes through the runtime with the run's PEFT adapter: the streamed text
    is the decoded greedy tokens of the program with that adapter set."""
    from models.peft_io import load_peft_adapter
    from models.tasks.prompts import prompt_text, prompt_token_ids
    from runtime_driver.generate import generate

    run_dir, _ = completion_run
    pieces: list[str] = []
    result = generate(tiny_completion_program, "the film was fun", run_dir / "adapter", on_text=pieces.append)
    et = ExecuTorchPRGE(tiny_completion_program)
    et.set_adapter(load_peft_adapter(run_dir / "adapter", et.slots, et.adapter.rank, et.adapter.a_seed))
    tok = load_tokenizer(tiny_completion_program)
    task = program_task(et.program_dir, et.manifest, Path("."))
    ids = prompt_token_ids(tok, prompt_text(tok, task.spec, "the film was fun"))
    expected = greedy_completions(et.next_token_logits, [ids], SEQ_LEN, tok.pad_token_id, {tok.eos_token_id},
                                  COMPLETION_LEN, 8, True)[0]
    assert result["tokens"] == expected and "".join(pieces) == result["text"] == tok.decode(expected, skip_special_tokens=True)

    assert main(["generate", "--program", str(tiny_completion_program), "--prompt", "the end", "--max-new-tokens", "2"]) == 0
    assert main(["generate", "--program", str(tiny_program("llama")), "--prompt", "the end"]) == 2
    assert "a label-word program cannot generate" in capsys.readouterr().err


def test_summarize_tables_completion_runs_with_their_own_metrics(completion_run, tmp_path):
    from runtime_driver.commands.summarize import summarize

    run_dir, summary = completion_run
    zero_shot = tmp_path / "zero-shot.json"
    zero_shot.write_text(json.dumps({"split": "test", "adapter": None, **summary["test_before"]}))
    table = summarize([str(zero_shot), str(run_dir)])
    assert table.splitlines()[0] == ("| run | method | q | b | steps | lr | eps | test loss | test ppl | exact match | "
                                     "token F1 | median ms/step | train wall s |")
    assert f"| {summary['test']['loss']:.3f} | {summary['test']['perplexity']:.2f} |" in table
    assert "Validation (step: loss):" in table
