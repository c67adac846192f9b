"""``AsyncLLM``: the synchronous ``LLMEngine`` stepping in a thread of its own, with an asyncio
face for a server.

- Requests go in through a thread-safe command queue (add / abort / stop). The engine thread
  takes every waiting command before each step, so a new request joins the running batch at
  the next step, and an abort frees the request's KV blocks before the next step.
- ``LLMEngine.step()`` is unchanged (its overlapped GPU pipeline stays inside it). After each
  step the engine thread compares every live request with what it last sent and puts the
  differences (``RequestDelta``: new token ids, new text, new logprobs, finish reason) on an
  output queue; one callback on the event loop hands them to each request's own asyncio queue,
  which ``generate()`` yields from.
- Only *accepted* tokens are reported: with overlap, a sampled token is a placeholder (-1) in
  ``seq.token_ids`` until the engine reads it back and runs its stop checks. Text is reported up
  to what the incremental detokenizer has, minus a hold-back of ``len(longest stop string) - 1``
  characters while the request runs (a stop string may start in text already decoded; the
  engine then cuts it off, so those characters must not have been sent yet, vLLM's rule).
- A request whose consumer goes away (client disconnect: the generator is closed or cancelled)
  is aborted; the engine frees its blocks at once.

The offline ``LLM`` does not use any of this; ``LLMEngine`` is shared as it is.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from vllm_lite.config import EngineConfig
from vllm_lite.engine.llm_engine import LLMEngine
from vllm_lite.sampling_params import SamplingParams

logger = logging.getLogger("vllm_lite.server")
_ids = itertools.count()


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an error; no request can be served any more."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down (or has stopped) and takes no new requests."""


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
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (known once it is scheduled)


def merge_deltas(a: RequestDelta, b: RequestDelta) -> RequestDelta:
    """``a`` then ``b`` as one delta (per completion: tokens, text and logprobs concatenated)."""
    outputs = {c.index: CompletionDelta(c.index, list(c.token_ids), c.text,
                                        list(c.logprobs) if c.logprobs is not None else None,
                                        c.finish_reason, c.stop_reason) for c in a.outputs}
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
    return RequestDelta(a.request_id, [outputs[i] for i in sorted(outputs)], b.finished,
                        a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
                        b.num_cached_tokens)


@dataclass
class _Live:
    """Engine-thread bookkeeping of one request: what was sent so far."""
    seq: object  # the request's first Sequence (its completions: seq.group)
    arrival: float
    holdback: int
    sent_tokens: dict[int, int] = field(default_factory=dict)
    sent_text: dict[int, int] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    prompt_logprobs_sent: bool = False
    first_token_time: float | None = None
    last_token_time: float | None = None


