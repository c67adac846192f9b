"""Incremental detokenization. Text is emitted only once it is complete: a token that ends in
the middle of a multi-byte character (decoded as U+FFFD) is held back until the next one
completes it. A few prompt tokens seed the window so leading-space rules come out right."""
from __future__ import annotations

CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.window = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.window)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def flush(self) -> str:
        """At the end of a sequence: emit whatever was held back, complete or not."""
        prefix = self._decode(self.window[self.prefix_offset:self.read_offset])
        delta = self._decode(self.window[self.prefix_offset:])[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.window)
        self.text += delta
        return delta

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (may be empty)."""
        self.window.append(token_id)
        prefix = self._decode(self.window[self.prefix_offset:self.read_offset])
        full = self._decode(self.window[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.window)
        self.text += delta
        return delta
