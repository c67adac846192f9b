"""The engine core: the synchronous ``LLMEngine`` stepping in a process of its own (vLLM's
EngineCore), so that a server's per-token work never waits for the engine's, nor the engine's
for the server's.

Why a process: in one process the engine's host work per step (schedule, prepare, sample) and
the event loop's (text and an SSE chunk per request per step) share the GIL; each hand-over
costs up to the 5 ms switch interval, so at saturation the engine lost about a quarter of its
time (numbers: benchmarks/serve_overhead.py, BENCHMARKS.md).

The core deals in token ids only: text, stop strings and logprob dicts are the front end's
(``output_processor.py``, run by ``AsyncLLM``). Two one-way pipes connect it to each front end
(one front end, or ``serve --api-server-count N`` of them: client i is the i-th pair):
- front end -> core: ``("add", request_id, token_ids, params)``, ``("abort", id)``,
  ``("stop_completions", [(id, index)...])`` (a stop string ended them: the front end found
  it), ``("reset_prefix_cache", token)``, ``("stop",)``. A thread per front end moves them into
  one queue as they come, so a send never waits for a step to end; EOF (the front end is gone)
  counts as stop.
- core -> front end: ``("ready", EngineInfo)`` once (or ``("failed", ...)``), then one
  ``("step", CoreOutputs, errors, EngineState)`` per loop turn that did anything: the step's
  accepted token ids of all requests as a few flat lists (one small pickle, not an object per
  request), ``errors`` as ``(request_id, message)`` for requests the engine refused;
  ``("reply", token, value)`` to the front end that asked; ``("stopped",)`` once its stop is
  applied, or ``("dead", message)``. The loop writes a message itself when the front end's pipe
  has room for it (the usual case: a front end reads each step's message within the next); else
  an output thread writes it, and that front end's later messages, so a step never waits for a
  front end to read.

The threads and the GIL: the loop holds the GIL for most of a step when the model is small (the
step is host-bound), and CPython lets a thread that waits for it sleep up to the switch interval
(5 ms by default) before it insists. Each command a command thread reads waits for the GIL like
that, so a burst of requests reached the loop slowly (256 requests over 4 front ends: ~320 ms at
5 ms, 60-90 ms at 0.5 ms in a CPU model of the loop): the core process sets a 0.5 ms interval.
Handing each step's message to a thread cost the loop more than writing it: in a CPU model of a
SmolLM2 decode step (the engine with its forward faked, 4 reading processes) a step took
70-190 us longer (4-8%) when a thread pickled and wrote its message than when the loop did.

Several front ends: each message is pickled once and its bytes written to every front end; a
front end skips the request ids it does not own (ids are uuids). The core remembers which front
end added each request: a front end's stop (or EOF) aborts its requests alone, and the core
stops once every front end has stopped.

Each turn takes every queued command (a new request joins the running batch at the next step,
an abort frees its KV blocks before it), then runs ``LLMEngine.core_step()`` (its overlapped GPU
pipeline stays inside it). With overlap, a sampled token is a placeholder until the engine reads
it back and runs its stop checks; only accepted tokens are reported.

With tensor parallelism this process is rank 0: ``LLMEngine`` starts the other ranks from here.
It ignores SIGINT and SIGTERM: the front ends drain, then stop it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pickle
import queue
import signal
import sys
import termios
import threading
import traceback
from dataclasses import dataclass

from vllm_lite.config import EngineConfig
from vllm_lite.engine.llm_engine import LLMEngine, RequestLimits

logger = logging.getLogger("vllm_lite.server")
CORE_PROCESS_NAME = "vllm-lite-core"  # the engine process' name (at most 15 characters)
SWITCH_INTERVAL_S = 0.0005  # how long a thread waits for the GIL before it insists (module doc)


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


def run_engine_core(config: EngineConfig, clients: list[tuple]) -> None:
    """The engine process' main function; ``clients``: one (commands, outputs) pipe pair per
    front end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM are the front end's to handle
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # ps and top show it by this name (Linux)
        with open("/proc/self/comm", "w") as fh:
            fh.write(CORE_PROCESS_NAME)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    outputs = [out for _, out in clients]
    try:
        engine = LLMEngine(config, output_processor=False)
    except BaseException as exc:  # noqa: BLE001 - the front end raises it in the server's process
        _send_to(outputs, ("failed", type(exc).__name__, str(exc), traceback.format_exc()))
        return
    info = EngineInfo(
        engine.model_path,
        engine.config,
        engine.hf_config.vocab_size,
        engine.limits,
        engine.tokenizer,
    )
    _send_to(outputs, ("ready", info))
    core = EngineCore(engine, outputs)
    for client, (commands, _) in enumerate(clients):
        threading.Thread(
            target=core.receive, args=(client, commands), name="vllm-lite-commands", daemon=True
        ).start()
    sender = threading.Thread(target=core.send_outputs, name="vllm-lite-outputs", daemon=True)
    sender.start()
    try:
        core.run()
    finally:
        core.outbox.put(None)
        sender.join(30)
        engine.close()
    for out in outputs:
        with contextlib.suppress(Exception):  # skip torch's slow interpreter teardown
            out.close()
    os._exit(0)


def encode_message(message) -> bytes:
    """A message to the front ends as bytes, pickled once for all of them (``recv()`` reads it
    back); plain pickle: no file descriptors or tensors cross."""
    return pickle.dumps(message, pickle.HIGHEST_PROTOCOL)


