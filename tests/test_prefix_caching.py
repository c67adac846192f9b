"""Prefix caching end to end (a tiny fp32 model on CPU): a request that shares a prefix with an
earlier one computes only its suffix and says so in ``num_cached_tokens``, and every output with
caching on equals the output with caching off: chunked prefill, preemption, n > 1, aborts, and
a prompt found cached whole (its last token is computed again, for the first token's logits)."""

from collections import Counter

import pytest
from tiny_models import make_tiny_model, prompts_of_lengths, record_chunked_prefills

from vllm_lite import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
BS = 16


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("llama")), "llama")


def make(path, caching, **config):
    return LLM(
        path,
        dtype="float32",
        enable_prefix_caching=caching,
        **{"block_size": BS, "num_blocks": 160, **config},
    )


def count_computed_tokens(engine) -> Counter:
    """request id -> tokens run through the model for it (prefill and decode), as scheduled."""
    counts, schedule = Counter(), engine.scheduler.schedule

    def spy():
        batch = schedule()
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            counts[seq.request_id] += n
        return batch

    engine.scheduler.schedule = spy
    return counts


def token_ids(outputs):
    return [[c.token_ids for c in out.outputs] for out in outputs]


def on_and_off(path, rounds, params=GREEDY, watch=None, **config):
    """Generate each round of prompts in turn with caching on, then off, and check that the
    tokens are the same and no block leaked. Returns the outputs on and off (a list per round),
    the engine with caching on, and what ``watch(engine)`` gave for it."""
    outputs, engine, watched = {}, None, None
    for caching in (True, False):
        llm = make(path, caching, **config)
        if caching:
            engine, watched = llm.engine, watch(llm.engine) if watch else None
        outputs[caching] = [llm.generate(prompts, params, use_tqdm=False) for prompts in rounds]
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts), "blocks leaked"
    assert [token_ids(r) for r in outputs[True]] == [token_ids(r) for r in outputs[False]]
    return outputs[True], outputs[False], engine, watched


def shared_prefix_prompts(prefix_len, suffix_lens, seed=0):
    prefix, *suffixes = prompts_of_lengths([prefix_len, *suffix_lens], 400, seed=seed)
    return [prefix + s for s in suffixes]


def test_a_request_sharing_a_1000_token_prefix_computes_only_its_suffix(path):
    first, second = shared_prefix_prompts(1000, [3, 5], seed=1)
    on, off, engine, counts = on_and_off(path, [[first], [second]], watch=count_computed_tokens)
    cached = 1000 // BS * BS  # 62 full blocks; the 63rd holds suffix tokens too
    assert [r[0].num_cached_tokens for r in on] == [0, cached]
    assert [r[0].num_cached_tokens for r in off] == [0, 0]
    decode = GREEDY.max_tokens - 1
    assert [counts[r[0].request_id] for r in on] == [
        len(first) + decode,
        len(second) - cached + decode,
    ]
    assert (engine.prefix_cache_queries, engine.prefix_cache_hits) == (
        len(first) + len(second),
        cached,
    )


def test_requests_admitted_together_each_compute_the_prefix_and_a_later_one_finds_it(path):
    prompts = shared_prefix_prompts(40, [2, 7, 9], seed=2)
    on, *_ = on_and_off(path, [prompts[:2], prompts[2:]])
    assert [o.num_cached_tokens for o in on[0]] == [0, 0]
    assert on[1][0].num_cached_tokens == 32


def test_chunked_prefill_starts_after_the_cached_prefix(path):
    prompts = shared_prefix_prompts(100, [10, 30, 45], seed=3)
    on, _, _, chunked = on_and_off(
        path, [prompts[:1], prompts[1:]], watch=record_chunked_prefills, max_num_batched_tokens=24
    )
    assert [o.num_cached_tokens for o in on[1]] == [96, 96]
    assert any(s.num_cached_tokens for s in chunked), (
        "no prompt was chunked after its cached prefix"
    )