class AsyncLLM:
    def __init__(self, engine: LLMEngine, metrics=None) -> None:
        self.engine = engine
        self.config = engine.config
        self.metrics = metrics
        # The front end tokenizes and renders chat templates on the event loop while the engine
        # thread detokenizes: each side gets its own tokenizer object (a fast tokenizer is not
        # meant to be used from two threads at once).
        self.tokenizer = None
        if engine.tokenizer is not None:
            try:
                self.tokenizer = copy.deepcopy(engine.tokenizer)
            except Exception:  # noqa: BLE001 - a tokenizer that cannot be copied is shared
                self.tokenizer = engine.tokenizer
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._live: dict[str, _Live] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dispatch_scheduled = False
        self._stopping = False
        self._last_preemptions = 0
        self._last_prefix_cache = (0, 0)  # queries, hits
        self.dead_error: BaseException | None = None

    @classmethod
    def from_config(cls, config: EngineConfig, metrics=None) -> AsyncLLM:
        return cls(LLMEngine(config), metrics)

    # ---- lifecycle (event loop side) -------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the outputs."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="vllm-lite-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is still running, stop the engine thread and release the engine."""
        self._stopping = True
        if self._thread is not None:
            self._commands.put(("stop",))
            self._wakeup.set()
            await asyncio.to_thread(self._thread.join, timeout)
            self._dispatch()
        self.engine.close()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_error is None

    @property
    def num_unfinished_requests(self) -> int:
        """Requests whose consumer is still waiting on them (what a drain waits for)."""
        return len(self._streams)

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (on the engine thread, between steps); False while a
        request holds KV blocks, as ``LLM.reset_prefix_cache``."""
        if self.dead_error is not None or self._thread is None or not self._thread.is_alive():
            raise EngineStoppedError("the engine is not running")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("reset_prefix_cache", future))
        self._wakeup.set()
        return await asyncio.wrap_future(future)

    # ---- requests (event loop side) --------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The engine's own validation (ValueError naming the problem), before queueing: it only
        reads the engine's fixed configuration, so it is safe beside the engine thread."""
        self.engine.check_request(prompt_token_ids, params)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestDelta]:
        """Queue one request and yield its deltas until it finishes. Bad input raises the
        engine's ValueError before the first delta. Closing the generator early aborts it."""
        if self.dead_error is not None:
            raise EngineDeadError(f"engine stopped on an error: {self.dead_error!r}")
        if self._stopping or self._thread is None:
            raise EngineStoppedError("the engine is not running")
        request_id = request_id if request_id is not None else f"req-{next(_ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, list(prompt_token_ids), params, time.monotonic()))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                # a consumer that fell behind gets what queued up as one delta
                while not isinstance(item, BaseException) and not item.finished and not stream.empty():
                    following = stream.get_nowait()
                    item = following if isinstance(following, BaseException) else merge_deltas(item, following)
                if isinstance(item, BaseException):
                    finished = True  # the engine has dropped it already
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it is finished or unknown); thread-safe. Its blocks are
        freed before the engine's next step; its stream, if still read, ends with 'abort'."""
        self._commands.put(("abort", request_id))
        self._wakeup.set()

    def abort_all(self) -> None:
        for request_id in list(self._streams):
            self.abort(request_id)

    # ---- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not engine.has_unfinished_requests():
                    self._wakeup.wait(1.0)
                self._wakeup.clear()
                if not self._take_commands():
                    break
                if engine.has_unfinished_requests():
                    engine.step()
                    self._emit(self._collect())
                    self._record_engine_state()
        except BaseException as exc:  # noqa: BLE001 - every waiting client must hear of it
            logger.exception("engine thread failed")
            self.dead_error = exc
            error = EngineDeadError(f"engine stopped on an error: {exc!r}")
            self._emit([(rid, error) for rid in self._live])
            self._live.clear()
            self._drain_commands_after_death(error)
        else:
            # stopped: whatever is still live was aborted by the stop command
            self._record_engine_state()
            self._drain_commands_after_death(EngineStoppedError("the engine is not running"))

    def _drain_commands_after_death(self, error: BaseException) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                self._emit([(command[1], error)])
            elif command[0] == "reset_prefix_cache":
                command[1].set_exception(error)

    def _take_commands(self) -> bool:
        """Apply every queued command; False once told to stop."""
        out = []
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            kind = command[0]
            if kind == "add":
                _, request_id, token_ids, params, arrival = command
                try:
                    seq = self.engine.add_request(token_ids, params, request_id=request_id)
                except Exception as exc:  # noqa: BLE001 - reported to that request alone
                    out.append((request_id, exc))
                    continue
                stops = params.stop_strings if not params.include_stop_str_in_output else []
                holdback = max((len(s) for s in stops), default=1) - 1
                self._live[request_id] = _Live(seq, arrival, holdback)
                if self.metrics is not None:
                    self.metrics.request_added(len(token_ids))
            elif kind == "abort":
                request_id = command[1]
                if request_id in self._live:
                    self.engine.abort_request(request_id)
                    out.extend(self._collect([request_id]))
            elif kind == "reset_prefix_cache":
                future = command[1]
                future.set_result(self.engine.reset_prefix_cache())
            elif kind == "stop":
                for request_id in list(self._live):
                    self.engine.abort_request(request_id)
                out.extend(self._collect())
                self._emit(out)
                return False
        if out:
            self._emit(out)
        return True

    def _collect(self, request_ids=None) -> list[tuple[str, RequestDelta]]:
        """Deltas of the live requests (all, or ``request_ids``); finished ones leave ``_live``."""
        now = time.monotonic()
        out = []
        for request_id in list(self._live) if request_ids is None else request_ids:
            live = self._live.get(request_id)
            if live is None:
                continue
            delta = self._delta(request_id, live, now)
            if delta is not None:
                out.append((request_id, delta))
                if delta.finished:
                    del self._live[request_id]
        return out

    def _delta(self, request_id: str, live: _Live, now: float) -> RequestDelta | None:
        first = live.seq
        group = getattr(first, "group", None) or [first]
        outputs, num_new = [], 0
        for seq in group:
            index = getattr(seq, "index", 0)
            if index in live.done:
                continue
            tokens, num_prompt = seq.token_ids, seq.num_prompt_tokens
            end = len(tokens)
            while end > num_prompt and tokens[end - 1] < 0:  # placeholders: not read back yet
                end -= 1
            sent = live.sent_tokens.get(index, 0)
            new_ids = tokens[num_prompt + sent:end]
            finished = seq.is_finished
            text = seq.detok.text if seq.detok is not None else ""
            sent_text = live.sent_text.get(index, 0)
            visible = len(text) if finished else max(sent_text, len(text) - live.holdback)
            new_text = text[sent_text:visible]
            if not new_ids and not new_text and not finished:
                continue
            logprobs = getattr(seq, "logprobs", None)
            if logprobs is not None:
                logprobs = logprobs[sent:sent + len(new_ids)]
            live.sent_tokens[index] = sent + len(new_ids)
            live.sent_text[index] = visible
            if finished:
                live.done.add(index)
            outputs.append(CompletionDelta(index, new_ids, new_text, logprobs,
                                           seq.finish_reason if finished else None,
                                           seq.stop_reason if finished else None))
            num_new += len(new_ids)
        n = getattr(first.params, "n", 1)
        aborted = any(s.finish_reason == "abort" for s in group)
        finished = all(s.is_finished for s in group) and (len(group) >= n or aborted)
        prompt_logprobs = None
        scored = getattr(first, "prompt_logprobs", None)
        if (scored is not None and not live.prompt_logprobs_sent and (outputs or finished)
                and len(scored) >= first.num_prompt_tokens):
            prompt_logprobs, live.prompt_logprobs_sent = list(scored), True
        if not outputs and not finished and prompt_logprobs is None:
            return None
        if self.metrics is not None:
            if num_new:
                if live.first_token_time is None:
                    live.first_token_time = now
                    self.metrics.first_token(now - live.arrival)
                else:
                    self.metrics.inter_token(now - live.last_token_time)
                live.last_token_time = now
                self.metrics.generated(num_new)
            if finished:
                self.metrics.request_finished(now - live.arrival, first.finish_reason or "abort")
        return RequestDelta(request_id, outputs, finished, prompt_logprobs, first.num_cached_tokens)

    def _record_engine_state(self) -> None:
        if self.metrics is None:
            return
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        preemptions = scheduler.num_preemptions
        queries, hits = scheduler.prefix_cache_queries, scheduler.prefix_cache_hits
        self.metrics.engine_state(len(scheduler.running), len(scheduler.waiting),
                                  1.0 - blocks.num_free_blocks / blocks.num_blocks,
                                  preemptions - self._last_preemptions,
                                  queries - self._last_prefix_cache[0], hits - self._last_prefix_cache[1])
        self._last_preemptions, self._last_prefix_cache = preemptions, (queries, hits)

    # ---- hand-over to the event loop -------------------------------------------------------
    def _emit(self, items: list[tuple[str, object]]) -> None:
        if not items:
            return
        self._outputs.put(items)
        if not self._dispatch_scheduled and self._loop is not None:
            self._dispatch_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._dispatch)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _dispatch(self) -> None:
        """Event loop side: route the engine thread's deltas to their requests' streams."""
        self._dispatch_scheduled = False
        while True:
            try:
                items = self._outputs.get_nowait()
            except queue.Empty:
                return
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is not None:
                    stream.put_nowait(item)
