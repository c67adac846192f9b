"""``vllm-lite serve --api-server-count N`` (vLLM's flag): N front-end processes, each the whole
FastAPI app with its own ``AsyncLLM`` (tokenizer, output processor, SSE), each accepting
connections on its own listening socket of the one address (SO_REUSEPORT: the kernel spreads
them), all driving one engine core.

Why: a front end's CPU per output token (detokenization, stop strings, an SSE chunk per step)
bounds a busy server; one front end held an H200 to ~60% of the engine's offline throughput
with text on. The engine core stays one process whatever N (``engine_core.py``: each step's
message is pickled once and written to every front end, which keeps the requests it owns).

This process, the supervisor, serves nothing: it starts the core with one pipe pair per front
end, waits for its "ready" (a start-up error is raised here, as with one server), starts the
front ends, prints the address once they all serve, then waits. SIGTERM or SIGINT goes to every
front end as SIGTERM: each drains as one server does (a second signal stops it at once); the core
stops once every front end has stopped; exit status 0. A front end or the core exiting on its
own stops the others: exit status 1. Metrics: ``metrics.py``'s multiprocess mode, in a temporary
folder made here (before any front end imports prometheus_client) and removed at exit.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from multiprocessing.connection import wait

from vllm_lite.config import EngineConfig
from vllm_lite.entrypoints.async_engine import AsyncLLM, wait_until_ready
from vllm_lite.entrypoints.cli_util import settle_heap
from vllm_lite.entrypoints.engine_core import EngineInfo, run_engine_core
from vllm_lite.entrypoints.metrics import ServerMetrics
from vllm_lite.entrypoints.openai_server import bind, build_app, make_server
from vllm_lite.worker.tp_executor import pipe

STOP_WAIT_S = 30.0  # for the core to stop once the front ends are gone


def run_api_servers(
    config: EngineConfig,
    count: int,
    sock,
    banner: str,
    drain_timeout: float,
    **app_settings,
) -> int:
    """Serve on ``sock`` with ``count`` front ends until a signal; the exit status.
    ``app_settings``: ``run_front_end``'s (names, api key, tool call parser, log level)."""
    ctx = multiprocessing.get_context("spawn")
    core_ends, front_ends = [], []
    for _ in range(count):
        commands_reader, commands_writer = pipe()
        outputs_reader, outputs_writer = pipe()
        core_ends.append((commands_reader, outputs_writer))
        front_ends.append((commands_writer, outputs_reader))
    core = ctx.Process(target=run_engine_core, args=(config, core_ends), name="vllm-lite-engine")
    try:
        core.start()
    finally:
        _close(core_ends)  # the core has its own copies: a pipe ends when one side is gone
    try:
        info = wait_until_ready(front_ends[0][1], core)
        for _, outputs in front_ends[1:]:
            wait_until_ready(outputs, core)  # the same "ready", once per front end
    except BaseException:  # a failed start, or Ctrl-C while the model loads
        core.kill()
        core.join()
        _close(front_ends)
        raise

    supervisor = _Supervisor(core, drain_timeout)
    metrics_dir = tempfile.mkdtemp(prefix="vllm-lite-metrics-")
    started_reader, started_writer = ctx.Pipe(duplex=False)
    previous = {s: signal.signal(s, supervisor.forward) for s in (signal.SIGINT, signal.SIGTERM)}
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read when prometheus_client is imported
    try:
        socks = reuse_port_sockets(sock, count)
        for index, (commands, outputs) in enumerate(front_ends):
            front_end = ctx.Process(
                target=run_front_end,
                args=(index, commands, outputs, info, socks[index], started_writer, drain_timeout),
                kwargs=app_settings,
                name=f"vllm-lite-api-server-{index}",
            )
            front_end.start()
            supervisor.front_ends.append(front_end)
            if supervisor.stopping:  # a signal came while it started
                front_end.terminate()
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR")
        _close(front_ends)
        started_writer.close()
        for listener in socks:  # the front ends accept on their copies; with them gone,
            listener.close()  # connections fail
        return supervisor.watch(started_reader, count, banner)
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        for s, handler in previous.items():
            signal.signal(s, handler)
        supervisor.stop_all()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def reuse_port_sockets(sock: socket.socket, count: int) -> list[socket.socket]:
    """A listening socket per front end: ``sock`` and ``count - 1`` more on its address, when
    ``sock`` has SO_REUSEPORT; the kernel then deals new connections out among them by a hash of
    each connection's addresses. With one socket shared, the front end that woke first took
    every connection waiting (asyncio accepts up to the backlog at once): in bursts of 256
    requests on an H200, the busiest of four front ends used 69-83% of a core and the others
    14-46%; with a socket each, 43-63% (the served throughput did not change with it: the engine
    core bounds it, BENCHMARKS.md). Without SO_REUSEPORT (not Linux): ``sock``, shared."""
    reuse = hasattr(socket, "SO_REUSEPORT")
    if not (reuse and sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)):
        return [sock] * count
    host, port = sock.getsockname()[:2]
    return [sock] + [bind(host, port, reuse_port=True) for _ in range(count - 1)]