def test_preempted_requests_recompute_through_the_cache_with_the_same_tokens(path):
    prompts = shared_prefix_prompts(40, [5, 9, 13, 3, 20, 7], seed=4)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    on, _, engine, _ = on_and_off(path, [prompts[:1], prompts[1:]], params, num_blocks=14)
    assert engine.scheduler.num_preemptions > 0
    assert all(o.num_cached_tokens == 32 for o in on[1])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(n=3, temperature=0, max_tokens=8, ignore_eos=True),
        SamplingParams(n=3, seed=5, max_tokens=8, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_n_completions_of_a_cached_prefix_equal_caching_off(path, params):
    prompts = shared_prefix_prompts(37, [1, 12, 30], seed=5)
    on, *_ = on_and_off(path, [prompts[:1], prompts[1:]], params)
    assert [o.num_cached_tokens for o in on[1]] == [32, 32]
    assert all(len(o.outputs) == 3 for r in on for o in r)


def test_an_aborted_requests_blocks_stay_cached_and_the_others_are_unchanged(path):
    prompts = shared_prefix_prompts(50, [4, 20, 8], seed=6)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results = {}
    for caching in (True, False):
        llm = make(path, caching)
        engine = llm.engine
        for i, prompt in enumerate(prompts):
            engine.add_request(prompt, params, request_id=f"r{i}")
        for _ in range(3):
            engine.step()
        engine.abort_request("r1")
        finished = []
        while engine.has_unfinished_requests():
            finished += engine.step()
        again = llm.generate([prompts[1]], params, use_tqdm=False)[0]
        results[caching] = (
            {o.request_id: o.outputs[0].token_ids for o in finished},
            again.outputs[0].token_ids,
            again.num_cached_tokens,
        )
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert sorted(results[True][0]) == ["r0", "r2"]
    assert results[True][:2] == results[False][:2]
    assert (results[True][2], results[False][2]) == (
        64,
        0,
    )  # r1's 70 tokens: 4 full blocks, its own last


@pytest.mark.parametrize("length,cached", [(48, 32), (49, 48)])
def test_a_prompt_found_cached_whole_still_computes_its_last_token(path, length, cached):
    prompt = prompts_of_lengths([length], 400, seed=7)[0]
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True, logprobs=2)
    on, off, _, counts = on_and_off(
        path, [[prompt], [prompt]], sampled, watch=count_computed_tokens
    )
    again = on[1][0]
    assert again.num_cached_tokens == cached
    assert counts[again.request_id] == length - cached + sampled.max_tokens - 1
    first_on, first_off = again.outputs[0], off[1][0].outputs[0]
    assert first_on.logprobs[0].keys() == first_off.logprobs[0].keys()
    for t, lp in first_on.logprobs[0].items():
        assert lp.logprob == pytest.approx(first_off.logprobs[0][t].logprob, abs=1e-5)


def test_a_request_for_prompt_logprobs_scores_its_whole_prompt_though_it_is_cached(path):
    prompt = prompts_of_lengths([40], 400, seed=8)[0]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=1)
    on, off, engine, _ = on_and_off(path, [[prompt], [prompt]], params)
    again = on[1][0]
    assert again.num_cached_tokens == 0 and len(again.prompt_logprobs) == 40
    for mine, ref in zip(again.prompt_logprobs[1:], off[1][0].prompt_logprobs[1:]):
        assert mine.keys() == ref.keys()
        assert all(mine[t].logprob == pytest.approx(ref[t].logprob, abs=1e-5) for t in mine)
    assert engine.prefix_cache_queries == 0  # the cache was not asked


def test_blocks_filled_by_output_tokens_are_cached_too(path):
    llm = make(path, True)
    prompt = prompts_of_lengths([20], 400, seed=9)[0]
    out = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False
    )[0]
    follow_up = (
        prompt + out.outputs[0].token_ids[:30]
    )  # 50 tokens: 3 full blocks, 2 of them decoded
    assert llm.generate([follow_up], GREEDY, use_tqdm=False)[0].num_cached_tokens == 48


def test_reset_prefix_cache_forgets_every_prefix_but_not_while_a_request_holds_blocks(path):
    llm = make(path, True)
    prompt = prompts_of_lengths([40], 400, seed=10)[0]
    llm.generate([prompt], GREEDY, use_tqdm=False)
    seq = llm.engine.add_request(prompt, GREEDY)
    llm.engine.step()
    assert seq.num_cached_tokens == 32
    assert not llm.reset_prefix_cache()
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert llm.reset_prefix_cache()
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0


def record_shared_lens(engine) -> list[int]:
    """The cascade length of every step the runner prepares."""
    seen, prepare = [], engine.runner.prepare

    def spy(batch):
        step = prepare(batch)
        seen.append(step.shared_len)
        return step

    engine.runner.prepare = spy
    return seen


def test_decodes_sharing_cached_blocks_read_them_once_with_the_same_tokens(path, monkeypatch):
    """Cascade attention (Triton backend; the interpreter on CPU): decode steps whose sequences
    share cached prefix blocks attend to them once for all, and every token equals caching off
    (nothing shared there). Thresholds lowered to fit a tiny run."""
    from vllm_lite.worker.model_runner import ModelRunner

    monkeypatch.setattr(ModelRunner, "cascade_min_seqs", 2)
    monkeypatch.setattr(ModelRunner, "cascade_min_tokens", 2 * BS)
    prompts = shared_prefix_prompts(3 * BS + 5, [1, 9, 20, 4], seed=9)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    on, _, _, shared = on_and_off(
        path,
        [prompts[:1], prompts[1:]],
        params,
        watch=record_shared_lens,
        attention_backend="triton",
    )
    assert [o.num_cached_tokens for o in on[1]] == [3 * BS] * 3
    assert 3 * BS in shared and all(n in (0, 3 * BS) for n in shared)
