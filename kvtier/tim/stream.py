"""The text of a token stream, one token at a time.

Decoding the whole generation at every token costs O(n) per token, O(n^2) over a long reasoning run; decoding
only the last few tokens is wrong for tokenizers whose pieces depend on their neighbours (a SentencePiece
word-start space, a character split across byte-level tokens). So each new token is decoded together with
the tokens since the last point where the text was complete, and only what that adds is returned: the
method text-generation servers use, written here for kvtier.
"""

from __future__ import annotations

from typing import Any


MAX_PENDING = 8  # tokens that never complete a character (a random model's bytes) are let through as U+FFFD


class Detokenizer:
    """`add(token_id)` returns the text the token adds ("" while a character is still incomplete)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._ids: list[int] = []  # tokens since `_prefix`, the start of the decode window
        self._read = 0  # tokens of the window whose text was already returned

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        before = self._decode(self._ids[:self._read])
        text = self._decode(self._ids)
        waiting = len(self._ids) - self._read
        if (text.endswith("\ufffd") or len(text) <= len(before)) and waiting <= MAX_PENDING:
            return ""  # a character split across tokens: its text comes with the token that completes it
        new = text[len(before):] if text.startswith(before) else text
        self._ids, self._read = self._ids[self._read:], waiting  # the read tokens stay as the next window's context
        return new

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
