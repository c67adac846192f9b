"""An engine's memory is freed when its last reference goes: no reference cycle keeps the
model, the KV pool or the runner alive until the garbage collector runs (in a notebook or a
script that builds one ``LLM`` after another, the second would find the GPU still full)."""

from __future__ import annotations

import gc
import types
import weakref

import pytest
import torch
from tiny_models import make_tiny_model

from vllm_lite import LLM, SamplingParams
from vllm_lite.layers.moe import FusedMoE
from vllm_lite.worker.model_runner import bytes_held_by_other_engines

GREEDY = SamplingParams(max_tokens=4, temperature=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("lifetime")))


def _generate_and_drop(path: str, **config) -> list[weakref.ref]:
    """Build an LLM, generate (penalties and logprobs too), return weak references to its parts."""
    llm = LLM(path, max_model_len=128, **config)
    params = SamplingParams(max_tokens=4, temperature=0, repetition_penalty=1.2, logprobs=2)
    llm.generate([[1, 2, 3], [4, 5]], [GREEDY, params], use_tqdm=False)
    runner = llm.engine.runner
    parts = [llm, llm.engine, runner, runner.model, runner.kv_cache]
    return [weakref.ref(p) for p in parts]


def test_dropped_llm_is_freed_at_once_without_the_garbage_collector(tiny):
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            refs = _generate_and_drop(tiny)
            alive = [type(r()).__name__ for r in refs if r() is not None]
            assert alive == [], f"kept alive by a reference cycle: {alive}"
    finally:
        gc.enable()


def test_dropped_moe_llm_is_freed_at_once_without_the_garbage_collector(tmp_path):
    """The stacked experts' loader is the FusedMoE module's: none is stored on a parameter."""
    path = make_tiny_model(str(tmp_path), arch="qwen3_moe")
    llm = LLM(path, max_model_len=128)
    llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    experts = [m for m in llm.engine.runner.model.modules() if isinstance(m, FusedMoE)]
    assert experts
    refs = [weakref.ref(x) for m in experts for x in (m, m.w13, m.w2)]
    gc.collect()
    gc.disable()
    try:
        del llm, experts
        alive = [type(r()).__name__ for r in refs if r() is not None]
        assert alive == [], f"kept alive by a reference cycle: {alive}"
    finally:
        gc.enable()


def test_with_statement_frees_the_engine_on_exit(tiny):
    with LLM(tiny, max_model_len=128) as llm:
        assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        runner = llm.engine.runner
    assert runner.model is None and runner.kv_cache is None


def test_memory_of_live_engines_is_counted_until_they_are_dropped(tiny):
    # small pools: at the default gpu_memory_utilization the first would leave the second none
    first = LLM(tiny, max_model_len=128, num_blocks=64)
    # engines other tests left alive in this process (seen on the H200: 7 MB) are not ours
    before = bytes_held_by_other_engines(first.engine.runner)
    second = LLM(tiny, max_model_len=128, num_blocks=64)
    held = first.engine.runner.device_bytes()
    assert held > first.engine.runner.kv_cache.nbytes > 0
    assert bytes_held_by_other_engines(second.engine.runner) == before + held
    del first
    assert bytes_held_by_other_engines(second.engine.runner) == before
    second.close()


def test_an_engine_that_fails_to_start_holds_no_memory_through_its_traceback(tiny):
    """A start that fails after the weights are loaded (here: a KV pool too large to exist; on
    a GPU, no room left or a failed graph capture) leaves an exception whose traceback keeps
    the half-built engine: its weights must be released all the same."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe = types.SimpleNamespace(device=device)  # counts every engine on that device
    before = bytes_held_by_other_engines(probe)
    with pytest.raises(RuntimeError) as failed:
        LLM(tiny, max_model_len=128, num_blocks=2**50)
    assert failed.traceback  # still held here
    assert bytes_held_by_other_engines(probe) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_build_and_drop_ten_engines_in_one_process_on_the_gpu(tiny):
    """Each engine sizes its KV pool to most of the GPU (gpu_memory_utilization 0.9): one
    left alive would leave the next no room."""
    for _ in range(10):
        refs = _generate_and_drop(tiny, max_num_seqs=8, max_num_batched_tokens=256)
        assert all(r() is None for r in refs)
