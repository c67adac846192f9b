"""``vllm-lite serve --api-server-count N``: several front-end processes on one engine core. The
server runs as a real subprocess (the command line), on a tiny random model; the core's
per-front-end bookkeeping is checked with two ``AsyncLLM``s attached to one core."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI
from tiny_models import make_tiny_model

from vllm_lite import LLM, SamplingParams
from vllm_lite.config import EngineConfig
from vllm_lite.entrypoints import cli, engine_core
from vllm_lite.entrypoints.async_engine import AsyncLLM, wait_until_ready
from vllm_lite.entrypoints.engine_core import run_engine_core
from vllm_lite.worker.tp_executor import pipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = dict(num_blocks=64, block_size=16, max_model_len=256, max_num_seqs=4)
PROMPTS = [
    "The quick brown fox",
    "Paged attention keeps",
    "Continuous batching mixes",
    "Héllo wörld",
    "The lazy dog",
    "KV cache blocks",
    "prefill and decode",
    "emoji and more text",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("api_servers")), "llama")


def start_server(model_path: str, cwd, *flags: str) -> tuple[subprocess.Popen, str]:
    """``vllm-lite serve`` in a session of its own; (process, URL) once it serves."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_lite.entrypoints.cli", "serve", model_path, "--port", "0"]
        + ["--num-blocks", "64", "--max-model-len", "256", "--max-num-seqs", "4"]
        + ["--log-level", "warning", "--served-model-name", "m", *flags],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": REPO, "VLLM_LITE_API_KEY": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.kill()
        raise AssertionError(line + proc.stderr.read())
    return proc, line.split(" on ")[1].split()[0]


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def front_ends(pid: int) -> list[int]:
    """The front-end processes of the server ``pid``: the processes below it that write the
    Prometheus files (the engine core does not)."""
    found = []
    for child in descendants(pid):
        with open(f"/proc/{child}/environ", "rb") as f:
            if b"PROMETHEUS_MULTIPROC_DIR=" in f.read():
                found.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_gone(pids: set[int], timeout: float = 5.0) -> None:
    """Every process of ``pids`` exits within ``timeout`` seconds."""
    deadline = time.time() + timeout
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if alive(pid)]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the supervisor then removes its metrics folder), SIGKILL if that fails."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples (every label set) in a /metrics page."""
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    """(process, URL) of a server with two front ends; the SIGTERM test, last, stops it."""
    proc, url = start_server(model_path, tmp_path_factory.mktemp("cwd"), "--api-server-count", "2")
    yield proc, url
    stop(proc)


def complete_all(url: str, prompts: list[str], max_tokens: int) -> list[str]:
    """Every prompt at once, each on a client (and connection) of its own."""

    def one(prompt: str) -> str:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        out = client.completions.create(
            model="m", prompt=prompt, max_tokens=max_tokens, temperature=0
        )
        return out.choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_two_front_ends_give_the_greedy_text_of_the_offline_engine(model_path, server):
    texts = complete_all(server[1], PROMPTS, max_tokens=12)
    llm = LLM(model_path, **ENGINE)
    try:
        expected = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    finally:
        llm.close()
    assert texts == [out.outputs[0].text for out in expected]


def test_metrics_sum_the_requests_of_every_front_end(server):
    url = server[1]
    before = httpx.get(url + "/metrics").text
    complete_all(url, PROMPTS, max_tokens=5)
    after = httpx.get(url + "/metrics").text
    for name, sent in [
        ("vllm:request_success_total", len(PROMPTS)),
        ("vllm:generation_tokens_total", 5 * len(PROMPTS)),
        ("vllm:e2e_request_latency_seconds_count", len(PROMPTS)),
    ]:
        assert metric(after, name) - metric(before, name) == sent, name
    assert "vllm:num_requests_running{" in after


@pytest.mark.parametrize("value", ["0", "two"])
def test_api_server_count_other_than_auto_or_a_positive_number_is_a_command_line_error(
    capsys, value
):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--api-server-count", value])
    assert exit_.value.code == 2
    assert f"--api-server-count: must be auto or >= 1, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("cpus, count", [(1, 1), (2, 1), (7, 1), (8, 2), (16, 4), (128, 4)])
