"""vLLM's sampling extras checked against transformers: repetition / presence / frequency
penalties, logit bias, allowed token ids, logprobs and prompt logprobs, n completions sharing
their prompt's KV blocks."""

from collections import Counter

import pytest
import torch
from tiny_models import HFReference, assert_same_greedy, make_tiny_model, prompts_of_lengths
from transformers import AutoTokenizer

from vllm_lite import LLM, SamplingParams

LENGTHS = [5, 17, 33, 9]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny(request, tmp_path_factory):
    path = make_tiny_model(str(tmp_path_factory.mktemp(request.param)), request.param)
    hf = HFReference(path)
    return path, hf, prompts_of_lengths(LENGTHS, hf.model.config.vocab_size, seed=11)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = make_tiny_model(str(tmp_path_factory.mktemp("llama")), "llama")
    return LLM(path, dtype="float32", block_size=8, num_blocks=256), HFReference(path)


def greedy(**kw):
    return SamplingParams(temperature=0, ignore_eos=True, **kw)


# ---- references: transformers' logits, processed by hand --------------------------------------
def repetition(penalty):
    """transformers' RepetitionPenaltyLogitsProcessor over prompt and output tokens."""

    def process(logits, prompt, out):
        ids = torch.tensor(prompt + out)
        score = logits[ids]
        logits = logits.clone()
        logits[ids] = torch.where(score < 0, score * penalty, score / penalty)
        return logits

    return process


def openai_penalties(presence, frequency):
    def process(logits, prompt, out):
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=len(logits)).float()
        return logits - frequency * counts - presence * (counts > 0).float()

    return process


def bias(logit_bias):
    def process(logits, prompt, out):
        logits = logits.clone()
        for t, b in logit_bias.items():
            logits[t] += b
        return logits

    return process


def reference_greedy(hf, prompt, max_tokens, process):
    """A plain loop: transformers' logits of the whole sequence, processed, argmax."""
    out = []
    for _ in range(max_tokens):
        out.append(int(process(hf.next_token_logits(prompt + out), prompt, out).argmax()))
    return out


def check_against_reference(llm, hf, prompts, params, process):
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        ref = reference_greedy(hf, prompt, params.max_tokens, process)
        assert_same_greedy(out.outputs[0].token_ids, ref, prompt, hf, process)
    return outputs


def plain(llm, prompts, max_tokens):
    return [
        o.outputs[0].token_ids
        for o in llm.generate(prompts, greedy(max_tokens=max_tokens), use_tqdm=False)
    ]


