import pytest
import torch
from tiny_models import make_tiny_model, prompts_of_lengths

from vllm_lite import LLM, SamplingParams
from vllm_lite.worker.sampler import Penalties, Sampler, SamplingBatch


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(make_tiny_model(str(tmp_path_factory.mktemp("m")), "llama"), num_blocks=256)


def batch_of(n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generators=None):
    def t(v, dt):
        return torch.full((n,), v, dtype=dt)

    return SamplingBatch(
        t(temperature, torch.float32),
        t(top_k, torch.int64),
        t(top_p, torch.float32),
        t(min_p, torch.float32),
        generators or [None] * n,
        [],
        temperature == 0,
        top_k > 0 or top_p < 1,
        min_p > 0,
    )


def draws(logits, batch, n=400):
    gen = torch.Generator().manual_seed(0)
    return torch.stack([Sampler()(logits, batch, gen) for _ in range(n)])


LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def test_temperature_zero_is_argmax():
    assert Sampler()(LOGITS.repeat(3, 1), batch_of(3, temperature=0.0)).tolist() == [0, 0, 0]


def test_top_k_keeps_only_the_k_most_likely_tokens():
    assert set(draws(LOGITS, batch_of(1, top_k=2)).flatten().tolist()) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert set(draws(LOGITS, batch_of(1, top_p=0.7)).flatten().tolist()) == {0, 1}


def test_min_p_drops_tokens_below_the_fraction_of_the_top_probability():
    assert set(draws(LOGITS, batch_of(1, min_p=0.25)).flatten().tolist()) == {0, 1, 2}


def test_sampling_follows_the_distribution():
    counts = (
        torch.bincount(draws(LOGITS, batch_of(1), n=2000).flatten(), minlength=4).float() / 2000
    )
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04)


@pytest.mark.parametrize("every_row", [True, False])
def test_penalties_match_the_formulas_with_repeats_and_stale_history_columns(every_row):
    """Repetition over prompt + output (each seen token once), frequency per output token,
    presence once per distinct output token; columns after a row's length hold stale ids."""
    gen = torch.Generator().manual_seed(3)
    vocab, rows = 12, [0, 2]  # row 1 has no penalties (when not every row is penalized)
    logits = torch.randn(3, vocab, generator=gen) * 3
    prompts, outputs = [[1, 4, 4], [7]], [[4, 5, 5, 5, 0], [9, 9, 7]]
    tokens = torch.full((2, 10), 11, dtype=torch.int32)  # 11: a stale id, in no row's sequence
    for i, (pr, out) in enumerate(zip(prompts, outputs)):
        tokens[i, : len(pr + out)] = torch.tensor(pr + out)
    rep, freq, pres = [1.5, 0.7], [0.4, -0.3], [0.9, 1.1]
    penalties = Penalties(
        rows=None if every_row else torch.tensor(rows),
        repetition=torch.tensor(rep),
        frequency=torch.tensor(freq),
        presence=torch.tensor(pres),
        any_repetition=True,
        prompt_lens=torch.tensor([3, 1]),
        tokens=tokens,
        lengths=torch.tensor([8, 4]),
    )
    src = logits[:2] if every_row else logits
    batch = batch_of(len(src), temperature=0)
    batch.penalties = penalties
    expected = src.clone()
    for i, row in enumerate(range(2) if every_row else rows):
        x = expected[row]
        for t in set(prompts[i] + outputs[i]):
            x[t] = x[t] / rep[i] if x[t] > 0 else x[t] * rep[i]
        for t in set(outputs[i]):
            x[t] -= freq[i] * outputs[i].count(t) + pres[i]
    got = Sampler.process_logits(src.clone(), batch)
    torch.testing.assert_close(got, expected)


def test_seeded_output_does_not_depend_on_the_rest_of_the_batch(llm):
    prompt = prompts_of_lengths([9], 400, seed=3)[0]
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = prompts_of_lengths([5, 30, 12], 400, seed=4)
    mixed = (
        llm.generate(
            others + [prompt],
            [SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True)] * 3 + [seeded],
            use_tqdm=False,
        )[3]
        .outputs[0]
        .token_ids
    )
    assert alone == mixed