def test_auto_api_server_count_is_one_front_end_per_4_cpus_from_1_to_4(monkeypatch, cpus, count):
    from vllm_lite.entrypoints.openai_server import auto_api_server_count

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert auto_api_server_count() == count


def test_a_front_end_that_stops_aborts_only_its_own_requests(model_path):
    """Two front ends on one core: the first stops while both have a request running; the
    second's request runs to the end; the core exits once the second stops too."""
    ends = {name: (pipe(), pipe()) for name in "ab"}  # (commands, outputs), each (reader, writer)
    core_ends = [(commands[0], outputs[1]) for commands, outputs in ends.values()]
    core = multiprocessing.get_context("spawn").Process(
        target=run_engine_core, args=(EngineConfig(model_path=model_path, **ENGINE), core_ends)
    )
    core.start()
    for pair in core_ends:
        for connection in pair:
            connection.close()
    try:
        front = {name: (commands[1], outputs[0]) for name, (commands, outputs) in ends.items()}
        info = wait_until_ready(front["a"][1], core)
        wait_until_ready(front["b"][1], core)
        a = AsyncLLM.attach(*front["a"], info)
        b = AsyncLLM.attach(*front["b"], info)
        params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)

        async def run(llm: AsyncLLM, prompt: list[int]) -> tuple[int, str | None]:
            tokens, reason = 0, None
            try:
                async for delta in llm.generate(prompt, params):
                    tokens += len(delta.outputs[0].token_ids)
                    reason = delta.outputs[0].finish_reason
            except RuntimeError as exc:  # the engine is not running (for a)
                reason = type(exc).__name__
            return tokens, reason

        async def main():
            a.start()
            b.start()
            running_a = asyncio.ensure_future(run(a, [5, 6, 7]))
            running_b = asyncio.ensure_future(run(b, [8, 9, 10]))
            while a.engine_state.num_running < 2:
                await asyncio.sleep(0.005)
            await a.shutdown(timeout=10)
            done_a = await running_a
            assert core.is_alive() and b.is_running and not a.is_running
            done_b = await running_b
            await b.shutdown(timeout=10)
            return done_a, done_b

        (tokens_a, reason_a), (tokens_b, reason_b) = asyncio.run(main())
        assert tokens_a < 100 and reason_a == "abort"
        assert (tokens_b, reason_b) == (100, "length")
        core.join(10)
        assert core.exitcode == 0
    finally:
        if core.is_alive():
            core.kill()
            core.join()


def _core_then_report_switch_interval(config, clients, report) -> None:
    run_engine_core(config, clients)  # the engine fails to start: it reports that and returns
    report.send(sys.getswitchinterval())


def test_the_core_process_lets_its_threads_take_the_gil_within_half_a_millisecond(
    tmp_path, monkeypatch
):
    """The command threads wait at most 0.5 ms for the GIL the loop holds (at the default 5 ms
    a burst of requests reached a host-bound loop several times slower)."""

    def engine_that_fails(*args, **kwargs):
        raise RuntimeError("no engine in this test")

    monkeypatch.setattr(engine_core, "LLMEngine", engine_that_fails)
    commands, outputs, report = pipe(), pipe(), pipe()
    core = multiprocessing.get_context("fork").Process(
        target=_core_then_report_switch_interval,
        args=(EngineConfig(model_path=str(tmp_path)), [(commands[0], outputs[1])], report[1]),
    )
    core.start()
    try:
        assert outputs[0].recv()[:2] == ("failed", "RuntimeError")
        assert report[0].recv() == engine_core.SWITCH_INTERVAL_S == 0.0005
    finally:
        core.join(30)
    assert sys.getswitchinterval() == 0.005  # this process (the front end's side) keeps its own


def test_the_loop_writes_a_step_message_itself_when_the_front_ends_pipe_has_room():
    (reader, writer), (reader_b, writer_b) = pipe(), pipe()
    core = engine_core.EngineCore(None, [writer, writer_b])
    core._send(("step", [1, 2, 3]), (0, 1))
    assert core.outbox.empty() and core.handed == [0, 0]
    assert reader.recv() == reader_b.recv() == ("step", [1, 2, 3])


