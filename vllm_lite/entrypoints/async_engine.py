"""``AsyncLLM``: the asyncio face of the engine core for a server (vLLM's AsyncLLM).

The engine steps in a process of its own (``engine_core.py`` says why and what crosses the
pipes); it reports token ids. This side, on the server's event loop, owns the text (the output
processor: batched detokenization, stop strings, logprob dicts) and one output stream per
request:
- ``generate()`` checks a request against the engine's limits, sends it to the core and yields
  its ``RequestDelta``s; a consumer that fell behind gets what queued up as one delta.
- The core's per-step messages are read by a reader on the event loop (no thread): the output
  processor turns each into one delta per request that changed, each to its request's asyncio
  queue; a request that hit a stop string is stopped in the core; the server's
  ``ServerMetrics`` are recorded here, and ``engine_state`` is the scheduler and KV pool after
  that step.
- A request whose consumer goes away (client disconnect: the generator is closed or
  cancelled) is aborted; the engine frees its blocks before its next step.
- The core exiting on its own (an error, a kill) fails every stream with ``EngineDeadError``.
- ``AsyncLLM(config)`` starts its own core; ``AsyncLLM.attach`` is one of several front ends of
  a core started by ``serve --api-server-count N`` (``api_servers.py``).

The offline ``LLM`` runs the same core and output processor in one process (``LLMEngine.step``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import multiprocessing
import time
from collections.abc import AsyncIterator

from vllm_lite.config import EngineConfig
from vllm_lite.engine.output_processor import (
    CompletionDelta,  # noqa: F401 - re-exported
    OutputProcessor,
    RequestDelta,
    merge_deltas,
)
from vllm_lite.entrypoints.engine_core import EngineInfo, EngineState, run_engine_core
from vllm_lite.sampling_params import SamplingParams
from vllm_lite.worker.tp_executor import pipe

logger = logging.getLogger("vllm_lite.server")
_ids = itertools.count()


class EngineDeadError(RuntimeError):
    """The engine stopped on an error; no request can be served any more."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down (or has stopped) and takes no new requests."""


def wait_until_ready(outputs, process) -> EngineInfo:
    """The core's first message on ``outputs``: its ``EngineInfo``, or its start-up error
    raised here (a user's mistake as itself, to be printed in one line)."""
    while process.is_alive() and not outputs.poll(0.5):
        pass
    try:
        message = outputs.recv()
    except EOFError:  # it died without a word (killed, out of memory)
        process.join(5)
        raise RuntimeError(
            f"the engine process exited while starting (exit code {process.exitcode})"
        ) from None
    if message[0] == "ready":
        return message[1]
    _, kind, text, trace = message
    process.join(30)
    error = {
        "ValueError": ValueError,
        "FileNotFoundError": FileNotFoundError,
        "NotADirectoryError": NotADirectoryError,
    }.get(kind)
    if error is not None:  # a user's mistake: the command line prints it in one line
        raise error(text)
    raise RuntimeError(f"the engine failed to start:\n{trace}")