def test_greedy_output_does_not_depend_on_the_rest_of_the_batch(llm):
    prompt = prompts_of_lengths([21], 400, seed=5)[0]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(
        prompts_of_lengths([3, 50, 7], 400, seed=6) + [prompt], greedy, use_tqdm=False
    )
    assert mixed[3].outputs[0].token_ids == alone


def test_each_request_keeps_its_own_sampling_parameters_while_the_batch_changes(llm):
    # the engine keeps a batch's sampling tensors while its rows stay the same sequences: when
    # requests finish (rows shift) or join (max_num_seqs 3), each row must get its own again
    prompts = prompts_of_lengths([9, 4, 15, 7, 11, 6], 400, seed=8)
    params = [
        SamplingParams(temperature=1.0, seed=1, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        SamplingParams(
            temperature=0.7, top_k=5, seed=2, max_tokens=20, min_tokens=12, stop_token_ids=[7, 8]
        ),
        SamplingParams(
            temperature=0.9,
            seed=3,
            repetition_penalty=1.4,
            frequency_penalty=0.5,
            max_tokens=12,
            ignore_eos=True,
        ),
        SamplingParams(
            temperature=0, logit_bias={7: 3.0}, max_tokens=25, ignore_eos=True, logprobs=2
        ),
        SamplingParams(
            temperature=1.0, seed=4, top_p=0.8, min_p=0.05, max_tokens=9, ignore_eos=True
        ),
    ]
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0] for p, sp in zip(prompts, params)]
    scheduler = llm.engine.scheduler
    for max_num_seqs in (256, 3):
        scheduler.max_num_seqs, before = max_num_seqs, scheduler.max_num_seqs
        try:
            together = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            scheduler.max_num_seqs = before
        assert [o.token_ids for o in together] == [o.token_ids for o in alone]
        logprobs = together[4].logprobs  # the sampled token's, for row 4 only (to fp32 rounding)
        assert [d[t].logprob for d, t in zip(logprobs, together[4].token_ids)] == pytest.approx(
            [d[t].logprob for d, t in zip(alone[4].logprobs, alone[4].token_ids)], abs=1e-5
        )
        assert all(o.logprobs is None for i, o in enumerate(together) if i != 4)


def test_max_tokens_ends_with_finish_reason_length(llm):
    out = llm.generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False
    )[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_stop_token_ids_end_generation_with_reason_stop(llm):
    free = llm.generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False
    )
    stop_at = free[0].outputs[0].token_ids[3]
    first = free[0].outputs[0].token_ids.index(stop_at)
    out = llm.generate(
        [[5, 6, 7]],
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_at]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.token_ids == free[0].outputs[0].token_ids[: first + 1]


def test_stop_string_ends_generation_and_is_not_in_the_text(llm):
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate([[5, 6, 7]], greedy, use_tqdm=False)[0].outputs[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), "the model's text should give a usable stop string"
    out = llm.generate(
        [[5, 6, 7]],
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stop),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.find(stop)]


def test_eos_ends_generation_unless_ignore_eos(llm):
    eos = llm.tokenizer.eos_token_id
    sp = SamplingParams(temperature=0, max_tokens=20)
    free = llm.generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False
    )
    first = free[0].outputs[0].token_ids[0]
    llm.engine.eos_token_ids = {first}
    try:
        stopped = llm.generate([[5, 6, 7]], sp, use_tqdm=False)[0].outputs[0]
        ignored = llm.generate(
            [[5, 6, 7]],
            SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
            use_tqdm=False,
        )[0].outputs[0]
        held = llm.generate(
            [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=20, min_tokens=4), use_tqdm=False
        )[0].outputs[0]
    finally:
        llm.engine.eos_token_ids = {eos}
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    assert len(ignored.token_ids) == 20
    assert len(held.token_ids) >= 4 and first not in held.token_ids[:4]