def test_a_message_the_pipe_cannot_take_goes_to_the_output_thread_and_later_ones_follow_it():
    """The loop never waits for a front end to read: what does not fit its pipe (and everything
    after it, to keep the order) is written by the output thread."""
    (reader, writer), (reader_b, writer_b) = pipe(), pipe()
    core = engine_core.EngineCore(None, [writer, writer_b])
    big = ("step", b"x" * (core.pipe_sizes[0] + 1))
    core._send(big, (0,))
    core._send(("step", "small"), (0, 1))  # fits, but must not overtake the big one
    assert core.handed == [2, 0]  # the other front end got it at once
    assert reader_b.recv() == ("step", "small")
    sender = threading.Thread(target=core.send_outputs)
    sender.start()
    assert reader.recv() == big and reader.recv() == ("step", "small")
    core.outbox.put(None)
    sender.join(10)
    assert core.written == core.handed == [2, 0]


def test_a_front_end_that_dies_stops_the_server_with_status_1(model_path, tmp_path):
    proc, _ = start_server(model_path, tmp_path, "--api-server-count", "2")
    try:
        children, killed = descendants(proc.pid), front_ends(proc.pid)
        assert len(killed) == 2
        os.kill(killed[0], signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
        assert "vllm-lite-api-server-" in proc.stderr.read()
        assert_gone(children)
    finally:
        stop(proc)


# last: it stops the module's server
def test_sigterm_drains_every_front_end_then_exits_0_leaving_no_process(server):
    proc, url = server
    try:
        children = descendants(proc.pid)
        assert len(children) >= 3  # two front ends and the engine core
        body = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 200, "temperature": 0}
        body |= {"ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert '"completion_tokens":200' in events[-2]  # the running request finished
        assert proc.wait(timeout=30) == 0
        assert "draining" in proc.stderr.read()
        assert_gone(children)
    finally:
        stop(proc)


def test_sequential_tokenizers_turns_the_pool_off_unless_the_user_chose(monkeypatch):
    from vllm_lite.entrypoints.openai_server import sequential_tokenizers

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    sequential_tokenizers()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    sequential_tokenizers()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="SO_REUSEPORT: Linux")
def test_each_front_end_socket_accepts_some_connections_to_the_one_address():
    """A socket per front end on one address: the kernel spreads connections over all of them
    (a front end no longer takes a whole burst). 60 connections over 3 sockets: every socket
    gets some (a socket left out has odds of 3 x (2/3)^60 ~ 1e-10)."""
    from vllm_lite.entrypoints.api_servers import reuse_port_sockets
    from vllm_lite.entrypoints.openai_server import bind

    socks = reuse_port_sockets(bind("127.0.0.1", 0, reuse_port=True), 3)
    clients = []
    try:
        assert len({s.fileno() for s in socks}) == 3
        assert len({s.getsockname() for s in socks}) == 1
        clients = [socket.create_connection(socks[0].getsockname()) for _ in range(60)]
        accepted = []
        for s in socks:
            s.setblocking(False)
            count = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    s.accept()[0].close()
                    count += 1
            accepted.append(count)
        assert sum(accepted) == 60 and min(accepted) > 0, accepted
    finally:
        for c in clients + socks:
            c.close()


def test_a_socket_without_reuse_port_is_shared_by_every_front_end():
    from vllm_lite.entrypoints.api_servers import reuse_port_sockets
    from vllm_lite.entrypoints.openai_server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert reuse_port_sockets(sock, 3) == [sock, sock, sock]
    finally:
        sock.close()


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="SO_REUSEPORT: Linux")
def test_a_second_server_on_a_port_in_use_fails_instead_of_sharing_its_connections():
    from vllm_lite.entrypoints.openai_server import bind_server

    first = bind_server("127.0.0.1", 0, reuse_port=True)
    try:
        with pytest.raises(OSError):
            bind_server("127.0.0.1", first.getsockname()[1], reuse_port=True).close()
    finally:
        first.close()