# ---- penalties, bias, allowed ids -------------------------------------------------------------
def test_repetition_penalty_greedy_matches_transformers_generate(tiny):
    path, hf, prompts = tiny
    llm = LLM(path, dtype="float32", block_size=16, num_blocks=64)
    outputs = llm.generate(prompts, greedy(max_tokens=24, repetition_penalty=1.3), use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        ref = hf.greedy(prompt, 24, repetition_penalty=1.3)
        assert_same_greedy(out.outputs[0].token_ids, ref, prompt, hf, repetition(1.3))
    assert [o.outputs[0].token_ids for o in outputs] != plain(llm, prompts, 24), (
        "the penalty changed nothing"
    )


def test_repetition_penalty_greedy_matches_transformers_generate_on_smollm2(smollm2_path):
    hf = HFReference(smollm2_path)
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    questions = ["List three colors, then list them again.", "Say 'hello hello hello'."]
    prompts = [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )
        for q in questions
    ]
    llm = LLM(smollm2_path, dtype="float32", block_size=16, num_blocks=64)
    outputs = llm.generate(prompts, greedy(max_tokens=16, repetition_penalty=1.3), use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        ref = hf.greedy(prompt, 16, repetition_penalty=1.3)
        assert_same_greedy(out.outputs[0].token_ids, ref, prompt, hf, repetition(1.3))


def test_presence_and_frequency_penalties_match_a_reference_loop(llama):
    llm, hf = llama
    prompts = prompts_of_lengths([6, 19], 400, seed=2)
    outs = check_against_reference(
        llm,
        hf,
        prompts,
        greedy(max_tokens=16, presence_penalty=0.7, frequency_penalty=0.4),
        openai_penalties(0.7, 0.4),
    )
    assert [o.outputs[0].token_ids for o in outs] != plain(llm, prompts, 16), (
        "the penalties changed nothing"
    )
    # negative values reward repeats
    check_against_reference(
        llm,
        hf,
        prompts,
        greedy(max_tokens=16, presence_penalty=-1.0, frequency_penalty=-0.5),
        openai_penalties(-1.0, -0.5),
    )


def test_penalties_apply_per_row_in_a_mixed_batch(llama):
    llm, hf = llama
    prompts = prompts_of_lengths([7, 12, 30], 400, seed=3)
    params = [
        greedy(max_tokens=12, frequency_penalty=1.0),
        greedy(max_tokens=12),
        greedy(max_tokens=12, repetition_penalty=1.5),
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out, process in zip(
        prompts, outputs, [openai_penalties(0, 1.0), bias({}), repetition(1.5)]
    ):
        ref = reference_greedy(hf, prompt, 12, process)
        assert_same_greedy(out.outputs[0].token_ids, ref, prompt, hf, process)


@pytest.mark.parametrize("overlap", [False, True])
def test_penalties_count_every_token_with_overlapped_steps_and_preemption(tmp_path, overlap):
    """The penalties' token history: written once per sequence, then only new tokens, the one in
    flight from the device (overlapped steps); a preempted sequence starts its row again."""
    path = make_tiny_model(str(tmp_path), "llama")
    hf = HFReference(path)
    llm = LLM(path, dtype="float32", block_size=4, num_blocks=24, max_num_seqs=4)
    llm.engine.overlap = overlap
    prompts = prompts_of_lengths([7, 12, 30, 3, 9], 400, seed=8)
    params = [
        greedy(max_tokens=14, frequency_penalty=1.0, presence_penalty=0.3),
        greedy(max_tokens=14),
        greedy(max_tokens=14, repetition_penalty=1.5),
        greedy(max_tokens=14, frequency_penalty=-0.7),
        greedy(max_tokens=14, repetition_penalty=0.8, presence_penalty=1.2),
    ]
    processes = [
        openai_penalties(0.3, 1.0),
        bias({}),
        repetition(1.5),
        openai_penalties(0, -0.7),
        lambda lg, p, o: openai_penalties(1.2, 0)(repetition(0.8)(lg, p, o), p, o),
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    for prompt, out, process in zip(prompts, outputs, processes):
        assert_same_greedy(
            out.outputs[0].token_ids, reference_greedy(hf, prompt, 14, process), prompt, hf, process
        )


def test_logit_bias_matches_a_reference_loop(llama):
    llm, hf = llama
    prompts = prompts_of_lengths([8, 15], 400, seed=4)
    first = plain(llm, prompts, 1)
    logit_bias = {first[0][0]: -100.0, first[1][0]: -100.0, 77: 2.5, "91": 1.0}
    params = greedy(max_tokens=10, logit_bias=logit_bias)
    assert params.logit_bias == {first[0][0]: -100.0, first[1][0]: -100.0, 77: 2.5, 91: 1.0}
    outs = check_against_reference(llm, hf, prompts, params, bias(params.logit_bias))
    assert all(o.outputs[0].token_ids[0] not in (first[0][0], first[1][0]) for o in outs)


def test_allowed_token_ids_are_the_only_tokens_sampled(llama):
    llm, hf = llama
    allowed = [10, 20, 30, 40, 50]
    prompt = prompts_of_lengths([11], 400, seed=5)[0]
    sampled = (
        llm.generate(
            [prompt],
            SamplingParams(max_tokens=30, ignore_eos=True, seed=0, allowed_token_ids=allowed),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .token_ids
    )
    assert set(sampled) <= set(allowed) and len(set(sampled)) > 1

    def only_allowed(logits, prompt, out):
        return torch.full_like(logits, float("-inf")).index_copy(
            0, torch.tensor(allowed), logits[allowed]
        )

    check_against_reference(
        llm, hf, [prompt], greedy(max_tokens=8, allowed_token_ids=allowed), only_allowed
    )


# ---- logprobs ---------------------------------------------------------------------------------
def assert_logprob_entry(entry, token, ref_logprobs, k):
    """``entry`` ({token id: Logprob}) against transformers' log-softmax: the chosen token with its
    logprob and rank, and the k most likely tokens with ranks 1..k, all within 1e-4."""
    assert token in entry
    lp = ref_logprobs[token].item()
    assert abs(entry[token].logprob - lp) < 1e-4
    fewer, more = (
        (ref_logprobs > lp + 1e-4).sum().item() + 1,
        (ref_logprobs >= lp - 1e-4).sum().item(),
    )
    assert fewer <= entry[token].rank <= more
    top = sorted(entry.items(), key=lambda item: item[1].rank)[:k]
    assert [e.rank for _, e in top] == list(range(1, k + 1))
    assert torch.allclose(
        torch.tensor([e.logprob for _, e in top]), ref_logprobs.topk(k).values, atol=1e-4
    )
    assert all(abs(e.logprob - ref_logprobs[t].item()) < 1e-4 for t, e in top)
    assert len(entry) in (k, k + 1)


def test_logprobs_match_transformers_log_softmax(tiny):
    path, hf, prompts = tiny
    llm = LLM(path, dtype="float32", block_size=16, num_blocks=64)
    outputs = llm.generate(
        prompts, SamplingParams(max_tokens=8, ignore_eos=True, seed=1, logprobs=5), use_tqdm=False
    )
    for prompt, out in zip(prompts, outputs):
        c = out.outputs[0]
        assert len(c.logprobs) == len(c.token_ids) == 8
        for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            assert_logprob_entry(
                entry,
                token,
                torch.log_softmax(hf.next_token_logits(prompt + c.token_ids[:i]), -1),
                5,
            )
        assert c.cumulative_logprob == pytest.approx(
            sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs))
        )
        assert out.prompt_logprobs is None


def test_logprobs_are_raw_before_penalties_bias_and_temperature(llama):
    llm, hf = llama
    prompt = prompts_of_lengths([10], 400, seed=6)[0]
    params = SamplingParams(
        max_tokens=6,
        ignore_eos=True,
        seed=2,
        temperature=0.3,
        logprobs=3,
        logit_bias={123: 100.0},
        presence_penalty=2.0,
        repetition_penalty=1.7,
    )
    c = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert c.token_ids == [123] * 6, "the bias should force token 123"
    for i, entry in enumerate(c.logprobs):
        ref = torch.log_softmax(hf.next_token_logits(prompt + c.token_ids[:i]), -1)
        assert_logprob_entry(entry, 123, ref, 3)
        assert entry[123].logprob < -1.0  # the model's own view, not the biased one


def test_logprobs_zero_gives_only_the_sampled_token_and_text(llama):
    llm, _ = llama
    params = SamplingParams(max_tokens=5, ignore_eos=True, logprobs=0)
    c = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0]
    assert [list(e) for e in c.logprobs] == [[t] for t in c.token_ids]
    assert all(
        e[t].decoded_token == llm.tokenizer.decode([t]) for t, e in zip(c.token_ids, c.logprobs)
    )
    plain_out = llm.generate(
        [[5, 6, 7]], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert plain_out.logprobs is None and plain_out.cumulative_logprob is None


@pytest.mark.parametrize("chunked", [False, True], ids=["one_prefill", "chunked_prefill"])
def test_prompt_logprobs_match_transformers_log_softmax(llama, chunked):
    _, hf = llama
    llm = LLM(
        hf.model.name_or_path,
        dtype="float32",
        block_size=8,
        num_blocks=64,
        max_num_batched_tokens=16 if chunked else 8192,
    )
    prompts = prompts_of_lengths([40, 1, 9], 400, seed=7)
    outputs = llm.generate(
        prompts, SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=4), use_tqdm=False
    )
    for prompt, out in zip(prompts, outputs):
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        ref = torch.log_softmax(hf.model(torch.tensor([prompt])).logits[0].float(), -1)
        for i in range(1, len(prompt)):
            assert_logprob_entry(out.prompt_logprobs[i], prompt[i], ref[i - 1], 4)
        assert out.outputs[0].logprobs is None


def test_prompt_logprobs_prompts_are_prefilled_in_capped_chunks(llama, monkeypatch):
    from vllm_lite.engine import llm_engine

    _, hf = llama
    monkeypatch.setattr(llm_engine, "PROMPT_LOGPROBS_CHUNK", 6)
    llm = LLM(hf.model.name_or_path, dtype="float32", block_size=8, num_blocks=64)
    chunks, schedule = [], llm.engine.scheduler.schedule

    def spy():
        batch = schedule()
        chunks.extend(
            n
            for s, n in zip(batch.seqs, batch.num_new_tokens)
            if s.params.prompt_logprobs is not None
        )
        return batch

    llm.engine.scheduler.schedule = spy
    prompts = prompts_of_lengths([20, 9], 400, seed=13)
    params = [
        SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=2),
        SamplingParams(max_tokens=4),
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert max(chunks) == 6 and sum(n for n in chunks if n > 1) == 20
    ref = torch.log_softmax(hf.model(torch.tensor([prompts[0]])).logits[0].float(), -1)
    for i in range(1, 20):
        assert_logprob_entry(outputs[0].prompt_logprobs[i], prompts[0][i], ref[i - 1], 2)


def test_prompt_logprobs_survive_preemption(llama):
    _, hf = llama
    llm = LLM(
        hf.model.name_or_path,
        dtype="float32",
        block_size=8,
        num_blocks=10,
        max_num_batched_tokens=24,
    )
    prompts = prompts_of_lengths([30, 28, 25], 400, seed=8)
    outputs = llm.generate(
        prompts,
        SamplingParams(max_tokens=40, ignore_eos=True, prompt_logprobs=1, logprobs=1),
        use_tqdm=False,
    )
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outputs):
        ref = torch.log_softmax(hf.model(torch.tensor([prompt])).logits[0].float(), -1)
        assert len(out.prompt_logprobs) == len(prompt)
        for i in range(1, len(prompt)):
            assert_logprob_entry(out.prompt_logprobs[i], prompt[i], ref[i - 1], 1)
        assert len(out.outputs[0].logprobs) == 40


