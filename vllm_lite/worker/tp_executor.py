"""Tensor parallelism over torch.distributed: rank 0 lives in the engine process (it schedules,
prepares each step and samples); ranks 1..tp-1 are worker processes started with spawn. Every
rank builds its own ModelRunner under ``set_tp(rank, tp)``, so it loads only its slices of the
weights and holds only its KV heads of the paged pool (the block manager stays on rank 0).

Each step rank 0 sends the ``StepInput`` (numpy arrays) down one pipe per worker and runs the
model itself; the collectives inside the layers keep the ranks in lock step, and rank 0 returns
its logits. Workers answer setup calls and report errors on their own result pipe.

Failures: a worker that raises sends its traceback, then exits; a worker that dies closes its
sockets, so the collective rank 0 waits in fails at once (gloo), or at the latest after
``VLLM_LITE_TP_TIMEOUT`` seconds (default 30). A monitor thread also stops the remaining
workers as soon as one is dead, so no rank waits forever on another. The engine then raises a
RuntimeError naming the rank and the cause. Workers exit on their own when the engine process
disappears (their command pipe ends, and a watchdog thread polls the parent pid) and ignore
Ctrl-C, which rank 0 handles.

Shutdown: rank 0 sends "stop" and every rank, rank 0 included, at the same time drops its CUDA
graphs and leaves the process group (``leave_process_group``); a worker then exits at once.
Plain pipes, not multiprocessing queues: a queue has a feeder thread that exit may wait on,
named semaphores that leak ("leaked semaphore objects") when its process ends without its exit
handlers, and a lock inside ``put`` that a Ctrl-C landing right after its acquisition leaves
held, after which closing the queue deadlocks (a hang after Ctrl-C). Each pipe here has one
writer and one reader, so it needs none of these.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import signal
import sys
import threading
import time
import traceback
import warnings
import weakref
from multiprocessing import connection as mp_connection
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_lite.config import EngineConfig
from vllm_lite.parallel_state import set_tp, tp_rank, tp_size
from vllm_lite.worker.model_runner import ModelRunner, StepInput, resolve_device

TIMEOUT_ENV = "VLLM_LITE_TP_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
_ERROR_EXIT = 3  # a worker's exit code after it reported an exception on its result pipe
_POLL_S = 0.1
PIPE_BYTES = 1 << 20  # a step's message fits whole: sending it does not wait for the reader
_TEARDOWN_S = 15.0  # the longest rank 0 waits for its process group's teardown
_MAX_TRACEBACK = 32_000  # a worker's traceback fits in a pipe even where it cannot be enlarged


def check_tp_split(hf_config, tp: int) -> None:
    """ValueError naming every dimension of the model that ``tp`` ranks cannot split."""
    if tp <= 1:
        return
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    problems = []
    if heads % tp:
        problems.append(f"num_attention_heads ({heads}) is not divisible by {tp}")
    if kv_heads % tp and tp % kv_heads:
        problems.append(
            f"num_key_value_heads ({kv_heads}) neither divides nor is divisible by {tp}"
        )
    for field in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        size = getattr(hf_config, field, None)
        if size and size % tp:
            problems.append(f"{field} ({size}) is not divisible by {tp}")
    if problems:
        raise ValueError(
            f"tensor_parallel_size {tp} cannot split this model: " + "; ".join(problems)
        )


def tp_timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds (tied weights counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@contextlib.contextmanager
def _as_rank(rank: int, size: int):
    """Rank 0 shares its process with the engine (and maybe other, single-device engines):
    the tensor-parallel state is set only while rank 0 builds or runs its model."""
    saved = tp_rank(), tp_size()
    try:  # set inside the try: a Ctrl-C right after it still restores the state
        set_tp(rank, size)
        yield
    finally:
        set_tp(*saved)


def _threads_per_rank(tp: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // tp)


def pipe() -> tuple:
    """(reader, writer) of a one-way pipe, enlarged where Linux allows it (also the server's
    pipes to its engine process)."""
    reader, writer = mp.Pipe(duplex=False)
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or over the user's pipe quota
        fcntl.fcntl(writer.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    return reader, writer


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def leave_process_group(runner: ModelRunner | None, graceful: bool) -> None:
    """Leave the process group: drop this rank's CUDA graphs first, then destroy the group (abort
    it if a step may be stuck mid-collective). On H100s, NCCL's destroy and abort both hung for
    good while graphs that captured its all-reduces were alive (freed first: 0.01 s and 0.55 s),
    and a rank that tears down after its peers have exited blocks too (NVIDIA/nccl#863), so every
    rank calls this when rank 0 stops the group. Gloo's destroy is local."""
    if not dist.is_initialized():
        return
    if runner is not None:
        runner.drop_cuda_graphs()
    if dist.get_backend() == "nccl":
        if graceful:
            torch.cuda.synchronize()  # nothing is stuck: let the last step finish
            dist.destroy_process_group()
        else:
            dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()


# ---- worker side (top-level: spawn imports this module in the child) ---------------------------
def _parent_watchdog(parent_pid: int) -> None:
    """Exit as soon as the engine process is gone (we get re-parented)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(0.5)


def _exit_now(code: int) -> None:
    """End this worker without the interpreter's teardown: nothing is left to clean up (rank 0's
    pipes get EOF, the kernel frees the rest), and tearing down torch takes seconds on a busy
    machine, which rank 0 would wait for before it could exit itself."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _worker_main(
    rank: int,
    tp: int,
    store_port: int,
    backend: str,
    timeout_s: float,
    config: EngineConfig,
    hf_config,
    model_path: str | None,
    commands,
    results,
    parent_pid: int,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it stops us
    threading.Thread(
        target=_parent_watchdog, args=(parent_pid,), daemon=True, name="parent-watchdog"
    ).start()
    try:
        results.send(("started", os.getpid()))
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(_threads_per_rank(tp))
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", store_port, tp, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=tp, timeout=timeout)
        set_tp(rank, tp)
        runner = ModelRunner(config, hf_config, model_path, device)
        results.send(("ready", param_bytes(runner.model)))
        while True:
            try:
                cmd, *args = commands.recv()
            except EOFError:  # the engine process is gone
                _exit_now(1)
            if cmd == "step":
                runner.execute(*args)
            elif cmd == "measure":
                results.send(("ok", runner.default_num_blocks()))
            elif cmd == "allocate":
                runner.allocate_kv_cache(*args)
                results.send(("ok", None))
            elif cmd == "stop":
                graceful = args[0]
                break
            else:
                raise ValueError(f"unknown command {cmd!r}")
        leave_process_group(runner, graceful)
    except BaseException:
        # send() returns once the traceback is in the pipe, i.e. before our sockets close
        with contextlib.suppress(OSError):  # the engine process is gone
            results.send(("error", time.time(), traceback.format_exc()[-_MAX_TRACEBACK:]))
        _exit_now(_ERROR_EXIT)
    _exit_now(0)


