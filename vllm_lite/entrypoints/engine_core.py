"""The engine core: the synchronous ``LLMEngine`` stepping in a process of its own (vLLM's
EngineCore), so that a server's per-token work never waits for the engine's, nor the engine's
for the server's.

Why a process: in one process the engine's host work per step (schedule, prepare, sample,
detokenize, one delta per live request) and the event loop's (an SSE chunk per request per
step) share the GIL; each hand-over costs up to the 5 ms switch interval, so at saturation the
engine lost about a quarter of its time (numbers: benchmarks/serve_overhead.py, BENCHMARKS.md).

Two one-way pipes connect it to ``AsyncLLM`` (the front end, in the server's process):
- front end -> core: ``("add", request_id, token_ids, params, arrival)``, ``("abort", id)``,
  ``("reset_prefix_cache", token)``, ``("stop",)``. A thread of the core moves them into a
  queue as they come, so a send never waits for a step to end; EOF (the front end is gone)
  counts as stop.
- core -> front end: ``("ready", EngineInfo)`` once (or ``("failed", ...)``), then one
  ``("step", items, metric_calls, EngineState)`` per loop turn that did anything: ``items``
  are ``(request_id, RequestDelta or exception)``, ``metric_calls`` the server metrics' hooks
  called in this turn (replayed on the front end's ``ServerMetrics``); ``("reply", token,
  value)``; at the end ``("stopped",)`` or ``("dead", message)``.

Each turn takes every queued command (a new request joins the running batch at the next step,
an abort frees its KV blocks before it), runs ``LLMEngine.step()`` unchanged (its overlapped GPU
pipeline stays inside it), then compares every live request with what it last sent:
- Only *accepted* tokens are reported: with overlap, a sampled token is a placeholder (-1) in
  ``seq.token_ids`` until the engine reads it back and runs its stop checks.
- Text is reported up to what the incremental detokenizer has, minus a hold-back of
  ``len(longest stop string) - 1`` characters while the request runs (a stop string may start
  in text already decoded; the engine then cuts it off, so those characters must not have been
  sent yet, vLLM's rule).

With tensor parallelism this process is rank 0: ``LLMEngine`` starts the other ranks from here.
It ignores SIGINT and SIGTERM: the front end drains, then stops it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field

from vllm_lite.config import EngineConfig
from vllm_lite.engine.llm_engine import LLMEngine, RequestLimits
from vllm_lite.engine.sequence import PLACEHOLDER, Sequence

logger = logging.getLogger("vllm_lite.server")


@dataclass
class CompletionDelta:
    """What one of a request's n completions gained since the last delta."""
    index: int
    token_ids: list[int]  # newly accepted output token ids
    text: str  # newly decoded text
    logprobs: list[dict] | None = None  # per new token {token id: Logprob}, when the request asked
    finish_reason: str | None = None  # set once, on the completion's last delta
    stop_reason: int | str | None = None

    def __reduce__(self):  # pickled as a tuple: 8x cheaper than a dataclass' __dict__
        return CompletionDelta, (self.index, self.token_ids, self.text, self.logprobs, self.finish_reason,
                                 self.stop_reason)


@dataclass
class RequestDelta:
    request_id: str
    outputs: list[CompletionDelta]
    finished: bool  # all the request's completions are done; the stream ends after this one
    prompt_logprobs: list | None = None  # once, when the request asked and its prompt is scored
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (known once it is scheduled)

    def __reduce__(self):
        return RequestDelta, (self.request_id, self.outputs, self.finished, self.prompt_logprobs,
                              self.num_cached_tokens)


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
class EngineInfo:
    """What the front end needs of the engine: names, limits to check requests, the tokenizer."""
    model_path: str
    config: EngineConfig  # as the engine resolved it (max_model_len filled in)
    vocab_size: int
    limits: RequestLimits
    tokenizer: object | None


@dataclass
class EngineState:
    """The scheduler and KV pool after a loop turn (counters are totals since start)."""
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # of those, found cached


class MetricCalls:
    """Stands in for ``ServerMetrics`` in the engine process: records each hook call
    (``first_token(0.012)``...) for the front end to replay on the real one."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, hook: str):
        return lambda *args: self.calls.append((hook, args))

    def take(self) -> list[tuple[str, tuple]]:
        calls, self.calls = self.calls, []
        return calls


@dataclass
class _Live:
    """Bookkeeping of one request: what was sent so far."""
    seq: Sequence  # the request's first Sequence (its completions: seq.group)
    arrival: float
    holdback: int
    sent_tokens: dict[int, int] = field(default_factory=dict)
    sent_text: dict[int, int] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    prompt_logprobs_sent: bool = False
    first_token_time: float | None = None
    last_token_time: float | None = None


def run_engine_core(config: EngineConfig, commands, outputs, with_metrics: bool) -> None:
    """The engine process' main function."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM are the front end's to handle
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = LLMEngine(config)
        engine.stream_text = True  # each step's new text is sent as it comes
    except BaseException as exc:  # noqa: BLE001 - the front end raises it in the server's process
        outputs.send(("failed", type(exc).__name__, str(exc), traceback.format_exc()))
        return
    info = EngineInfo(engine.model_path, engine.config, engine.hf_config.vocab_size, engine.limits,
                      engine.tokenizer)
    outputs.send(("ready", info))
    core = EngineCore(engine, outputs, MetricCalls() if with_metrics else None)
    threading.Thread(target=core.receive, args=(commands,), name="vllm-lite-commands", daemon=True).start()
    try:
        core.run()
    finally:
        engine.close()
    with contextlib.suppress(Exception):  # skip torch's slow interpreter teardown
        outputs.close()
    os._exit(0)


