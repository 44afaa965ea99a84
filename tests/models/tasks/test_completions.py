"""Completion tasks: reading prompt/completion and chat rows, their targets, and the completion loss."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.tasks.completions import tokenize_completions
from models.tasks.folder import load_folder_spec, load_task
from models.tasks.readers import CompletionExample, read_examples
from models.tasks.spec import DataError, TaskSpec, load_task_spec
from prge.step import IGNORE_TARGET

SEQ_LEN = 16
PLAIN = TaskSpec("Review: {text}\n", {}, "completion")
# A minimal chat template (the tiny tokenizer has none): each turn is "<role>: content" + EOS.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _example(prompt: str, completion: str, line: int = 1) -> CompletionExample:
    return CompletionExample(prompt, completion, None, line)


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tok = tiny_tokenizer("llama")
    saved = tok.chat_template
    tok.chat_template = CHAT_TEMPLATE
    yield tok
    tok.chat_template = saved


def test_targets_are_the_completion_tokens_and_end_token_at_the_positions_before_them(tiny_tokenizer):
    tok = tiny_tokenizer("llama")
    split = tokenize_completions(tok, PLAIN, [_example("the movie was great", " and I loved it .")], SEQ_LEN, 8, "f.jsonl")
    prompt = tok.encode("Review: the movie was great\n", add_special_tokens=False)
    completion = tok.encode(" and I loved it .", add_special_tokens=False) + [tok.eos_token_id]
    row = prompt + completion
    assert split.input_ids[0, SEQ_LEN - len(row):].tolist() == row
    assert split.attention_mask[0].tolist() == [0] * (SEQ_LEN - len(row)) + [1] * len(row)
    targets = split.labels[0]
    scored = (targets != IGNORE_TARGET).nonzero().reshape(-1).tolist()
    # position p predicts token p + 1: the last prompt token predicts the first completion token
    assert scored == list(range(SEQ_LEN - len(completion) - 1, SEQ_LEN - 1))
    assert targets[scored].tolist() == completion
    assert split.prompts == [prompt] and split.references == [" and I loved it ."]


def test_long_prompts_lose_their_start_and_never_a_completion_token(tiny_tokenizer):
    tok = tiny_tokenizer("llama")
    long_prompt = "the movie was great and the music was fun and the story was good"
    split = tokenize_completions(tok, PLAIN, [_example(long_prompt, " and I loved it .")], SEQ_LEN, 8, "f.jsonl")
    completion = tok.encode(" and I loved it .", add_special_tokens=False) + [tok.eos_token_id]
    full = tok.encode(f"Review: {long_prompt}\n", add_special_tokens=False) + completion
    assert len(full) > SEQ_LEN and split.truncated == 1
    assert split.input_ids[0].tolist() == full[-SEQ_LEN:] and bool(split.attention_mask.all())
    assert split.labels[0][split.labels[0] != IGNORE_TARGET].tolist() == completion


@pytest.mark.parametrize("completion, completion_len, words", [
    (" and I loved it . and I loved it . and I loved it .", 32, "more than seq_len 16"),
    (" and I loved it .", 4, r"at most 4 per row \(--completion-len\)"),
])
def test_rows_that_cannot_be_scored_whole_name_their_line(tiny_tokenizer, completion, completion_len, words):
    with pytest.raises(DataError, match=words) as e:
        tokenize_completions(tiny_tokenizer("llama"), PLAIN,
                             [_example("the film was fun", " ."), _example("the end", completion, 7)],
                             SEQ_LEN, completion_len, "data/train.jsonl")
    assert str(e.value).startswith("data/train.jsonl:7:")


@pytest.mark.parametrize("rows, words", [
    ([{"prompt": "the end"}], 'train.jsonl:1: missing "completion"'),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "the end", "completion": "  "}], 'train.jsonl:2: "completion" is empty'),
    ([{"prompt": "the end", "completion": 3}], '"completion" must be a string'),
    ([{"text": "the end", "label": "positive"}], 'missing "prompt"'),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}],
     '"chat_template": true'),
])
def test_bad_completion_rows_are_refused_with_file_and_line(tmp_path, rows, words):
    with pytest.raises(DataError, match=words):
        read_examples(_write(tmp_path / "train.jsonl", rows), PLAIN)


def test_completion_rows_read_from_csv_with_the_line_each_record_starts_on(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('prompt,completion,extra\n"the end\nof it", and I loved it .,x\nthe film, and I hated it .,y\n',
                    encoding="utf-8")
    examples = read_examples(path, PLAIN)
    assert [(e.prompt, e.completion, e.line) for e in examples] == [
        ("the end\nof it", " and I loved it .", 2), ("the film", " and I hated it .", 4)]
    path.write_text("prompt,answer\nthe end,yes\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train.csv:1: header lacks column\(s\) completion"):
        read_examples(path, PLAIN)


@pytest.mark.parametrize("messages, words", [
    ([{"role": "user", "content": "hi"}], "must end with an assistant turn"),
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yes"}], "unknown role 'robot'"),
    ([{"role": "user", "content": ""}, {"role": "assistant", "content": "yes"}], r"messages\[0\].content\" is empty"),
    ("hi", "non-empty list"),
])
def test_bad_chats_are_refused_with_file_and_line(tmp_path, messages, words):
    chat = TaskSpec("{text}", {}, "completion", chat_template=True)
    with pytest.raises(DataError, match=f"train.jsonl:1: .*{words}"):
        read_examples(_write(tmp_path / "train.jsonl", [{"messages": messages}]), chat)


def test_chat_rows_score_every_assistant_turn_and_nothing_else(chat_tokenizer):
    chat = TaskSpec("{text}", {}, "completion", chat_template=True)
    turns = (("user", "the film was fun"), ("assistant", "and I loved it"), ("user", "the end"), ("assistant", "it was sad"))
    split = tokenize_completions(chat_tokenizer, chat, [CompletionExample(None, None, turns, 1)], 48, 16, "f.jsonl")
    ids = split.input_ids[0][split.attention_mask[0] == 1].tolist()
    targets = split.labels[0][split.attention_mask[0] == 1]
    scored_ids = targets[targets != IGNORE_TARGET].tolist()
    eos = chat_tokenizer.eos_token_id
    reply = [chat_tokenizer.encode(" " + t, add_special_tokens=False) + [eos] for t in ("and I loved it", "it was sad")]
    assert scored_ids == reply[0] + reply[1]
    assert chat_tokenizer.decode(ids) == ("user: the film was fun</s>assistant: and I loved it</s>"
                                          "user: the end</s>assistant: it was sad</s>").replace("</s>", chat_tokenizer.eos_token)
    # generation starts after the last assistant cue, and is judged against the last reply
    assert chat_tokenizer.decode(split.prompts[0]).endswith("user: the end" + chat_tokenizer.eos_token + "assistant:")
    assert split.references == ["it was sad"]


def test_a_completion_task_file_needs_no_labels_and_refuses_them(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"loss": "completion"}), encoding="utf-8")
    assert load_task_spec(path) == TaskSpec("{text}", {}, "completion")
    path.write_text(json.dumps({"loss": "completion", "labels": {"a": " yes", "b": " no"}}), encoding="utf-8")
    with pytest.raises(DataError, match="a completion task has no label words"):
        load_task_spec(path)


def test_a_labelled_task_cannot_take_the_completion_loss_or_back(tiny_data_dir, tiny_completion_data_dir):
    with pytest.raises(DataError, match="cannot take the other's loss"):
        load_folder_spec(tiny_data_dir, "completion")
    with pytest.raises(DataError, match="cannot take the other's loss"):
        load_folder_spec(tiny_completion_data_dir, "lm")


def _reference_loss(model, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row mean token cross-entropy, one scored position at a time, from Hugging Face's
    own logits of the unmodified model."""
    position_ids = torch.clamp(mask.cumsum(1) - 1, min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.double()
    losses = []
    for i in range(ids.shape[0]):
        terms = [-torch.log_softmax(logits[i, p], dim=-1)[targets[i, p]]
                 for p in range(ids.shape[1]) if targets[i, p] != IGNORE_TARGET]
        losses.append(sum(terms) / len(terms))
    return torch.stack(losses)


def test_completion_loss_equals_a_per_token_loop_over_hugging_face_logits(tiny_model_dir, tiny_tokenizer,
                                                                           tiny_completion_data_dir):
    from transformers import AutoModelForCausalLM

    from models.causal_lm import AdapterConfig, build_step

    tok = tiny_tokenizer("llama")
    task = load_task(load_folder_spec(tiny_completion_data_dir), tok, tiny_completion_data_dir, completion_len=8)
    split = task.split("train", SEQ_LEN, limit=6)
    step = build_step(tiny_model_dir("llama"), AdapterConfig(num_queries=2, rank=4, loss="completion", completion_len=8), [])
    with torch.no_grad():
        ours = step.per_example_loss(split.input_ids, split.attention_mask, split.labels).double()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32).eval()
    reference = _reference_loss(model, split.input_ids, split.attention_mask, split.labels)
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)
    # a scored position in the padding or prompt would change the numbers: masking is what keeps them equal
    with torch.no_grad():
        alone = [step.per_example_loss(split.input_ids[i:i + 1], split.attention_mask[i:i + 1], split.labels[i:i + 1])
                 for i in range(3)]
    assert torch.allclose(torch.cat(alone).double(), ours[:3], rtol=1e-5)


def test_padding_tokens_and_unscored_targets_do_not_change_the_loss(tiny_step, tiny_tokenizer, tiny_completion_data_dir):
    task = load_task(load_folder_spec(tiny_completion_data_dir), tiny_tokenizer("llama"), tiny_completion_data_dir, 8)
    split = task.split("train", SEQ_LEN, limit=4)
    step = tiny_step(loss="completion", completion_len=8)
    with torch.no_grad():
        before = step.per_example_loss(split.input_ids, split.attention_mask, split.labels)
        ids = split.input_ids.clone()
        ids[split.attention_mask == 0] = 7  # other padding ids
        after = step.per_example_loss(ids, split.attention_mask, split.labels)
        changed_completion = split.labels.clone()
        first = (changed_completion[0] != IGNORE_TARGET).nonzero()[0, 0]
        changed_completion[0, first] = (changed_completion[0, first] + 1) % 500
        moved = step.per_example_loss(split.input_ids, split.attention_mask, changed_completion)
    assert torch.equal(before, after)
    assert moved[0] != before[0] and torch.equal(moved[1:], before[1:])