# ---- n completions ----------------------------------------------------------------------------
def test_n_completions_with_a_seed_are_reproducible_and_differ(llama):
    llm, _ = llama
    prompt = prompts_of_lengths([21], 400, seed=9)[0]
    params = SamplingParams(n=4, seed=7, max_tokens=12, ignore_eos=True)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2, 3]
    runs = [c.token_ids for c in first.outputs]
    assert runs == [c.token_ids for c in again.outputs]
    assert len({tuple(r) for r in runs}) == 4
    assert all(len(r) == 12 for r in runs)
    # SamplingParams' default skip_special_tokens=True: a sampled <bos>/<eos> has no text
    assert all(
        c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in first.outputs
    )
    # vLLM's rule: completion i draws as a single request seeded seed + i would
    single = llm.generate(
        [prompt] * 4,
        [SamplingParams(seed=7 + i, max_tokens=12, ignore_eos=True) for i in range(4)],
        use_tqdm=False,
    )
    assert [o.outputs[0].token_ids for o in single] == runs


@pytest.mark.parametrize("prompt_len", [21, 24], ids=["partial_last_block", "full_last_block"])
def test_n_completions_compute_and_allocate_the_prompt_blocks_once(llama, prompt_len):
    llm, _ = llama
    assert llm.reset_prefix_cache()  # no earlier test's prompt blocks to find
    bm, bs = llm.engine.block_manager, llm.engine.block_manager.block_size
    allocated, tables, prefilled = [], [], []
    allocate, free, execute = bm.allocate, bm.free, llm.engine.runner.execute

    def spy_allocate(seq, num_tokens):
        before = len(seq.block_table)
        allocate(seq, num_tokens)
        allocated.extend(seq.block_table[before:])

    def spy_free(seq):
        tables.append(list(seq.block_table))
        free(seq)

    def spy_execute(step, *args):
        prefilled.append(len(step.input_ids))
        return execute(step, *args)

    bm.allocate, bm.free, llm.engine.runner.execute = spy_allocate, spy_free, spy_execute
    try:
        prompt = prompts_of_lengths([prompt_len], 400, seed=10)[0]
        out = llm.generate(
            [prompt], SamplingParams(n=4, seed=3, max_tokens=6, ignore_eos=True), use_tqdm=False
        )[0]
    finally:
        del bm.allocate, bm.free, llm.engine.runner.execute
    assert len(out.outputs) == 4 and all(len(c.token_ids) == 6 for c in out.outputs)
    num_full, per_seq = prompt_len // bs, bm.blocks_needed(prompt_len + 6 - 1)
    assert len(tables) == 4 and all(t[:num_full] == tables[0][:num_full] for t in tables)
    assert (
        len(allocated) == 4 * per_seq - 3 * num_full
    )  # full prompt blocks once, the rest per completion
    assert max(Counter(allocated).values()) == 1
    # tokens run through the model: the prompt once, each other completion's partial block again
    tail = prompt_len - num_full * bs
    assert sum(prefilled) == prompt_len + 3 * tail + 4 * (6 - 1)
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)


