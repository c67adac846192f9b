"""Incremental detokenization. Text is emitted only once it is complete: a token that ends in
the middle of a multi-byte character (decoded as U+FFFD) is held back until the next one
completes it. A few prompt tokens seed the decoder so leading-space rules come out right.

With a fast (Rust) tokenizer each token costs one ``tokenizers.decoders.DecodeStream.step``:
the same algorithm as below (decode the short window with and without the new token, emit the
difference), run in Rust on the tokenizer's own decoder. A slow (Python) tokenizer, or one whose
``decode`` post-processes the Rust text (``clean_up_tokenization_spaces`` on a non-BPE model),
takes the window algorithm through ``tokenizer.decode``."""
from __future__ import annotations

from tokenizers.decoders import DecodeStream

CONTEXT_TOKENS = 5  # prompt tokens that seed the decoder
REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


def rust_decode_is_exact(tokenizer) -> bool:
    """Whether ``tokenizer.decode`` returns exactly what its Rust tokenizer's ``decode`` does
    (transformers adds only the optional ``clean_up_tokenization`` pass, skipped for BPE)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        return False
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return True
    return (type(backend.model).__name__ == "BPE"
            and not getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                            False))


class IncrementalDetokenizer:
    """The text of one sequence's output, token by token: ``add(token_id)`` returns the text that
    token completes (may be empty), ``flush()`` the rest at the end, ``text`` all of it.

    ``at_end``: nobody reads the text before the sequence ends (an offline request without stop
    strings): ``add`` only keeps the token, and ``flush`` decodes the whole output in one call,
    ~6x cheaper per token than a decode step per token, and off the step loop's per-token path."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 use_stream: bool | None = None, at_end: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.at_end = at_end
        if use_stream is None:
            use_stream = rust_decode_is_exact(tokenizer)
        self._backend = tokenizer._tokenizer if use_stream else None
        self.window = self._context(list(prompt_token_ids[-CONTEXT_TOKENS:]))
        self.prefix_offset = 0
        self.read_offset = len(self.window)  # window[read_offset:]: tokens not yet emitted
        stream = use_stream and not at_end
        self._stream = DecodeStream(self.window, skip_special_tokens=skip_special_tokens) if stream else None
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _context(self, ids: list[int]) -> list[int]:
        """Prompt tokens to seed with; none where they end inside a character: the output's first
        token would complete a character that belongs to the prompt."""
        return [] if ids and self._decode(ids).endswith(REPLACEMENT) else ids

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (may be empty; always, ``at_end``)."""
        self.window.append(token_id)
        if self.at_end:
            return ""
        if self._stream is not None:
            delta = self._stream.step(self._backend, token_id)
            if delta is None:
                return ""
        else:
            prefix = self._decode(self.window[self.prefix_offset:self.read_offset])
            full = self._decode(self.window[self.prefix_offset:])
            if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
                return ""
            delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.window)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a sequence: emit whatever was held back, complete or not."""
        if self.read_offset == len(self.window):
            return ""
        prefix = self._decode(self.window[self.prefix_offset:self.read_offset])
        delta = self._decode(self.window[self.prefix_offset:])[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.window)
        self.text += delta
        return delta
