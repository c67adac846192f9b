"""Structured outputs with vLLM's names: a request's output held to a JSON schema, any JSON
object, a regex, one of a list of strings, or an EBNF grammar, through xgrammar.

Each spec is compiled once for the engine's tokenizer (``StructuredOutputManager``: cached by
the spec's text) into a token-level automaton; every completion gets a ``GrammarMatcher`` of
its own, advanced with each token it accepts. Before a step samples, the matchers of its
constrained rows fill a bitmask of the tokens allowed next; the sampler sets every other logit
to -inf in those rows only. Stop tokens are allowed only where the grammar may end, and a
matcher that reaches its end finishes the request with "stop". A batch without grammars never
touches any of it.

Off the critical path (``advance_async``): as soon as a step's tokens are back from the device,
a worker thread advances its matchers and fills the next step's bitmask, while the engine's
thread schedules and launches the next forward pass (xgrammar's calls release the GIL). Only a
row the worker could not fill (a sequence new to the batch) is filled when the mask is taken.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch


def _xgr():
    import xgrammar  # imported on first use: a batch without grammars never loads it

    return xgrammar


@dataclass
class StructuredOutputsParams:
    """Exactly one of: ``json`` (a JSON schema, dict or text), ``json_object`` (any JSON
    object), ``regex``, ``choice`` (one of these strings) or ``grammar`` (EBNF, xgrammar's
    GBNF dialect). ``disable_any_whitespace``: JSON without free whitespace between tokens."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        self.validate()

    @property
    def key(self) -> tuple[str, str, bool]:
        """(kind, spec as text): what a compiled grammar is cached by."""
        if self.json is not None:
            spec = self.json if isinstance(self.json, str) else json.dumps(self.json)
            return "json", spec, self.disable_any_whitespace
        if self.json_object:
            return "json", '{"type": "object"}', self.disable_any_whitespace
        if self.regex is not None:
            return "regex", self.regex, False
        if self.choice is not None:
            # EBNF string literals take JSON's escapes (quotes, backslashes, \n, \uXXXX)
            return "grammar", "root ::= " + " | ".join(json.dumps(c) for c in self.choice), False
        return "grammar", self.grammar, False

    def validate(self) -> None:
        """ValueError naming the field and xgrammar's reason; runs before a request is queued."""
        given = [
            name
            for name in ("json", "regex", "choice", "grammar")
            if getattr(self, name) is not None
        ]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs needs exactly one of json, json_object, regex, choice, "
                f"grammar; got {given or 'none'}"
            )
        name = given[0]
        kinds = {
            "json": (str, dict),
            "regex": str,
            "choice": list,
            "grammar": str,
            "json_object": bool,
        }
        if not isinstance(getattr(self, name), kinds[name]):
            kind = type(getattr(self, name)).__name__
            raise ValueError(f"structured_outputs.{name} has the wrong type: {kind}")
        if name == "choice" and (
            not self.choice or any(not isinstance(c, str) or not c for c in self.choice)
        ):
            raise ValueError(
                "structured_outputs.choice must be a non-empty list of non-empty strings"
            )
        if name in ("regex", "grammar") and (
            not getattr(self, name) or "\x00" in getattr(self, name)
        ):
            raise ValueError(f"structured_outputs.{name} must be a non-empty string without NUL")
        kind, spec, _ = self.key
        try:
            _parse(kind, spec)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar raises RuntimeError
            what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar"}[kind]
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"structured_outputs.{name}: invalid {what}: {_clean(reason)}"
            ) from None


GuidedDecodingParams = StructuredOutputsParams  # vLLM's older name


def _clean(message: str) -> str:
    """xgrammar's messages start with '[time] /path/file.cc:line: '; the reason follows."""
    if message.startswith("[") and ".cc:" in message:
        message = message.split(": ", 1)[-1]
    return message


@functools.lru_cache(maxsize=256)
def _parse(kind: str, spec: str) -> None:
    """Parse a spec without a tokenizer (cheap): the front end's check. Cached by spec."""
    xgr = _xgr()
    if kind == "json":
        json.loads(spec)
        xgr.Grammar.from_json_schema(spec)
    elif kind == "regex":
        xgr.Grammar.from_regex(spec)
    else:
        xgr.Grammar.from_ebnf(spec)