def test_n_greedy_completions_equal_transformers_under_preemption(tiny):
    path, hf, prompts = tiny
    # 14 blocks of 8 tokens cannot hold 3 completions of every prompt: completions are preempted
    llm = LLM(path, dtype="float32", block_size=8, num_blocks=14, max_num_batched_tokens=32)
    outputs = llm.generate(prompts, greedy(n=3, max_tokens=20), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outputs):
        ref = hf.greedy(prompt, 20)
        assert len(out.outputs) == 3
        for c in out.outputs:
            assert_same_greedy(c.token_ids, ref, prompt, hf)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)


def test_n_completions_with_penalties_and_logprobs_each_count_their_own_tokens(llama):
    llm, hf = llama
    prompt = prompts_of_lengths([13], 400, seed=12)[0]
    out = llm.generate(
        [prompt],
        SamplingParams(
            n=3,
            seed=5,
            max_tokens=8,
            ignore_eos=True,
            frequency_penalty=1.5,
            logprobs=2,
            prompt_logprobs=2,
        ),
        use_tqdm=False,
    )[0]
    assert len(out.prompt_logprobs) == len(prompt)
    for c in out.outputs:
        assert len(c.logprobs) == 8
        for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            assert_logprob_entry(
                entry,
                token,
                torch.log_softmax(hf.next_token_logits(prompt + c.token_ids[:i]), -1),
                2,
            )