# ---- rank 0 side ---------------------------------------------------------------------------
class _WorkerDied(Exception):
    pass


class _Workers:
    """The worker processes, their pipes and rank 0's process group. Holds no reference to
    the executor, so ``weakref.finalize`` can shut it down when the executor is collected."""

    def __init__(self, backend: str, timeout_s: float) -> None:
        self.backend, self.timeout_s = backend, timeout_s
        self.procs: list = []  # index i is rank i + 1
        self.commands: list = []  # rank 0's ends of the pipes, index i is rank i + 1
        self.results: list = []
        self.lock = threading.RLock()
        self.stopping = False  # processes are being or have been stopped: deaths are expected
        self.released = False
        self.killed_by_us: set[int] = set()
        self.errors: dict[int, tuple[float, str]] = {}  # rank -> (time, traceback text)
        self.owns_process_group = False
        self.monitor_stop = threading.Event()
        self.teardown: threading.Thread | None = None  # rank 0 leaving the process group
        self.runner = None  # weak reference to rank 0's ModelRunner (its graphs go first)

    # -- liveness --------------------------------------------------------------------------
    def dead_ranks(self) -> list[int]:
        with self.lock:
            return [r for r, p in enumerate(self.procs, 1) if not p.is_alive()]

    def wait_for_a_death(self, timeout: float) -> None:
        """Wait until some worker has exited (or ``timeout``), and let it be reaped."""
        if any(p.exitcode is not None for p in self.procs):
            return
        ready = mp_connection.wait([p.sentinel for p in self.procs], timeout)
        deadline = time.monotonic() + 1.0  # its fds close a moment before it can be reaped
        while ready and all(p.exitcode is None for p in self.procs) and time.monotonic() < deadline:
            time.sleep(0.005)

    def start_monitor(self) -> None:
        threading.Thread(target=self._monitor, daemon=True, name="vllm-lite-tp-monitor").start()

    def _monitor(self) -> None:
        while not self.monitor_stop.wait(0.25):
            if self.stopping:
                return
            if self.dead_ranks():
                # The group is broken: stop the others too, so that no rank (rank 0 included)
                # stays blocked in a collective waiting for the dead one. Gloo then fails rank
                # 0's pending collective at once (its peers' sockets close); an NCCL kernel
                # would wait for its timeout, so stop_processes aborts the communicators.
                self.stop_processes(graceful=False)
                return

    # -- messages --------------------------------------------------------------------------
    def recv(self, rank: int):
        """The next message from ``rank``; _WorkerDied if it reported an error or died."""
        conn, proc = self.results[rank - 1], self.procs[rank - 1]
        while not conn.poll(_POLL_S):
            if not proc.is_alive() or self.stopping:
                raise _WorkerDied(rank)
        try:
            msg = conn.recv()
        except EOFError:  # it exited
            raise _WorkerDied(rank) from None
        if msg[0] == "error":
            self.errors[rank] = (msg[1], msg[2])
            raise _WorkerDied(rank)
        return msg

    def recv_all(self, expected: str) -> list:
        values = []
        for rank in range(1, len(self.procs) + 1):
            kind, value = self.recv(rank)
            if kind != expected:
                raise RuntimeError(
                    f"tensor-parallel rank {rank} answered {kind!r}, expected {expected!r}"
                )
            values.append(value)
        return values

    def send_all(self, *msg) -> None:
        data = ForkingPickler.dumps(
            msg
        )  # pickled once for every rank (what conn.send does per call)
        for rank, conn in enumerate(self.commands, 1):
            try:
                conn.send_bytes(data)
            except OSError:  # EPIPE: it exited
                raise _WorkerDied(rank) from None

    # -- shutdown ------------------------------------------------------------------------------
    def stop_processes(self, graceful: bool, join_s: float = 5.0) -> None:
        """Stop the workers: "stop" and a wait for them to exit, then SIGTERM, then SIGKILL.
        Ungraceful (a failure, Ctrl-C) skips the wait, except with NCCL: its ranks must abort
        together, so the workers get "stop" (they leave the group and exit) while rank 0 leaves
        it in a thread (``release`` bounds the wait for it)."""
        with self.lock:
            if self.stopping and graceful:
                return
            self.stopping = True
            self.monitor_stop.set()
            nccl = self.backend == "nccl" and self.owns_process_group
            if not graceful:  # they were alive and had not finished the step: we stop them
                self.killed_by_us.update(
                    r
                    for r, p in enumerate(self.procs, 1)
                    if p.is_alive() and not mp_connection.wait([p.sentinel], 0)
                )
            if graceful or nccl:
                for conn in self.commands:
                    # Never wait on a worker that does not read: a message this small is written
                    # whole or not at all, and a worker that misses it is terminated below.
                    with contextlib.suppress(OSError):
                        os.set_blocking(conn.fileno(), False)
                        conn.send(("stop", graceful))
                if nccl:
                    self._start_teardown(graceful)
                deadline = time.monotonic() + join_s
                for p in self.procs:
                    p.join(max(0.0, deadline - time.monotonic()))
            for rank, p in enumerate(self.procs, 1):
                if p.is_alive():
                    if not mp_connection.wait([p.sentinel], 0):  # not already on its way out
                        self.killed_by_us.add(rank)
                    p.terminate()
            deadline = time.monotonic() + 1.0
            for p in self.procs:
                p.join(max(0.0, deadline - time.monotonic()))
            for p in self.procs:
                if p.is_alive():  # stopped (SIGSTOP) or ignoring SIGTERM
                    p.kill()
                    p.join()

    def _start_teardown(self, graceful: bool) -> None:
        if self.teardown is None and self.owns_process_group:
            runner = self.runner() if self.runner is not None else None

            def leave() -> None:
                with contextlib.suppress(Exception):
                    leave_process_group(runner, graceful)

            self.teardown = threading.Thread(
                target=leave, daemon=True, name="vllm-lite-tp-teardown"
            )
            self.teardown.start()

    def diagnose(self, exc: BaseException | None) -> str:
        """Why the group broke, naming the rank: a worker that died without a word first, then
        the earliest worker traceback, else rank 0's own exception."""
        with self.lock:
            for rank, p in enumerate(self.procs, 1):
                if rank in self.errors or p.exitcode != _ERROR_EXIT:
                    continue
                # It exited after sending its traceback: read it (its pipe holds it).
                with contextlib.suppress(EOFError, OSError):
                    while self.results[rank - 1].poll(0):
                        msg = self.results[rank - 1].recv()
                        if msg[0] == "error":
                            self.errors[rank] = (msg[1], msg[2])
                            break
            died = [
                (r, p.exitcode)
                for r, p in enumerate(self.procs, 1)
                if p.exitcode is not None and r not in self.killed_by_us and r not in self.errors
            ]
        if died:
            rank, code = died[0]
            return f"tensor-parallel worker rank {rank} died unexpectedly ({_describe_exit(code)})"
        if self.errors:
            rank, (_, text) = min(self.errors.items(), key=lambda item: item[1][0])
            last = text.strip().splitlines()[-1] if text.strip() else "unknown error"
            return (
                f"tensor-parallel worker rank {rank} failed: {last}\n\n"
                f"rank {rank} traceback:\n{text}"
            )
        if exc is not None:
            hint = ""
            if self.killed_by_us:
                hint = (
                    f" (ranks {sorted(self.killed_by_us)} were alive but did not finish the step; "
                    f"collectives time out after {TIMEOUT_ENV}={self.timeout_s:g} s)"
                )
            return f"tensor-parallel rank 0 failed: {type(exc).__name__}: {exc}{hint}"
        return "tensor-parallel group failed for an unknown reason"

    def release(self) -> None:
        with self.lock:
            if self.released:
                return
            self.released = True
            for conn in self.commands + self.results:
                conn.close()
            if self.owns_process_group and dist.is_initialized():
                self._start_teardown(graceful=not self.killed_by_us)
                self.teardown.join(_TEARDOWN_S)
                if self.teardown.is_alive():  # a rank died mid-collective: NCCL may never return
                    warnings.warn(
                        f"tensor parallelism: the process group's teardown did not finish in "
                        f"{_TEARDOWN_S:g} s; this process cannot start another tensor-parallel "
                        "engine",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            self.owns_process_group = False

    def shutdown(self, graceful: bool = True) -> None:
        self.stop_processes(graceful)
        self.release()


class TPExecutor:
    """Drop-in for ModelRunner in the engine (``device``, ``dtype``, ``num_blocks``,
    ``prepare``, ``execute``, ``close``) that runs the model over ``tensor_parallel_size``
    ranks."""

    def __init__(self, config: EngineConfig, hf_config, model_path: str | None) -> None:
        tp = self.tp_size = config.tensor_parallel_size
        check_tp_split(hf_config, tp)
        device = resolve_device(config)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and torch.cuda.device_count() < tp:
            raise ValueError(
                f"tensor_parallel_size {tp} needs {tp} CUDA devices, "
                f"found {torch.cuda.device_count()}"
            )
        if dist.is_available() and dist.is_initialized():
            raise RuntimeError(
                "a torch.distributed process group already exists in this process; "
                "close the other tensor-parallel engine first"
            )
        self.backend = backend
        self.device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
        self.timeout_s = tp_timeout_s()
        self.failure: str | None = None
        self._workers = workers = _Workers(backend, self.timeout_s)
        self._finalizer = weakref.finalize(self, workers.shutdown)  # also runs at interpreter exit
        self._closed = False
        self._building_own_model = False
        try:
            self._start(config, hf_config, model_path)
        except Exception as e:
            worker_trouble = isinstance(e, _WorkerDied) or workers.errors or workers.dead_ranks()
            if worker_trouble and not self._building_own_model:
                raise self._fail(e, starting=True) from None  # a worker failed to start: name it
            self.close(graceful=False)
            raise  # rank 0's own error (e.g. a bad checkpoint) as it is
        except BaseException:  # Ctrl-C while starting
            self.close(graceful=False)
            raise

    def _start(self, config: EngineConfig, hf_config, model_path: str | None) -> None:
        tp, workers = self.tp_size, self._workers
        timeout = datetime.timedelta(seconds=self.timeout_s)
        # Rank 0 hosts the rendezvous store on a port the OS picks: no race for a free port.
        store = dist.TCPStore(
            "127.0.0.1", 0, tp, is_master=True, wait_for_workers=False, timeout=timeout
        )
        ctx = mp.get_context("spawn")
        for rank in range(1, tp):
            (commands_out, commands_in), (results_out, results_in) = pipe(), pipe()
            proc = ctx.Process(
                target=_worker_main,
                name=f"vllm-lite-tp-rank{rank}",
                daemon=True,
                args=(
                    rank,
                    tp,
                    store.port,
                    self.backend,
                    self.timeout_s,
                    config,
                    hf_config,
                    model_path,
                    commands_out,
                    results_in,
                    os.getpid(),
                ),
            )
            workers.commands.append(commands_in)
            workers.results.append(results_out)
            try:
                proc.start()
            finally:
                # The worker has its own copies now: with ours closed, a pipe ends (EOF, EPIPE)
                # exactly when the process at its other end is gone.
                commands_out.close()
                results_in.close()
            workers.procs.append(proc)
        self.worker_pids = [p.pid for p in workers.procs]
        workers.recv_all("started")  # imports done; a worker that cannot start fails here
        if self.backend == "nccl":
            torch.cuda.set_device(self.device)
        dist.init_process_group(self.backend, store=store, rank=0, world_size=tp, timeout=timeout)
        workers.owns_process_group = True
        workers.start_monitor()
        self._building_own_model = True
        with _as_rank(0, tp):
            self.runner = ModelRunner(config, hf_config, model_path, self.device)
        self._building_own_model = False
        self.dtype = self.runner.dtype
        workers.runner = weakref.ref(self.runner)
        self.rank_weight_bytes = [param_bytes(self.runner.model)] + workers.recv_all("ready")
        if config.num_blocks is None:
            workers.send_all("measure")
            with _as_rank(0, tp):  # on CUDA this runs a warm-up step: every rank joins it
                own = self.runner.default_num_blocks()
            num_blocks = min([own] + workers.recv_all("ok"))
        else:
            num_blocks = config.num_blocks
        workers.send_all("allocate", num_blocks)
        with _as_rank(0, tp):  # on CUDA this captures graphs of decode steps: collectives again
            self.runner.allocate_kv_cache(num_blocks)
        workers.recv_all("ok")
        self.num_blocks = num_blocks

    # ---- one step ------------------------------------------------------------------------
    def prepare(self, batch) -> StepInput:
        return self.runner.prepare(batch)

    def execute(self, step: StepInput) -> torch.Tensor:
        if self.failure is not None:
            raise RuntimeError(self.failure)
        if self._closed:
            raise RuntimeError("the tensor-parallel executor is closed")
        if self._workers.stopping or self._workers.dead_ranks():  # the monitor saw a rank die
            raise self._fail(None)
        try:
            self._workers.send_all("step", step)
            with _as_rank(0, self.tp_size):
                return self.runner.execute(step)
        except KeyboardInterrupt:
            # Interrupted mid-step: the workers wait in a collective rank 0 will never join.
            self.close(graceful=False)
            raise
        except Exception as e:
            raise self._fail(e) from e

    def _fail(self, exc: BaseException | None, starting: bool = False) -> RuntimeError:
        workers = self._workers
        if not workers.errors:
            # A peer that was killed closes its sockets and pipes a moment before it can be
            # reaped. Give it that moment, so the rank that died is named, not rank 0.
            workers.wait_for_a_death(timeout=2.0)
        workers.stop_processes(graceful=False)
        self.failure = workers.diagnose(exc if not isinstance(exc, _WorkerDied) else None)
        if starting and not workers.errors:  # died before it could report anything
            self.failure += (
                "\n(while starting the workers; its own output above may say more. A script "
                'that starts a tensor-parallel engine needs an `if __name__ == "__main__":` guard, '
                "since workers are spawned and re-import the main module)"
            )
        workers.release()
        self._finalizer.detach()
        return RuntimeError(self.failure)

    def close(self, graceful: bool = True) -> None:
        """Stop the workers, tear down the process group and free rank 0's weights and KV pool."""
        self._closed = True
        if self._finalizer.alive:
            self._finalizer.detach()
            self._workers.shutdown(graceful)
        runner = getattr(self, "runner", None)
        if runner is not None and getattr(runner, "close", None) is not None:
            runner.close()

    @property
    def alive(self) -> bool:
        return self.failure is None and not self._closed and not self._workers.stopping