# xgrammar 0.2.9 writes the characters of a string with minLength/maxLength as [^"\\\r\n]:
# control characters, which JSON forbids unescaped (json.loads refuses them), get through
_LENGTH_BOUNDED_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\r\n]"


def json_schema_grammar(schema: str, any_whitespace: bool):
    """xgrammar's grammar of a JSON schema, with string characters as JSON allows them."""
    xgr = _xgr()
    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=any_whitespace)
    text = str(grammar)
    if _LENGTH_BOUNDED_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LENGTH_BOUNDED_CHAR, _JSON_STRING_CHAR))


# what a matcher made of its token (``StructuredOutputManager.advance``)
ACCEPTED, ENDED, REFUSED_COMPLETE, REFUSED = range(4)


# CPython hands the GIL to a waiting thread only after this long. Its default, 5 ms, is longer
# than a decode step: the grammar worker, back from a GIL-free xgrammar call or the tokens'
# read-back, then waits for the engine's thread to block (on the mask) before it can go on, so
# its work follows the engine's host work instead of overlapping it. While the worker exists,
# the interval is at most this.
SWITCH_INTERVAL = 0.0002


class GrammarAdvance:
    """One step's matchers advanced on the worker thread: ``status`` (a Future of one code per
    row of ``rows``: ACCEPTED, ENDED (a stop token ended the grammar), REFUSED_COMPLETE,
    REFUSED), then ``mask`` (a Future of (host bitmask indexed by the step's rows, the set of
    rows filled: those whose matcher accepted and goes on))."""

    def __init__(self, rows: list[int], sampled_with: torch.Tensor) -> None:
        self.rows = rows
        self.sampled_with = sampled_with  # the host bitmask the step's tokens were drawn under
        self.status: Future = Future()
        self.mask: Future = Future()

    def verdicts(self, token_ids: list[int], stop_token_ids: frozenset) -> dict[int, int]:
        """Row -> status code, for the rows whose verdict is not ACCEPTED. A token its mask
        allowed is one its matcher accepts, so only a stop token (did the grammar end?) or a
        token outside the mask (refused: rare) waits for the worker; the engine's thread goes
        on while the worker still accepts the others."""
        rows = self.rows
        tokens = np.array([token_ids[r] for r in rows], dtype=np.int64)
        mask = self.sampled_with.numpy()
        words = np.minimum(tokens >> 5, mask.shape[1] - 1)
        allowed = (mask[rows, words] >> (tokens & 31)) & 1 == 1
        allowed &= tokens < 32 * mask.shape[1]
        if allowed.all() and not stop_token_ids.intersection(tokens.tolist()):
            return {}
        return {r: code for r, code in zip(rows, self.status.result()) if code != ACCEPTED}