class EngineCore:
    def __init__(self, engine: LLMEngine, outputs, metrics: MetricCalls | None = None) -> None:
        self.engine, self.outputs, self.metrics = engine, outputs, metrics
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.wakeup = threading.Event()
        self.live: dict[str, _Live] = {}

    def receive(self, commands) -> None:
        """The command thread: the front end's commands into the queue, at once."""
        while True:
            try:
                command = commands.recv()
            except (EOFError, OSError):  # the front end is gone
                command = ("stop",)
            self.commands.put(command)
            self.wakeup.set()
            if command[0] == "stop":
                return

    def run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not engine.has_unfinished_requests():
                    self.wakeup.wait()
                self.wakeup.clear()
                items, applied, running = self._take_commands()
                stepped = running and engine.has_unfinished_requests()
                if stepped:
                    engine.step()
                    items += self._collect()
                if applied or stepped:
                    self._send(("step", items, self.metrics.take() if self.metrics else [], self._state()))
                if not running:
                    self._send(("stopped",))
                    return
        except BrokenPipeError:  # the front end is gone: nobody to tell
            return
        except BaseException as exc:  # noqa: BLE001 - every waiting client must hear of it
            logger.exception("engine failed")
            with contextlib.suppress(OSError):
                self._send(("dead", f"engine stopped on an error: {exc!r}"))

    def _send(self, message) -> None:
        self.outputs.send(message)

    def _take_commands(self) -> tuple[list, int, bool]:
        """Apply every queued command: (deltas and errors for the front end, how many commands
        were applied, False once told to stop)."""
        out, applied = [], 0
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return out, applied, True
            applied += 1
            kind = command[0]
            if kind == "add":
                _, request_id, token_ids, params, arrival = command
                try:
                    seq = self.engine.add_request(token_ids, params, request_id=request_id)
                except Exception as exc:  # noqa: BLE001 - reported to that request alone
                    out.append((request_id, ValueError(str(exc))))
                    continue
                stops = params.stop_strings if not params.include_stop_str_in_output else []
                holdback = max((len(s) for s in stops), default=1) - 1
                self.live[request_id] = _Live(seq, arrival, holdback)
                if self.metrics is not None:
                    self.metrics.request_added(len(token_ids))
            elif kind == "abort":
                request_id = command[1]
                if request_id in self.live:
                    self.engine.abort_request(request_id)
                    out.extend(self._collect([request_id]))
            elif kind == "reset_prefix_cache":
                self._send(("reply", command[1], self.engine.reset_prefix_cache()))
            elif kind == "stop":
                for request_id in list(self.live):
                    self.engine.abort_request(request_id)
                out.extend(self._collect())
                return out, applied, False

    def _state(self) -> EngineState:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        return EngineState(len(scheduler.running), len(scheduler.waiting), blocks.num_free_blocks, blocks.num_blocks,
                           scheduler.num_preemptions, scheduler.prefix_cache_queries, scheduler.prefix_cache_hits)

    def _collect(self, request_ids=None) -> list[tuple[str, RequestDelta]]:
        """Deltas of the live requests (all, or ``request_ids``); finished ones leave ``live``."""
        now = time.monotonic()  # system-wide on Linux: comparable with the front end's arrival times
        out = []
        for request_id in list(self.live) if request_ids is None else request_ids:
            live = self.live.get(request_id)
            if live is None:
                continue
            delta = self._delta(request_id, live, now)
            if delta is not None:
                out.append((request_id, delta))
                if delta.finished:
                    del self.live[request_id]
        return out

    def _delta(self, request_id: str, live: _Live, now: float) -> RequestDelta | None:
        first = live.seq
        group = first.group
        outputs, num_new = [], 0
        for seq in group:
            index = seq.index
            if index in live.done:
                continue
            tokens, num_prompt = seq.token_ids, seq.num_prompt_tokens
            end = len(tokens)
            while end > num_prompt and tokens[end - 1] == PLACEHOLDER:  # not read back yet
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
            logprobs = seq.logprobs[sent:sent + len(new_ids)] if seq.logprobs is not None else None
            live.sent_tokens[index] = sent + len(new_ids)
            live.sent_text[index] = visible
            if finished:
                live.done.add(index)
            outputs.append(CompletionDelta(index, new_ids, new_text, logprobs,
                                           seq.finish_reason if finished else None,
                                           seq.stop_reason if finished else None))
            num_new += len(new_ids)
        n = first.params.n
        aborted = any(s.finish_reason == "abort" for s in group)
        finished = all(s.is_finished for s in group) and (len(group) >= n or aborted)
        prompt_logprobs = None
        scored = first.prompt_logprobs
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
