"""``vllm-lite serve --api-server-count N``: several front-end processes on one engine core. The
server runs as a real subprocess (the command line), on a tiny random model; the core's
per-front-end bookkeeping is checked with two ``AsyncLLM``s attached to one core."""

from __future__ import annotations

import asyncio
import multiprocessing
import os

import pytest
from tiny_models import make_tiny_model

from vllm_lite import SamplingParams
from vllm_lite.config import EngineConfig
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
        params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)

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
        assert tokens_a < 60 and reason_a == "abort"
        assert (tokens_b, reason_b) == (60, "length")
        core.join(10)
        assert core.exitcode == 0
    finally:
        if core.is_alive():
            core.kill()
            core.join()