def _send_to(outputs: list, message) -> None:
    """``message`` to each connection (start-up, before the loop and its output thread)."""
    data = encode_message(message)
    for out in outputs:
        _write(out, data)


def _write(out, data: bytes) -> bool:
    """One pickled message to a front end; False if its pipe broke (the front end is gone)."""
    try:
        out.send_bytes(data)
    except OSError:
        return False
    return True


def _pipe_size(out) -> int:
    """How many bytes ``out``'s pipe holds (0 where that cannot be known: not Linux, not a
    pipe): a message no larger than its room is written without waiting for the reader."""
    try:
        return fcntl.fcntl(out.fileno(), getattr(fcntl, "F_GETPIPE_SZ", 1032))
    except OSError:
        return 0


def _pipe_room(out, size: int) -> int:
    """Free bytes in ``out``'s pipe now (``size``: its capacity)."""
    if not size:
        return 0
    try:
        queued = fcntl.ioctl(out.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return size - int.from_bytes(queued, sys.byteorder, signed=True)


class EngineCore:
    def __init__(self, engine: LLMEngine, outputs: list) -> None:
        self.engine, self.outputs = engine, outputs
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wakeup = threading.Event()
        self.listening = set(range(len(outputs)))  # the front ends that have not stopped
        self.owners: dict[str, int] = {}  # request id -> the front end that added it
        self.pipe_sizes = [_pipe_size(out) for out in outputs]
        self.gone: set[int] = set()  # front ends whose pipe broke
        # messages handed to the output thread, and written by it, per front end (each list
        # written by one thread alone); while they differ, that front end's messages queue there
        self.handed = [0] * len(outputs)
        self.written = [0] * len(outputs)

    def receive(self, client: int, commands) -> None:
        """A command thread: one front end's commands into the queue, at once."""
        while True:
            try:
                command = commands.recv()
            except (EOFError, OSError):  # the front end is gone
                command = ("stop",)
            self.commands.put((client, command))
            self.wakeup.set()
            if command[0] == "stop":
                return

    def send_outputs(self) -> None:
        """The output thread: writes the messages the loop could not write at once (None: no
        more), so a step never waits for a front end to read."""
        while (item := self.outbox.get()) is not None:
            clients, data = item
            for c in clients:
                if c not in self.gone and not _write(self.outputs[c], data):
                    self.gone.add(c)
                self.written[c] += 1

    def run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not engine.has_unfinished_requests():
                    self.wakeup.wait()
                self.wakeup.clear()
                listening = tuple(self.listening)  # who hears of this turn
                errors, applied = self._take_commands()
                running = bool(self.listening)
                stepped = running and engine.has_unfinished_requests()
                outputs = engine.core_step() if stepped else engine.take_outputs()
                if applied or stepped:
                    self._send(("step", outputs, errors, self._state()), listening)
                for client in listening:
                    if client not in self.listening:
                        self._send(("stopped",), (client,))
                if not running:
                    return
        except BaseException as exc:  # noqa: BLE001 - every waiting client must hear of it
            logger.exception("engine failed")
            self._send(("dead", f"engine stopped on an error: {exc!r}"), tuple(self.listening))

    def _send(self, message, clients: tuple) -> None:
        """Pickle ``message`` once; write it now to each front end whose pipe has room (and
        nothing queued before it), hand it to the output thread for the others."""
        data = encode_message(message)
        late = []
        for c in clients:
            if c in self.gone:
                continue
            out = self.outputs[c]
            if (
                self.handed[c] == self.written[c]
                and _pipe_room(out, self.pipe_sizes[c]) > len(data) + 8
            ):  # (+ its length header)
                if not _write(out, data):
                    self.gone.add(c)
            else:
                late.append(c)
                self.handed[c] += 1
        if late:
            self.outbox.put((late, data))

    def _take_commands(self) -> tuple[list, int]:
        """Apply every queued command: (errors for the front ends, how many commands were
        applied)."""
        errors, applied = [], 0
        engine = self.engine
        while True:
            try:
                client, command = self.commands.get_nowait()
            except queue.Empty:
                return errors, applied
            applied += 1
            kind = command[0]
            if kind == "add":
                _, request_id, token_ids, params = command
                try:
                    engine.add_request(token_ids, params, request_id=request_id)
                    self._own(request_id, client)
                except Exception as exc:  # noqa: BLE001 - reported to that request alone
                    errors.append((request_id, str(exc)))
            elif kind == "abort":
                engine.abort_request(command[1])
            elif kind == "stop_completions":
                for request_id, index in command[1]:
                    engine.stop_completion(request_id, index)
            elif kind == "reset_prefix_cache":
                self._send(("reply", command[1], engine.reset_prefix_cache()), (client,))
            elif kind == "stop":
                self.listening.discard(client)
                for request_id in list(engine.sequences):
                    if self.owners.get(request_id) == client or not self.listening:
                        engine.abort_request(request_id)

    def _own(self, request_id: str, client: int) -> None:
        owners = self.owners
        owners[request_id] = client
        if len(owners) > 2 * len(self.engine.sequences) + 1024:  # forget the finished ones
            self.owners = {r: c for r, c in owners.items() if r in self.engine.sequences}

    def _state(self) -> EngineState:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        return EngineState(
            len(scheduler.running),
            len(scheduler.waiting),
            blocks.num_free_blocks,
            blocks.num_blocks,
            scheduler.num_preemptions,
            scheduler.prefix_cache_queries,
            scheduler.prefix_cache_hits,
        )
