"""The engine core's reports (``LLMEngine(output_processor=False)``, what a server's core runs):
every accepted token once, in rows of flat lists, each finished completion pointing at a row of
its own."""

from __future__ import annotations

import pytest
from tiny_models import make_tiny_model

from vllm_lite import LLM, SamplingParams
from vllm_lite.config import EngineConfig
from vllm_lite.engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("core")))


def test_core_reports_every_token_once_and_each_end_at_its_completions_row(tiny):
    """Completions end on stop tokens on consecutive steps (each one's next row, launched
    already, is void), one is aborted: the reported tokens are the offline engine's."""
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(6)]
    with LLM(model=tiny, device="cpu") as llm:
        free = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
        # request i stops on its (i + 2)-th token (or earlier, where that token came before)
        params = [
            SamplingParams(
                temperature=0, max_tokens=12, stop_token_ids=[r.outputs[0].token_ids[i + 1]]
            )
            for i, r in enumerate(free)
        ]
        params[5] = SamplingParams(temperature=0.8, max_tokens=9, n=2, seed=1, ignore_eos=True)
        reference = llm.generate(prompts, params, use_tqdm=False)
    engine = LLMEngine(EngineConfig(model_path=tiny, device="cpu"), output_processor=False)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(p, sp, request_id=f"r{i}")
    engine.add_request([9, 9, 9], SamplingParams(max_tokens=50, ignore_eos=True), "gone")
    tokens, ends, steps = {}, {}, 0
    while engine.has_unfinished_requests():
        out = engine.core_step()
        steps += 1
        if steps == 3:
            engine.abort_request("gone")
        for request_id, index, ids in out.token_lists:
            tokens.setdefault((request_id, index), []).extend(ids)
        for rid, index, token in zip(out.req_ids, out.indexes, out.token_ids):
            assert (rid, index) not in ends  # nothing after its end
            if token >= 0:
                tokens.setdefault((rid, index), []).append(token)
        for row, reason, _ in out.finished:
            ends[out.req_ids[row], out.indexes[row]] = reason
    engine.close()
    for i, ref in enumerate(reference):
        for c in ref.outputs:
            assert tokens[f"r{i}", c.index] == c.token_ids
            assert ends[f"r{i}", c.index] == c.finish_reason
    assert [ends[f"r{i}", 0] for i in range(5)] == ["stop"] * 5
    assert ends["gone", 0] == "abort" and 0 < len(tokens["gone", 0]) < 50