def test_n_completions_take_n_seats_of_max_num_seqs(llama):
    _, hf = llama
    llm = LLM(hf.model.name_or_path, dtype="float32", block_size=8, num_blocks=64, max_num_seqs=4)
    running = []
    schedule = llm.engine.scheduler.schedule

    def spy():
        batch = schedule()
        running.append(len(llm.engine.scheduler.running))
        return batch

    llm.engine.scheduler.schedule = spy
    outs = llm.generate(
        prompts_of_lengths([5, 6, 7], 400),
        SamplingParams(n=3, max_tokens=5, ignore_eos=True),
        use_tqdm=False,
    )
    assert [len(o.outputs) for o in outs] == [3, 3, 3]
    assert max(running) <= 4
    with pytest.raises(ValueError, match="SamplingParams.n must be <= max_num_seqs"):
        llm.generate([[1, 2]], SamplingParams(n=5), use_tqdm=False)


def test_abort_of_an_n_request_returns_every_block(llama):
    llm, _ = llama
    engine = llm.engine
    seq = engine.add_request(
        list(range(2, 30)), SamplingParams(n=4, max_tokens=50, ignore_eos=True), request_id="n4"
    )
    for _ in range(3):
        engine.step()
    assert len(seq.group) == 4
    engine.abort_request("n4")
    while engine.has_unfinished_requests():
        engine.step()
    assert all(s.finish_reason == "abort" for s in seq.group)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# ---- validation -------------------------------------------------------------------------------
BAD_VALUES = {
    "n": (dict(n=0), r"n must be an int >= 1"),
    "presence_penalty": (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
    "frequency_penalty": (dict(frequency_penalty=-3), r"frequency_penalty must be in \[-2, 2\]"),
    "repetition_penalty": (
        dict(repetition_penalty=0.0),
        r"repetition_penalty must be a finite number > 0",
    ),
    "logit_bias": (
        dict(logit_bias={3: 150.0}),
        r"logit_bias biases must be numbers in \[-100, 100\]",
    ),
    "logit_bias_key": (dict(logit_bias={-1: 1.0}), r"logit_bias must be a dict"),
    "allowed_token_ids": (
        dict(allowed_token_ids=[]),
        r"allowed_token_ids must be None or a non-empty list",
    ),
    "logprobs": (dict(logprobs=-1), r"logprobs must be None or an int >= 0"),
    "prompt_logprobs": (dict(prompt_logprobs=1.5), r"prompt_logprobs must be None or an int >= 0"),
}


@pytest.mark.parametrize("field", BAD_VALUES)
def test_bad_sampling_value_is_a_value_error_naming_the_field_and_range(field):
    kwargs, message = BAD_VALUES[field]
    with pytest.raises(ValueError, match=r"SamplingParams\." + message):
        SamplingParams(**kwargs)
