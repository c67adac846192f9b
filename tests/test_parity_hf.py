"""Greedy output equals HuggingFace transformers token for token (fp32, CPU), for every
architecture we claim."""

import pytest
from tiny_models import (
    HFReference,
    assert_same_greedy,
    make_tiny_model,
    prompts_of_lengths,
    record_chunked_prefills,
)

from vllm_lite import LLM, SamplingParams

LENGTHS = [5, 17, 33, 2, 64, 9, 12, 100]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "llama3_rope", "mistral", "qwen2", "qwen3"])
def tiny(request, tmp_path_factory):
    path = make_tiny_model(str(tmp_path_factory.mktemp(request.param)), request.param)
    hf = HFReference(path)
    prompts = prompts_of_lengths(LENGTHS, hf.model.config.vocab_size)
    return path, hf, prompts, [hf.greedy(p, 32) for p in prompts]


def run_and_check(llm, hf, prompts, refs):
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out, ref in zip(prompts, outputs, refs):
        assert out.prompt_token_ids == prompt
        assert len(out.outputs[0].token_ids) == 32
        assert_same_greedy(out.outputs[0].token_ids, ref, prompt, hf)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked after the run"


@pytest.mark.parametrize("block_size", [16, 256])
def test_greedy_matches_transformers(tiny, block_size):
    path, hf, prompts, refs = tiny
    run_and_check(
        LLM(path, dtype="float32", block_size=block_size, num_blocks=4096 // block_size),
        hf,
        prompts,
        refs,
    )


def test_greedy_matches_transformers_with_preemption_and_chunked_prefill(tiny):
    path, hf, prompts, refs = tiny
    # 20 blocks of 8 tokens cannot hold all 8 sequences at once; 48 tokens a step chunks prompts.
    llm = LLM(path, dtype="float32", block_size=8, num_blocks=20, max_num_batched_tokens=48)
    chunked = record_chunked_prefills(llm.engine)
    run_and_check(llm, hf, prompts, refs)
    assert llm.engine.scheduler.num_preemptions > 0
    assert chunked, "no prompt was prefilled in chunks"


def test_smollm2_greedy_matches_transformers(smollm2_path):
    hf = HFReference(smollm2_path)
    tok = hf_tokenizer(smollm2_path)
    questions = [
        "What is the capital of France?",
        "Name a color.",
        "Count to five.",
        "What is 2+2?",
        "Say hello in Spanish.",
        "Write one word about cats.",
        "Who wrote Hamlet?",
        "Describe the moon in a short sentence, please, with some detail about its surface.",
    ]
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]
    prompts = [tok.encode(p, add_special_tokens=False) for p in prompts]
    refs = [hf.greedy(p, 32) for p in prompts]
    llm = LLM(smollm2_path, dtype="float32", block_size=16, num_blocks=256)
    run_and_check(llm, hf, prompts, refs)
    assert "Paris" in llm.tokenizer.decode(refs[0])


def hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_overlapped_steps_give_the_same_output_as_sequential_steps(tiny):
    path, hf, prompts, refs = tiny
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        for n in (1, 2, 32, 5, 17, 32, 3, 9)
    ]
    results = []
    for overlap in (True, False):
        llm = LLM(path, dtype="float32", block_size=8, num_blocks=20, max_num_batched_tokens=48)
        llm.engine.overlap = overlap
        results.append(
            [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        )
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    assert results[0] == results[1]
    assert [len(r) for r in results[0]] == [1, 2, 32, 5, 17, 32, 3, 9]
