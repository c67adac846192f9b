"""Token ids to what a user reads (vLLM's output processor): the engine core reports each step as
flat lists of token ids (``CoreOutputs``); this side owns the text (one batched decode per
step for every request that needs it), stop strings, logprob dicts and finished outputs.

A stop string is found here, after the core has already scheduled the request's next step or
two: the request is reported in ``ProcessedStep.stops`` for the caller to stop in the core,
and tokens the core reports after it are dropped, so the text and token ids end exactly where
a stop check inside the core would have ended them (vLLM's rule: the first stop string, in the
given order, that ends inside a token's text; not within the first ``min_tokens`` tokens).
Offline, where only stop strings read the text before the end, a completion's new tokens are
decoded only when one of them can end a stop string (``_must_decode``).

The offline ``LLMEngine.step`` runs it in-process and returns finished ``RequestOutput``s; the
server's ``AsyncLLM`` runs it on its event loop (``stream=True``) and gets one ``RequestDelta``
per request that changed, its text held back by ``len(longest stop string) - 1`` characters
while it runs (a stop string may begin in text already decoded)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vllm_lite.engine.detokenizer import BatchDetokenizer, DetokenizerState
from vllm_lite.sampling_params import SamplingParams
from vllm_lite.worker.logprobs import FlatLogprobs


@dataclass
class CoreOutputs:
    """One engine-core step, token ids only, as flat lists (one cheap message for all requests).
    Row i: completion ``indexes[i]`` of request ``req_ids[i]`` accepted ``token_ids[i]`` (-1: no
    token, it only finished: an abort)."""

    req_ids: list[str] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finished: list[tuple[int, str, int | None]] = field(
        default_factory=list
    )  # (row, reason, stop id)
    # (request id, completion index, its tokens): several tokens at once, ahead of the rows (the
    # offline engine hands over a completion's tokens only when its text is needed)
    token_lists: list[tuple[str, int, list[int]]] = field(default_factory=list)
    logprobs: list[tuple[int, tuple]] = field(
        default_factory=list
    )  # (row, (lp, rank, top lps, top ids))
    prompt_logprobs: list[tuple[str, FlatLogprobs]] = field(
        default_factory=list
    )  # once, when scored
    num_cached_tokens: list[tuple[str, int]] = field(
        default_factory=list
    )  # at a request's first token

    def __reduce__(self):  # pickled as its lists
        return CoreOutputs, (
            self.req_ids,
            self.indexes,
            self.token_ids,
            self.finished,
            self.token_lists,
            self.logprobs,
            self.prompt_logprobs,
            self.num_cached_tokens,
        )

    def add(self, request_id: str, index: int, token_id: int) -> int:
        self.req_ids.append(request_id)
        self.indexes.append(index)
        self.token_ids.append(token_id)
        return len(self.token_ids) - 1


@dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # sum of the tokens' logprobs, when logprobs were asked
    logprobs: FlatLogprobs | None = (
        None  # per token {token id: Logprob}: the sampled and the top-k tokens
    )
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: FlatLogprobs | None = None  # the same per prompt token, None for the first
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int | None = (
        None  # prompt tokens found in the prefix cache when first scheduled
    )


@dataclass
class CompletionDelta:
    """What one of a request's n completions gained since the last delta."""

    index: int
    token_ids: list[int]  # newly accepted output token ids
    text: str  # newly decoded text
    logprobs: list[dict] | None = None  # per new token {token id: Logprob}, when the request asked
    finish_reason: str | None = None  # set once, on the completion's last delta
    stop_reason: int | str | None = None


@dataclass
class RequestDelta:
    request_id: str
    outputs: list[CompletionDelta]
    finished: bool  # all the request's completions are done; the stream ends after this one
    prompt_logprobs: list | None = None  # once, when the request asked and its prompt is scored
    num_cached_tokens: int = (
        0  # prompt tokens found in the prefix cache (known once it is scheduled)
    )
    num_new_tokens: int = 0  # output tokens in this delta, all completions together