class StructuredOutputManager:
    """The engine's compiler (one per tokenizer, its grammars cached by spec) and the step's
    bitmask: one row per sampling row of the batch, filled for the constrained rows only. The
    matchers are touched by one thread at a time: the worker's job, else the caller's thread
    once the worker's last job is done (``_idle``)."""

    def __init__(
        self, tokenizer, vocab_size: int, stop_token_ids: set[int], max_threads: int = 8
    ) -> None:
        xgr = _xgr()
        max_threads = max(1, min(max_threads, os.cpu_count() or 1))
        self.vocab_size = vocab_size
        self.stop_token_ids = frozenset(stop_token_ids)  # only these end a grammar
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=True)
        # one thread fills a step's bitmask faster than several (256 rows: 0.38 ms vs 1.20 on 8
        # threads of an H200's 16-core host, 2026-12-03; benchmarks/bench_grammar.py)
        self.batch_matcher = xgr.BatchGrammarMatcher(1)
        self.grammars: dict[tuple, object] = {}  # key -> CompiledGrammar
        self.compile_seconds: dict[tuple, float] = {}  # key -> seconds its first compile took
        # host bitmasks: [0] the step's (filled when taken), [1] and [2] the worker's (filled
        # ahead, in turns: the engine's thread still reads the last one while the worker fills)
        self._host = [torch.empty((0, 0), dtype=torch.int32) for _ in range(3)]
        self._turn = 1
        self._worker: ThreadPoolExecutor | None = None  # made on the first advance_async
        self._filler = xgr.BatchGrammarMatcher(1)  # the worker's
        self._last: GrammarAdvance | None = None  # the worker's last job

    def warm_up(self, device: torch.device, dtype: torch.dtype, max_rows: int) -> None:
        """What a first constrained ``generate`` would pay, paid when the manager is made: host
        bitmasks for a full batch (pinned), and on CUDA every variant of xgrammar's mask
        kernel a step can pick. Triton compiles one per row-count class (1, a multiple of 16,
        other) and for all rows or some. Before this warm-up the first timed json_schema run
        took 1.54 s against 1.30 and 1.42 for the next two, after it 1.33 against 1.23 and 1.28
        (H200): part of that first-run cost, not all of it."""
        rows = max(max_rows, 17)
        for which in range(len(self._host)):
            self._buffer(which, rows)
        if device.type != "cuda":
            return
        words = self._host[0].shape[1]
        logits = torch.zeros((17, self.vocab_size), dtype=dtype, device=device)
        mask = torch.full((17, words), -1, dtype=torch.int32, device=device)  # all allowed
        for n in (1, 16, 17):
            apply_bitmask(logits[:n], mask[:n], None)
            apply_bitmask(logits, mask, torch.arange(n, dtype=torch.int32, device=device))
        torch.cuda.synchronize(device)

    def compiled(self, params: StructuredOutputsParams):
        key = params.key
        grammar = self.grammars.get(key)
        if grammar is None:
            kind, spec, compact = key
            start = time.perf_counter()
            if kind == "json":
                grammar = self.compiler.compile_grammar(json_schema_grammar(spec, not compact))
            elif kind == "regex":
                grammar = self.compiler.compile_regex(spec)
            else:
                grammar = self.compiler.compile_grammar(spec)
            self.grammars[key] = grammar
            self.compile_seconds[key] = time.perf_counter() - start
        return grammar

    def matcher(self, params: StructuredOutputsParams):
        """A fresh matcher of ``params``' grammar: one per completion."""
        return _xgr().GrammarMatcher(self.compiled(params))

    def advance(self, matchers: list, token_ids: list[int]) -> list[int]:
        """Advance each matcher by its token (one batched call); a status code per matcher."""
        self._idle()
        return self._advance(matchers, token_ids)

    def _advance(self, matchers: list, token_ids: list[int]) -> list[int]:
        ok = _accept_tokens(matchers, token_ids)
        codes = [ACCEPTED] * len(matchers)
        stops = self.stop_token_ids  # a matcher ends only on a stop token: ask only those
        for i in [i for i, t in enumerate(token_ids) if t in stops]:
            codes[i] = ENDED if matchers[i].is_terminated() else ACCEPTED
        if ok is not None:  # some refused (rare: a token sampled outside its mask)
            for i in [i for i, good in enumerate(ok) if not good]:
                codes[i] = REFUSED_COMPLETE if matchers[i].is_completed() else REFUSED
        return codes

    def advance_async(
        self, matchers: list, rows: list[int], num_rows: int, token_ids, sampled_with
    ) -> GrammarAdvance:
        """On the worker thread: wait for ``token_ids()`` (the step's tokens, read back, drawn
        under the host bitmask ``sampled_with``), advance ``matchers[i]`` (the step's row
        ``rows[i]``) by its token, then fill the next bitmask of every matcher that goes on, at
        its row, in a buffer of ``num_rows`` rows."""
        job = GrammarAdvance(rows, sampled_with)
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="vllm-lite-grammar")
            self._switch = sys.getswitchinterval()
            sys.setswitchinterval(min(self._switch, SWITCH_INTERVAL))
        self._turn = 3 - self._turn
        self._worker.submit(self._advance_job, job, matchers, token_ids, num_rows, self._turn)
        self._last = job
        return job

    def _advance_job(self, job: GrammarAdvance, matchers, token_ids, num_rows, buffer) -> None:
        """Advance every matcher (one batched call), publish the verdicts (the engine's thread
        reads them while the fill runs), then fill the rows that go on. One call each: splitting
        the rows over several threads was slower (``benchmarks/bench_grammar.py``: on an H200's
        host 4.3 ms a step in 8 parts, 1.6 in 2, against 1.0 + 0.4 for the two calls)."""
        try:
            tokens = token_ids()
            status = self._advance(matchers, [tokens[r] for r in job.rows])
            job.status.set_result(status)
            host, rows = self._buffer(buffer, num_rows), job.rows
            if max(status, default=ACCEPTED) != ACCEPTED:  # (rare) some ended or were refused
                live = [j for j, code in enumerate(status) if code == ACCEPTED]
                matchers, rows = [matchers[j] for j in live], [rows[j] for j in live]
            self._filler.batch_fill_next_token_bitmask(matchers, host, rows)
            job.mask.set_result((host, set(rows)))
        except BaseException as exc:  # the engine's thread raises it when it waits
            if not job.status.done():
                job.status.set_exception(exc)
            job.mask.set_exception(exc)

    def _idle(self) -> None:
        """Wait until the worker touches no matcher (its last job done, errors raised there)."""
        if self._last is not None:
            self._last.mask.exception()
            self._last = None

    def _buffer(self, which: int, num_rows: int) -> torch.Tensor:
        if self._host[which].shape[0] < num_rows:
            host = _xgr().allocate_token_bitmask(
                max(num_rows, 2 * self._host[which].shape[0]), self.vocab_size
            )
            self._host[which] = host.pin_memory() if torch.cuda.is_available() else host
        return self._host[which][:num_rows]

    def bitmask(
        self,
        matchers: list,
        rows: list[int],
        num_rows: int,
        ahead: tuple[GrammarAdvance, list[int]] | None = None,
    ) -> torch.Tensor:
        """[num_rows, ceil(vocab / 32)] int32 on the host: row ``rows[i]`` allows the tokens
        ``matchers[i]`` accepts next (other rows are not filled: the sampler skips them).
        ``ahead``: (the previous step's ``advance_async``, each row's row in that step or -1);
        the rows it filled are taken from it, the others filled here. Pinned on CUDA: the copy
        to the device need not wait for the step in flight."""
        if ahead is not None:
            ahead_host, filled = ahead[0].mask.result()
            self._last = None if self._last is ahead[0] else self._last
            before = ahead[1]
            if before == rows and num_rows == len(ahead_host) and filled.issuperset(rows):
                host = ahead_host  # the same rows as the step before, all filled there
            else:
                host = self._buffer(0, num_rows)
                take = [i for i, j in enumerate(before) if j in filled]
                if take:  # numpy: torch's CPU index_put took 4.3 ms for 256 rows, this 0.14
                    host.numpy()[[rows[i] for i in take]] = ahead_host.numpy()[
                        [before[i] for i in take]
                    ]
                taken = set(take)
                rest = [i for i in range(len(rows)) if i not in taken]
                self.batch_matcher.batch_fill_next_token_bitmask(
                    [matchers[i] for i in rest], host, [rows[i] for i in rest]
                )
        else:
            self._idle()
            host = self._buffer(0, num_rows)
            self.batch_matcher.batch_fill_next_token_bitmask(matchers, host, rows)
        return host

    def close(self) -> None:
        """Stop the worker thread (after its last job); the switch interval is as before it."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
            sys.setswitchinterval(self._switch)


def _accept_tokens(matchers: list, token_ids: list[int]) -> list | None:
    """Each matcher takes its token, in one GIL-free call; None when all accepted, else a
    verdict per matcher. xgrammar's ``BatchGrammarMatcher.batch_accept_token`` turns its
    result into a list one FFI item at a time, ~1 us each on the GIL (44,000 a benchmark run);
    its core call's array answers "any refused?" in one call, and is read whole only then."""
    from xgrammar.base import _core

    ok = _core.BatchGrammarMatcher.batch_accept_token(
        [m._handle for m in matchers], token_ids, False
    )
    if len(ok) != len(matchers):
        raise RuntimeError(f"xgrammar accepted {len(ok)} tokens for {len(matchers)} matchers")
    return None if 0 not in ok else [bool(good) for good in ok[:]]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows) -> None:
    """-inf in place at every token a grammar forbids, in ``rows`` (a list, a tensor on the
    logits' device, or None: all rows)."""
    _xgr().apply_token_bitmask_inplace(logits, bitmask, indices=rows)
