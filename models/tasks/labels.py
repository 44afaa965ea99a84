"""Label words as token ids: each label word must be exactly one token of the tokenizer."""
from __future__ import annotations

from models.tasks.spec import DataError


def label_token_ids(tokenizer, label_words: list[str]) -> list[int]:
    """One token id per label word; a word that is not exactly one token is an error."""
    ids = []
    for word in label_words:
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if len(tokens) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            raise DataError(
                f"label word {word!r} is {len(tokens)} tokens {pieces} for this tokenizer; "
                "every label word must be a single token (try a leading space or another word)"
            )
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise DataError(f"label words {label_words!r} map to the same token")
    return ids