def merge_deltas(a: RequestDelta, b: RequestDelta) -> RequestDelta:
    """``a`` then ``b`` as one delta (per completion: tokens, text and logprobs concatenated)."""
    outputs = {
        c.index: CompletionDelta(
            c.index,
            list(c.token_ids),
            c.text,
            list(c.logprobs) if c.logprobs is not None else None,
            c.finish_reason,
            c.stop_reason,
        )
        for c in a.outputs
    }
    for c in b.outputs:
        prev = outputs.get(c.index)
        if prev is None:
            outputs[c.index] = c
            continue
        prev.token_ids += c.token_ids
        prev.text += c.text
        if c.logprobs is not None:
            prev.logprobs = (prev.logprobs or []) + c.logprobs
        prev.finish_reason, prev.stop_reason = c.finish_reason, c.stop_reason
    return RequestDelta(
        a.request_id,
        [outputs[i] for i in sorted(outputs)],
        b.finished,
        a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
        b.num_cached_tokens,
        a.num_new_tokens + b.num_new_tokens,
    )


class _Completion:
    __slots__ = (
        "index",
        "token_ids",
        "detok",
        "logprobs",
        "cumulative_logprob",
        "finish_reason",
        "stop_reason",
        "sent_tokens",
        "sent_text",
        "unchecked",
    )

    def __init__(self, index: int, detok: DetokenizerState | None, wants_logprobs: bool) -> None:
        self.index, self.token_ids, self.detok = index, [], detok
        self.unchecked = 0  # the last tokens, not decoded: none of them can end a stop string
        self.logprobs = FlatLogprobs() if wants_logprobs else None
        self.cumulative_logprob = 0.0
        self.finish_reason = self.stop_reason = None
        self.sent_tokens = self.sent_text = 0


class _Request:
    __slots__ = (
        "request_id",
        "prompt",
        "prompt_token_ids",
        "params",
        "completions",
        "prompt_logprobs",
        "num_cached_tokens",
        "stop_strings",
        "longest_stop",
        "holdback",
        "per_token",
        "stop_ends",
        "arrival",
        "first_token_time",
        "last_token_time",
    )

    def __init__(self, request_id, prompt, prompt_token_ids, params, arrival) -> None:
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.params, self.arrival = params, arrival
        self.completions: list[_Completion] = []
        self.prompt_logprobs: FlatLogprobs | None = None
        self.num_cached_tokens = 0
        self.stop_strings = params.stop_strings  # a property: read once, not per token
        self.longest_stop = max((len(s) for s in self.stop_strings), default=0)
        stops = self.stop_strings if not params.include_stop_str_in_output else []
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.per_token = False
        self.stop_ends = None  # BatchDetokenizer.stop_candidates: tokens that can end a stop
        self.first_token_time = self.last_token_time = None


def _snapshot(s: DetokenizerState) -> tuple:
    """What ``OutputProcessor._replay`` needs to decode a completion's new tokens again: its
    number of ids and its detokenizer's window (prefix, read, prefix_len) before them. (A
    completion read per token always has a detokenizer: ``add_request`` sets ``per_token``
    only then.)"""
    return (len(s.ids), s.prefix, s.read, s.prefix_len)


@dataclass
class ProcessedStep:
    finished: list[RequestOutput]  # requests whose completions all ended (stream=False)
    deltas: list[RequestDelta]  # per request that changed (stream=True)
    # (request id, completion index) that a stop string ended: the caller stops them in the core
    stops: list[tuple[str, int]]