class AsyncLLM:
    def __init__(self, config: EngineConfig, metrics=None) -> None:
        """Start the engine process and wait until its engine is built (its errors, a bad
        config value say, are raised here as they are)."""
        commands_out, commands = pipe()
        outputs, outputs_in = pipe()
        process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core,
            args=(config, [(commands_out, outputs_in)]),
            name="vllm-lite-engine",
        )  # not a daemon: with tensor parallelism it starts the other ranks
        try:
            process.start()
        finally:
            # the core has its own copies: a pipe ends exactly when one side is gone
            commands_out.close()
            outputs_in.close()
        self._connect(commands, outputs, process, metrics)
        try:
            info = wait_until_ready(outputs, process)
        except BaseException:  # a failed start, or Ctrl-C while the model loads
            process.kill()
            self._close_pipes()
            atexit.unregister(self._close_pipes)
            raise
        self._set_info(info)

    @classmethod
    def from_config(cls, config: EngineConfig, metrics=None) -> AsyncLLM:
        return cls(config, metrics)

    @classmethod
    def attach(cls, commands, outputs, info: EngineInfo, metrics=None) -> AsyncLLM:
        """A front end of an engine core started elsewhere (``serve --api-server-count N``):
        ``commands``/``outputs`` are this front end's pipe ends, ``info`` the core's "ready"
        (already read). Its shutdown stops this front end's requests, not the core."""
        self = cls.__new__(cls)
        self._connect(commands, outputs, None, metrics)
        self._set_info(info)
        return self

    def _connect(self, commands, outputs, process, metrics) -> None:
        self.metrics = metrics
        self._streams: dict[str, asyncio.Queue] = {}
        self._replies: dict[int, asyncio.Future] = {}
        self._reply_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = self._stopped = self._gone = False
        self.dead_error: BaseException | None = None
        self.engine_state = EngineState()
        self._commands, self._outputs, self._process = commands, outputs, process
        atexit.register(self._close_pipes)  # runs before multiprocessing joins the process at exit

    def _set_info(self, info: EngineInfo) -> None:
        self.info = info
        self.config, self.tokenizer = info.config, info.tokenizer
        self.processor = OutputProcessor(self.tokenizer, stream=True, metrics=self.metrics)

    # ---- lifecycle (event loop side) -------------------------------------------------------
    def start(self) -> None:
        """Start reading the engine's outputs; call from the event loop that will consume them."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._outputs.fileno(), self._read_outputs)

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is still running, stop the engine process and release the engine."""
        self._stopping = True
        self._send(("stop",))
        if self._process is not None:
            await asyncio.to_thread(self._process.join, timeout)
            if self._process.is_alive():
                logger.warning("the engine process did not stop in %g s: killing it", timeout)
                self._process.kill()
                self._process.join(5)
        else:  # attached: the core goes on for the other front ends; wait for its "stopped"
            deadline = time.monotonic() + timeout
            while not (self._stopped or self._gone) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        self._read_outputs()  # what it said last
        stopped = EngineStoppedError("the engine is not running")
        for stream in self._streams.values():  # requests it never took
            stream.put_nowait(stopped)
        self._close_pipes()
        atexit.unregister(self._close_pipes)

    def _close_pipes(self) -> None:
        if self._loop is not None and not self._outputs.closed:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._outputs.fileno())
        self._commands.close()  # the engine process stops when it reads EOF
        self._outputs.close()

    @property
    def is_running(self) -> bool:
        return self._core_alive() and self.dead_error is None and not self._stopped

    def _core_alive(self) -> bool:
        return self._process.is_alive() if self._process is not None else not self._gone

    @property
    def num_unfinished_requests(self) -> int:
        """Requests whose consumer is still waiting on them (what a drain waits for)."""
        return len(self._streams)

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (in the engine process, between steps); False while a
        request holds KV blocks, as ``LLM.reset_prefix_cache``."""
        if self.dead_error is not None or self._stopping or not self._core_alive():
            raise EngineStoppedError("the engine is not running")
        token = next(self._reply_ids)
        future = self._replies[token] = asyncio.get_running_loop().create_future()
        self._send(("reset_prefix_cache", token))
        return await future

    # ---- requests (event loop side) --------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The engine's own validation (ValueError naming the problem), before queueing."""
        self.info.limits.check(prompt_token_ids, params)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestDelta]:
        """Queue one request and yield its deltas until it finishes. Bad input raises the
        engine's ValueError before the first delta. Closing the generator early aborts it."""
        if self.dead_error is not None:
            raise EngineDeadError(str(self.dead_error))
        if self._stopping or self._loop is None:
            raise EngineStoppedError("the engine is not running")
        request_id = request_id if request_id is not None else f"req-{next(_ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        prompt_token_ids = list(prompt_token_ids)
        self.processor.add_request(request_id, None, prompt_token_ids, params, time.monotonic())
        if self.metrics is not None:
            self.metrics.request_added(len(prompt_token_ids))
        self._send(("add", request_id, prompt_token_ids, params))
        finished = False
        try:
            while True:
                item = await stream.get()
                # a consumer that fell behind gets what queued up as one delta
                while (
                    not isinstance(item, BaseException) and not item.finished and not stream.empty()
                ):
                    following = stream.get_nowait()
                    item = (
                        following
                        if isinstance(following, BaseException)
                        else merge_deltas(item, following)
                    )
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
        """Abort a request (no-op if it is finished or unknown). Its blocks are freed before the
        engine's next step; its stream, if still read, ends with 'abort'."""
        self._send(("abort", request_id))

    def abort_all(self) -> None:
        for request_id in list(self._streams):
            self.abort(request_id)

    def _send(self, command: tuple) -> None:
        try:
            self._commands.send(command)
        except OSError:  # the engine process is gone; the reader reports how
            pass

    # ---- the engine's outputs (event loop side) --------------------------------------------
    def _read_outputs(self) -> None:
        try:
            while not self._outputs.closed and self._outputs.poll():
                self._handle(self._outputs.recv())
        except (EOFError, OSError):
            self._engine_gone()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "step":
            _, outputs, errors, state = message
            streams = self._streams
            for request_id, error in errors:
                self.processor.abort_request(request_id)
                stream = streams.get(request_id)
                if stream is not None:
                    stream.put_nowait(ValueError(error))
            processed = self.processor.process(outputs)
            if processed.stops:
                self._send(("stop_completions", processed.stops))
            for delta in processed.deltas:
                stream = streams.get(delta.request_id)
                if stream is not None:
                    stream.put_nowait(delta)
            if self.metrics is not None:
                self._record_engine_state(state)
            self.engine_state = state
        elif kind == "reply":
            future = self._replies.pop(message[1], None)
            if future is not None and not future.done():
                future.set_result(message[2])
        elif kind == "stopped":
            self._stopped = True
        elif kind == "dead":
            self._fail_all(EngineDeadError(message[1]))

    def _engine_gone(self) -> None:
        """EOF: the engine process has exited (after 'stopped', or on its own)."""
        self._gone = True
        if self._loop is not None and not self._outputs.closed:
            self._loop.remove_reader(self._outputs.fileno())
        if not self._stopped and self.dead_error is None:
            code = ""
            if self._process is not None:
                self._process.join(1)
                code = f" (exit code {self._process.exitcode})"
            self._fail_all(EngineDeadError(f"the engine process exited unexpectedly{code}"))

    def _fail_all(self, error: BaseException) -> None:
        logger.error("%s", error)
        self.dead_error = error
        for stream in self._streams.values():
            stream.put_nowait(error)
        for future in self._replies.values():
            if not future.done():
                future.set_exception(error)
        self._replies.clear()

    def _record_engine_state(self, state: EngineState) -> None:
        last = self.engine_state
        self.metrics.engine_state(
            state.num_running,
            state.num_waiting,
            1.0 - state.num_free_blocks / state.num_blocks,
            state.num_preemptions - last.num_preemptions,
            state.prefix_cache_queries - last.prefix_cache_queries,
            state.prefix_cache_hits - last.prefix_cache_hits,
        )
