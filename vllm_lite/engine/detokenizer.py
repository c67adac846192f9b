"""Incremental detokenization, batched: each step's new tokens of every sequence become text in
one ``decode_batch`` call of the Rust tokenizer (threads of its own on a many-core host), not
one Python-level decode per sequence.

Text is emitted only once it is complete: a token that ends in the middle of a multi-byte
character (decoded as U+FFFD) is held back until the next one completes it. A few prompt tokens
seed the decoder so leading-space rules come out right.

Per sequence the window is the tokens of its last emission plus the new ones (the algorithm of
``tokenizers``' ``DecodeStream``): the window is decoded, and what it adds to the text of the
last emission is the new text. The last emission's text is a cached one-token decode in the
common case (one token emitted), so a step costs one short decode per sequence. A slow (Python)
tokenizer, or one whose ``decode`` post-processes the Rust text (``clean_up_tokenization_spaces``
on a non-BPE model), decodes each window through ``tokenizer.decode``."""

from __future__ import annotations

import numpy as np

CONTEXT_TOKENS = 5  # prompt tokens that seed the decoder
REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


def _byte_level_alphabet() -> dict[int, int]:
    """GPT-2's byte-level BPE alphabet, for ``str.translate``: the code point that stands for
    each byte in a vocabulary string (printable Latin-1 bytes stand for themselves, the others
    for U+0100 on) -> that byte."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: b for b in keep}, **{256 + i: b for i, b in enumerate(shifted)}}


def _token_bytes(token: str, alphabet: dict[int, int]) -> bytes:
    """A vocabulary string's bytes (a character outside the alphabet stands for its UTF-8)."""
    try:
        return token.translate(alphabet).encode("latin-1")
    except UnicodeEncodeError:
        return b"".join(
            bytes([alphabet[ord(c)]]) if ord(c) in alphabet else c.encode() for c in token
        )


def rust_decode_is_exact(tokenizer) -> bool:
    """Whether ``tokenizer.decode`` returns exactly what its Rust tokenizer's ``decode`` does
    (transformers adds only the optional ``clean_up_tokenization`` pass, skipped for BPE)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        return False
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return True
    return type(backend.model).__name__ == "BPE" and not getattr(
        tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False
    )


class DetokenizerState:
    """One sequence's text so far. ``ids``: seed context + output tokens; ``ids[prefix:read]``
    (the last emission) decodes to ``prefix_len`` characters; ``ids[read:]`` are not emitted.

    The text is kept as the pieces each step emitted, joined when ``text`` is read: a batched
    step appends a few characters to hundreds of sequences, and re-copying each one's
    thousands of characters every time was the largest part of the step's Python."""

    __slots__ = ("ids", "prefix", "read", "prefix_len", "skip", "pieces")

    def __init__(self, context: list[int], context_len: int, skip: bool) -> None:
        self.ids, self.prefix, self.read, self.prefix_len = context, 0, len(context), context_len
        self.skip, self.pieces = skip, []

    @property
    def text(self) -> str:
        if len(self.pieces) > 1:
            self.pieces = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    @text.setter
    def text(self, value: str) -> None:
        self.pieces = [value]

    def tail(self, n: int) -> str:
        """The text's last ``n`` characters (or all of it), joining only the pieces they span."""
        pieces, k, size = self.pieces, len(self.pieces), 0
        while k > 0 and size < n:
            k -= 1
            size += len(pieces[k])
        return "".join(pieces[k:])[-n:] if n > 0 else ""


