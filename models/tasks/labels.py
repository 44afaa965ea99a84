"""Label words as token ids, checked where they are scored: right after the prompt.

A label word is scored at the answer position, the prompt's last token, as the next token. So
what matters is how the tokenizer splits the prompt with the word appended: the prompt's own
tokens must stay as they are (no merge across the boundary) and the word must be exactly one
more token. A word's tokens on its own can differ from that (SentencePiece tokenizers mark a
word start with "▁" in context), so the id is taken from the prompt and word together.
"""
from __future__ import annotations

from models.tasks.prompts import prompt_text, prompt_token_ids
from models.tasks.spec import DataError, TaskSpec

# Any text: the check is about the template's end and the label word.
_SAMPLE_TEXT = "an example text"


def label_token_ids(tokenizer, task: TaskSpec) -> list[int]:
    """One token id per label word of `task`, as it follows a prompt rendered from the task's
    template; a word that is not exactly one token there is an error."""
    label_words = task.label_words
    prompt = prompt_text(tokenizer, task, _SAMPLE_TEXT)
    prompt_ids = prompt_token_ids(tokenizer, prompt, task.chat_template)
    ids = []
    for word in label_words:
        with_word = prompt_token_ids(tokenizer, prompt + word, task.chat_template)
        added = with_word[len(prompt_ids):]
        if with_word[: len(prompt_ids)] != prompt_ids or len(added) != 1:
            pieces = tokenizer.convert_ids_to_tokens(added if with_word[: len(prompt_ids)] == prompt_ids else with_word[-3:])
            raise DataError(
                f"label word {word!r} after the prompt {prompt[-20:]!r} is not one token of its own for this "
                f"tokenizer (it comes out as {pieces}); every label word must be a single token right "
                "after the prompt (try a leading space or another word)"
            )
        ids.append(added[0])
    if len(set(ids)) != len(ids):
        raise DataError(f"label words {label_words!r} map to the same token")
    return ids