class _Supervisor:
    def __init__(self, core, drain_timeout: float) -> None:
        self.core, self.drain_timeout = core, drain_timeout
        self.front_ends: list = []
        self.stopping = False

    def forward(self, sig, frame) -> None:
        """SIGTERM/SIGINT: every front end drains (a second signal: they stop at once)."""
        self.stopping = True
        for front_end in self.front_ends:
            if front_end.exitcode is None:
                with contextlib.suppress(OSError):
                    os.kill(front_end.pid, signal.SIGTERM)

    def watch(self, started, count: int, banner: str) -> int:
        """Until the front ends have stopped: print ``banner`` once they all serve; a process
        that exits unasked stops everything (status 1)."""
        waiting = [started]
        while True:
            live = [p for p in self.front_ends if p.exitcode is None]
            if self.stopping and not live:
                break
            failure = self._failure()
            if failure is not None:
                print(f"vllm-lite serve: {failure}; stopping", file=sys.stderr, flush=True)
                return 1
            ready = wait(waiting + [p.sentinel for p in live + [self.core]], timeout=1.0)
            if started in ready:
                try:
                    started.recv()
                    count -= 1
                except EOFError:  # every front end has exited
                    count = -1
                if count <= 0:
                    waiting = []
                if count == 0:
                    print(banner, flush=True)
        self.core.join(STOP_WAIT_S)  # it stops when every front end has stopped
        bad = [f"{p.name} exit code {p.exitcode}" for p in self.front_ends if not _stopped_ok(p)]
        if self.core.exitcode != 0:
            bad.append(f"the engine core's exit code {self.core.exitcode}")
        if bad:
            print(f"vllm-lite serve: {', '.join(bad)}", file=sys.stderr, flush=True)
            return 1
        return 0

    def _failure(self) -> str | None:
        if self.stopping:
            return None
        for front_end in self.front_ends:
            if front_end.exitcode is not None:
                return f"{front_end.name} exited (exit code {front_end.exitcode})"
        if self.core.exitcode is not None:
            return f"the engine core exited (exit code {self.core.exitcode})"
        return None

    def stop_all(self) -> None:
        """Whatever still runs: the front ends drain, then are killed; then the core."""
        live = [p for p in self.front_ends if p.exitcode is None]
        for front_end in live:
            front_end.terminate()
        for front_end in live:
            front_end.join(self.drain_timeout + 10)
            if front_end.exitcode is None:
                front_end.kill()
                front_end.join()
        self.core.join(STOP_WAIT_S)
        if self.core.exitcode is None:
            self.core.kill()
            self.core.join()


def _stopped_ok(process) -> bool:
    """Exited after a SIGTERM: drained (0), or killed by it before it could drain."""
    return process.exitcode in (0, -signal.SIGTERM)


def _drain_when_orphaned(supervisor: int) -> None:
    """A supervisor killed outright (SIGKILL) forwards no signal: its front ends drain on their
    own, and the core stops after them."""
    while os.getppid() == supervisor:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _close(pairs: list[tuple]) -> None:
    for pair in pairs:
        for connection in pair:
            connection.close()


def run_front_end(
    index: int,
    commands,
    outputs,
    info: EngineInfo,
    sock,
    started,
    drain_timeout: float,
    model_names: list[str],
    api_key: str | None,
    tool_call_parser: str | None,
    log_level: str,
) -> None:
    """A front end's main function: the server of ``vllm-lite serve`` on an attached core."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches it through the supervisor
    threading.Thread(target=_drain_when_orphaned, args=(os.getppid(),), daemon=True).start()
    logging.basicConfig(
        level=getattr(logging, log_level.upper()), format="%(levelname)s %(name)s: %(message)s"
    )
    metrics = ServerMetrics(
        model_names[0],
        multiprocess_dir=os.environ["PROMETHEUS_MULTIPROC_DIR"],
        engine_counters=index == 0,  # every front end hears of them: one counts them
    )
    async_llm = AsyncLLM.attach(commands, outputs, info, metrics)
    app = build_app(async_llm, model_names, api_key, metrics, tool_call_parser)
    server = make_server(
        app, drain_timeout, log_level, ignore_sigint=True, on_started=lambda: started.send(index)
    )
    settle_heap()
    server.run(sockets=[sock])