class OutputProcessor:
    def __init__(self, tokenizer, stream: bool = False, metrics=None) -> None:
        """``stream``: every step's text is read (a server); otherwise a request without stop
        strings gets its text decoded once, when it ends. ``metrics``: a server's
        ``ServerMetrics``, told of each request's tokens (stream only; needs arrival times)."""
        self.tokenizer, self.stream, self.metrics = tokenizer, stream, metrics
        self.detokenizer = BatchDetokenizer(tokenizer) if tokenizer is not None else None
        self.requests: dict[str, _Request] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival: float | None = None,
    ) -> None:
        req = _Request(request_id, prompt, prompt_token_ids, params, arrival)
        detok = params.detokenize and self.detokenizer is not None
        req.per_token = detok and (self.stream or bool(params.stop_strings))
        if req.per_token and not self.stream:  # text only for the stop strings: decoded lazily
            req.stop_ends = self.detokenizer.stop_candidates(req.stop_strings)
        for i in range(params.n):
            state = (
                self.detokenizer.new_state(prompt_token_ids, params.skip_special_tokens)
                if detok
                else None
            )
            req.completions.append(_Completion(i, state, params.logprobs is not None))
        self.requests[request_id] = req

    def abort_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def process(self, core: CoreOutputs) -> ProcessedStep:
        requests, changed = self.requests, {}
        for request_id, flat in core.prompt_logprobs:
            req = requests.get(request_id)
            if req is not None:
                if self.detokenizer is not None and req.params.detokenize:
                    flat.texts = [self.detokenizer.token_text(t) for t in flat.token_ids]
                req.prompt_logprobs = flat
        for request_id, num in core.num_cached_tokens:
            req = requests.get(request_id)
            if req is not None:
                req.num_cached_tokens = num
        # the completions whose text is read per token (stop strings, streaming) and this step
        # extends: id -> (request, completion, its token count before, its text's state before)
        watched: dict[int, tuple] = {}
        for request_id, index, tokens in core.token_lists:  # several tokens of one completion
            req = requests.get(request_id)
            if req is None:
                continue
            c = req.completions[index]
            if c.finish_reason is not None:
                continue
            if req.per_token and id(c) not in watched:
                self._watch(watched, req, c, tokens)
            changed[request_id] = req
            c.token_ids += tokens
            if c.detok is not None:
                c.detok.ids += tokens
        logprobs = dict(core.logprobs) if core.logprobs else None
        for row, (request_id, index, token_id) in enumerate(
            zip(core.req_ids, core.indexes, core.token_ids)
        ):
            req = requests.get(request_id)
            if req is None:
                continue
            c = req.completions[index]
            if c.finish_reason is not None:  # a stop string ended it: the core ran on for a step
                continue
            changed[request_id] = req
            if token_id >= 0:
                if req.per_token and id(c) not in watched:
                    self._watch(watched, req, c, (token_id,))
                c.token_ids.append(token_id)
                if logprobs is not None and row in logprobs:
                    self._add_logprobs(c, token_id, req.params.logprobs, *logprobs[row])
                if c.detok is not None:
                    c.detok.ids.append(token_id)
        for row, reason, stop_id in core.finished:
            req = requests.get(core.req_ids[row])
            c = req.completions[core.indexes[row]] if req is not None else None
            if c is None or c.finish_reason is not None:
                continue
            c.finish_reason, c.stop_reason = reason, stop_id
            if (
                stop_id is not None
                and c.detok is not None
                and not req.params.include_stop_str_in_output
            ):
                c.detok.ids.pop()  # a stop token's text only with include_stop_str_in_output
        stops = self._detokenize(list(watched.values()))
        finished, deltas = [], []
        self._now = time.monotonic()  # system-wide on Linux: comparable with the arrival times
        self._intervals, self._generated = {}, 0  # recorded once per step (_record)
        for req in changed.values() if self.stream else self._ended(changed, core, stops):
            for c in req.completions:
                # ended: what was held back (a stop string cut the text already)
                if (
                    c.finish_reason is not None
                    and c.detok is not None
                    and not isinstance(c.stop_reason, str)
                ):
                    self.detokenizer.flush(c.detok)
            done = all(c.finish_reason is not None for c in req.completions)
            if done:
                del requests[req.request_id]
            if self.stream:
                delta = self._delta(req, done)
                if delta is not None:
                    deltas.append(delta)
            elif done:
                finished.append(self._output(req))
        if self.metrics is not None:
            if self._generated:
                self.metrics.generated(self._generated)
            for seconds, count in self._intervals.items():
                self.metrics.inter_tokens(seconds, count)
        return ProcessedStep(finished, deltas, stops)

    def _watch(self, watched: dict, req: _Request, c: _Completion, tokens) -> None:
        """``c`` into this step's ``watched`` (before its new ``tokens`` are added), unless
        they need no decode yet."""
        if self._must_decode(req, c, tokens):
            watched[id(c)] = (req, c, len(c.token_ids), _snapshot(c.detok))

    @staticmethod
    def _must_decode(req: _Request, c: _Completion, tokens) -> bool:
        """Whether ``c``'s text must be decoded with ``tokens``: it is read per token, unless
        only stop strings read it (offline) and neither these tokens nor the text held back
        from earlier ones (a character left unfinished) can end one. Tokens left undecoded are
        decoded with the next that must be, or at the end."""
        ends = req.stop_ends
        if ends is None:
            return True
        s = c.detok
        if len(s.ids) - s.read > c.unchecked or not ends.isdisjoint(tokens):
            c.unchecked = 0
            return True
        c.unchecked += len(tokens)
        return False

    @staticmethod
    def _ended(changed: dict[str, _Request], core: CoreOutputs, stops: list) -> list[_Request]:
        """The changed requests with a completion that ended this step, in ``changed``'s order:
        without a stream, nobody reads a request before it ends."""
        if not core.finished and not stops:
            return []
        ended = {core.req_ids[row] for row, _, _ in core.finished}
        ended.update(request_id for request_id, _ in stops)
        return [req for request_id, req in changed.items() if request_id in ended]

    def _detokenize(self, watched: list[tuple]) -> list[tuple[str, int]]:
        """The new text of every watched completion in one batched decode, then the stop
        strings. Several new tokens of a completion with stop strings are checked together; a
        possible match there is replayed token by token, so the text ends where a check after
        every token would have ended it. Returns the completions a stop string ended."""
        if not watched:
            return []
        stops = []
        deltas = self.detokenizer.step([c.detok for _, c, _, _ in watched])
        for (req, c, num_before, snap), delta in zip(watched, deltas):
            if not (delta and req.stop_strings and len(c.token_ids) > req.params.min_tokens):
                continue
            # tokens of earlier steps whose text was held back (it ended inside a character)
            # are checked again with the new ones: a stop string may end in one of them
            ids_before, prefix, read, prefix_len = snap
            held = ids_before - read
            if len(c.token_ids) - num_before + held == 1:
                if not isinstance(c.stop_reason, int):  # a stop token's text never ends one
                    self._check_stop_strings(req, c, delta, stops)
            elif self._find_stop(req, c.detok, delta) is not None:
                text_len = len(c.detok.text) - len(delta)  # before this step's
                window = (prefix, read, prefix_len)
                self._replay(req, c, num_before - held, window, text_len, stops)
        return stops

    @staticmethod
    def _find_stop(req: _Request, s: DetokenizerState, delta: str) -> tuple[str, int] | None:
        """The first stop string (in the given order) that ends in ``delta``, the text's newest
        characters, and where it begins (counted from the text's end, negative). Only one whose
        last character is in ``delta`` can; only the text from ``len(stop) - 1`` characters
        before ``delta`` on is read (the text grows to thousands of characters)."""
        window = None
        for stop in req.stop_strings:
            if stop[-1] not in delta:
                continue
            if window is None:
                window = s.tail(len(delta) + req.longest_stop - 1)
            at = window.find(stop, max(0, len(window) - len(delta) - len(stop) + 1))
            if at >= 0:
                return stop, at - len(window)
        return None

    def _replay(
        self,
        req: _Request,
        c: _Completion,
        num_before: int,
        window: tuple[int, int, int],
        text_len: int,
        stops: list,
    ) -> None:
        """Decode ``c``'s tokens after its first ``num_before`` again, one at a time, checking
        the stop strings after each: from its detokenizer's ``window`` (prefix, read,
        prefix_len) and the first ``text_len`` characters of its text before them."""
        s = c.detok
        s.prefix, s.read, s.prefix_len = window
        new_ids = s.ids[s.read :]
        del s.ids[s.read :]
        s.text = s.text[:text_len]
        stop_token_kept = isinstance(c.stop_reason, int) and req.params.include_stop_str_in_output
        last = len(new_ids) - 1 if stop_token_kept else -1  # its text ends no stop string
        for j, token_id in enumerate(new_ids):
            s.ids.append(token_id)
            delta = self.detokenizer.step([s])[0]
            if (
                delta
                and j != last
                and num_before + j + 1 > req.params.min_tokens
                and self._check_stop_strings(req, c, delta, stops)
            ):
                del c.token_ids[num_before + j + 1 :]  # tokens after the one that ended it are void
                return

    def _check_stop_strings(self, req: _Request, c: _Completion, delta: str, stops: list) -> bool:
        """A stop string that ends in ``delta`` (the text the last token completed) ends ``c``:
        its text is cut there."""
        found = self._find_stop(req, c.detok, delta)
        if found is None:
            return False
        stop, at = found
        text = c.detok.text
        end = len(text) + at + (len(stop) if req.params.include_stop_str_in_output else 0)
        c.detok.text = text[:end]
        if c.finish_reason is None:  # the core has not ended it on its own (length)
            stops.append((req.request_id, c.index))
        c.finish_reason, c.stop_reason = "stop", stop
        return True

    # ---- building outputs -------------------------------------------------------------------
    def _delta(self, req: _Request, done: bool) -> RequestDelta | None:
        outputs, num_new = [], 0
        for c in req.completions:
            if c.sent_tokens < 0:  # its last delta went out already
                continue
            ended = c.finish_reason is not None
            new_ids = c.token_ids[c.sent_tokens :]
            text = c.detok.text if c.detok is not None else ""
            visible = len(text) if ended else max(c.sent_text, len(text) - req.holdback)
            new_text = text[c.sent_text : visible]
            if not new_ids and not new_text and not ended:
                continue
            lps = c.logprobs[c.sent_tokens : len(c.token_ids)] if c.logprobs is not None else None
            outputs.append(
                CompletionDelta(c.index, new_ids, new_text, lps, c.finish_reason, c.stop_reason)
            )
            num_new += len(new_ids)
            c.sent_tokens, c.sent_text = (-1 if ended else len(c.token_ids)), visible
        prompt_logprobs = None
        if req.prompt_logprobs is not None and (outputs or done):
            prompt_logprobs, req.prompt_logprobs = list(req.prompt_logprobs), None
        if not outputs and not done and prompt_logprobs is None:
            return None
        if self.metrics is not None:
            self._record(req, num_new, done)
        return RequestDelta(
            req.request_id, outputs, done, prompt_logprobs, req.num_cached_tokens, num_new
        )

    def _record(self, req: _Request, num_new: int, done: bool) -> None:
        """A request's latencies; its tokens and inter-token intervals are summed over the step
        (a step's requests mostly share their last step: one interval, one histogram call)."""
        now, metrics = self._now, self.metrics
        if num_new:
            if req.first_token_time is None:
                req.first_token_time = now
                metrics.first_token(now - req.arrival)
            else:
                gap = now - req.last_token_time
                self._intervals[gap] = self._intervals.get(gap, 0) + 1
            req.last_token_time = now
            self._generated += num_new
        if done:
            metrics.request_finished(now - req.arrival, req.completions[0].finish_reason or "abort")

    def _output(self, req: _Request) -> RequestOutput:
        completions = [
            CompletionOutput(
                c.index,
                c.detok.text if c.detok is not None else "",
                c.token_ids,
                c.cumulative_logprob if c.logprobs is not None else None,
                c.logprobs,
                c.finish_reason,
                c.stop_reason,
            )
            for c in req.completions
        ]
        return RequestOutput(
            req.request_id,
            req.prompt,
            req.prompt_token_ids,
            req.prompt_logprobs,
            completions,
            True,
            req.num_cached_tokens,
        )

    def _add_logprobs(
        self,
        c: _Completion,
        token_id: int,
        k: int,
        token_lp: float,
        rank: int,
        top_lp: list[float],
        top_ids: list[int],
    ) -> None:
        """vLLM's layout: the chosen token first, then the top-k (ranks 1..k)."""
        top_lp, top_ids = top_lp[:k], top_ids[:k]
        texts = (
            [self.detokenizer.token_text(t) for t in (token_id, *top_ids)]
            if c.detok is not None
            else [None] * (1 + len(top_ids))
        )
        c.logprobs.append(token_id, token_lp, rank, top_ids, top_lp, texts)
        c.cumulative_logprob += token_lp