class BatchDetokenizer:
    def __init__(self, tokenizer, use_rust: bool | None = None) -> None:
        self.tokenizer = tokenizer
        if use_rust is None:
            use_rust = rust_decode_is_exact(tokenizer)
        self._rust = tokenizer._tokenizer if use_rust else None
        self._one = {True: {}, False: {}}  # skip_special_tokens -> {token id: its text alone}
        self._token_bytes: tuple | None = None  # (all tokens' bytes, the token of each) or ()
        self._stop_ends: dict[frozenset, frozenset | None] = {}

    def decode(self, ids: list[int], skip: bool) -> str:
        if self._rust is not None:
            return self._rust.decode(ids, skip_special_tokens=skip)
        return self.tokenizer.decode(ids, skip_special_tokens=skip)

    def decode_batch(self, windows: list[list[int]], skip: bool) -> list[str]:
        if self._rust is not None:
            return self._rust.decode_batch(windows, skip_special_tokens=skip)
        return [self.tokenizer.decode(w, skip_special_tokens=skip) for w in windows]

    def token_text(self, token_id: int, skip: bool = False) -> str:
        """One token decoded alone (cached: the vocabulary bounds it)."""
        cache = self._one[skip]
        text = cache.get(token_id)
        if text is None:
            text = cache[token_id] = self.decode([token_id], skip)
        return text

    def stop_candidates(self, stops: list[str]) -> frozenset | None:
        """The token ids whose text can end one of ``stops`` (the offline path skips decoding
        a step's tokens when none of them is one), or None: every token can (the tokenizer is
        not byte-level, or a stop string holds U+FFFD).

        For a byte-level BPE tokenizer the text is the UTF-8 decoding of its tokens' bytes, one
        after the other, so a stop string ends in a token's text only if that token holds the
        last byte of the stop string. Whether the vocabulary decodes that way is checked once,
        every token alone against its bytes (~0.1 s for 49k tokens on the CPU VM)."""
        last = frozenset(stop.encode()[-1] for stop in stops)
        if last not in self._stop_ends:
            if any(REPLACEMENT in stop for stop in stops) or not self._byte_level():
                self._stop_ends[last] = None
            else:
                data, owner = self._token_bytes
                found = owner[np.isin(data, list(last))]
                self._stop_ends[last] = frozenset(found.tolist())
        return self._stop_ends[last]

    def _byte_level(self) -> bool:
        """Whether every token decodes (alone) to the UTF-8 of its byte-level bytes; fills
        ``_token_bytes`` then."""
        if self._token_bytes is None:
            self._token_bytes = ()
            if self._rust is not None:
                alphabet, rust = _byte_level_alphabet(), self._rust
                ids = range(rust.get_vocab_size())
                tokens = [""] * len(ids)
                for token, i in rust.get_vocab(with_added_tokens=True).items():
                    if i < len(tokens):
                        tokens[i] = token
                pieces = [_token_bytes(token, alphabet) for token in tokens]
                texts = rust.decode_batch([[i] for i in ids], skip_special_tokens=False)
                if all(t == b.decode(errors="replace") for t, b in zip(texts, pieces)):
                    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
                    data = np.frombuffer(b"".join(pieces), dtype=np.uint8)
                    owner = np.repeat(np.arange(len(pieces), dtype=np.int32), lengths)
                    self._token_bytes = (data, owner)
        return bool(self._token_bytes)

    def new_state(
        self, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ) -> DetokenizerState:
        """Seeded with the prompt's last tokens; none where they end inside a character: the
        output's first token would complete a character that belongs to the prompt."""
        context = list(prompt_token_ids[-CONTEXT_TOKENS:])
        text = self.decode(context, skip_special_tokens) if context else ""
        if text.endswith(REPLACEMENT):
            context, text = [], ""
        return DetokenizerState(context, len(text), skip_special_tokens)

    def step(self, states: list[DetokenizerState]) -> list[str]:
        """The text each state's tokens appended since its last step complete ("" if none)."""
        texts = self._decode_windows(states)
        deltas = [""] * len(states)
        one, regroup = self._one, []
        for i, (s, full) in enumerate(zip(states, texts)):
            prefix_len = s.prefix_len
            if len(full) <= prefix_len or full[-1] == REPLACEMENT:
                continue
            delta = deltas[i] = full[prefix_len:]
            s.pieces.append(delta)
            ids = s.ids
            last = one[s.skip].get(ids[-1])  # token_text's cache, read inline (hundreds a step)
            if last is None:
                last = self.token_text(ids[-1], s.skip)
            if len(ids) - s.read == 1 or (last and REPLACEMENT not in last):
                # the next window starts at the last token: its text alone (a token that
                # decodes whole alone starts a character, so what follows decodes the same)
                s.prefix, s.read, s.prefix_len = len(ids) - 1, len(ids), len(last)
            else:
                s.prefix, s.read = s.read, len(ids)
                regroup.append(s)
        if regroup:  # several tokens emitted, the last not whole alone (a character
            # completed): the next window starts at the first, its text is theirs decoded
            for s, text in zip(regroup, self._decode_windows(regroup, end=True)):
                s.prefix_len = len(text)
        return deltas

    def _decode_windows(self, states: list[DetokenizerState], end: bool = False) -> list[str]:
        """``ids[prefix:]`` (or ``ids[prefix:read]``) of every state, one call per skip flag."""
        windows = [s.ids[s.prefix : s.read] if end else s.ids[s.prefix :] for s in states]
        skip = states[0].skip if states else True
        if all(s.skip is skip for s in states):
            return self.decode_batch(windows, skip)
        texts = [""] * len(states)
        for flag in (True, False):
            rows = [i for i, s in enumerate(states) if s.skip is flag]
            for i, text in zip(rows, self.decode_batch([windows[i] for i in rows], flag)):
                texts[i] = text
        return texts

    def flush(self, s: DetokenizerState) -> str:
        """At the end of a sequence: emit whatever was held back, complete or not."""
        if s.read == len(s.ids):
            return ""
        delta = self.decode(s.ids[s.prefix :], s.skip)[s.prefix_len :]
        s.prefix = s.read = len(s.ids)
        s.pieces.append(delta)
        return delta


class IncrementalDetokenizer:
    """One sequence's text token by token: ``add(token_id)`` returns the text that token
    completes (may be empty), ``flush()`` the rest at the end, ``text`` all of it. ``at_end``:
    nobody reads the text before the end; ``add`` only keeps the token and ``flush`` decodes
    the whole output in one call."""

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        use_stream: bool | None = None,
        at_end: bool = False,
    ) -> None:
        self.batch = BatchDetokenizer(tokenizer, use_rust=use_stream)
        self.state = self.batch.new_state(prompt_token_ids, skip_special_tokens)
        self.at_end = at_end

    @property
    def text(self) -> str:
        return self.state.text

    def add(self, token_id: int) -> str:
        self.state.ids.append(token_id)
        return "" if self.at_end else self.batch.step([self.state])[0]

    def flush(self) -> str:
        return self.batch.flush(self.state)
