"""Bad input gets a clear error naming the problem; requests already in flight still complete."""

import json
import os

import pytest
from tiny_models import make_tiny_model

from vllm_lite import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("m")), "llama")


@pytest.fixture(scope="module")
def llm(model_path):
    return LLM(model_path, num_blocks=4, block_size=16, max_model_len=100)


BAD_REQUESTS = {
    "empty prompt": ([], GREEDY),
    "max_tokens": ([1, 2], dict(max_tokens=0)),
    "max_model_len": (list(range(2, 102)), GREEDY),
    "KV pool holds only": ([3] * 60, SamplingParams(temperature=0, max_tokens=39)),
    "temperature": ([1, 2], dict(temperature=-0.5)),
    "top_p": ([1, 2], dict(top_p=1.5)),
    r"presence_penalty must be in \[-2, 2\]": ([1, 2], dict(presence_penalty=2.5)),
    r"repetition_penalty must be a finite number > 0": ([1, 2], dict(repetition_penalty=-1.0)),
    r"logit_bias biases must be numbers in \[-100, 100\]": ([1, 2], dict(logit_bias={3: -101})),
    r"logit_bias token ids must be in \[0, \d+\)": (
        [1, 2],
        SamplingParams(logit_bias={10**6: 1.0}),
    ),
    r"allowed_token_ids token ids must be in \[0, \d+\)": (
        [1, 2],
        SamplingParams(allowed_token_ids=[3, 10**6]),
    ),
    r"n must be <= max_num_seqs": ([1, 2], SamplingParams(n=1000)),
    r"logprobs must be None or an int >= 0": ([1, 2], dict(logprobs=-2)),
}


@pytest.mark.parametrize("problem", BAD_REQUESTS)
def test_bad_request_is_refused_naming_the_problem_while_others_complete(llm, problem):
    prompt, params = BAD_REQUESTS[problem]
    engine = llm.engine
    good = engine.add_request([5, 6, 7], GREEDY)
    engine.step()
    with pytest.raises(ValueError, match=problem):
        engine.add_request(
            prompt, params if isinstance(params, SamplingParams) else SamplingParams(**params)
        )
    while engine.has_unfinished_requests():
        engine.step()
    assert good.finish_reason == "length" and len(good.output_token_ids) == 8
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_generate_names_the_bad_prompt_and_starts_nothing(llm):
    with pytest.raises(ValueError, match="prompt 1: empty prompt"):
        llm.generate([[1, 2], []], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "prompt",
    [[5, 10**6], [-1, 5], [5, 2.0], [True, 5], [5, "6"]],
    ids=["past-vocab", "negative", "float", "bool", "str"],
)
def test_prompt_token_ids_must_be_ints_in_the_vocabulary(llm, prompt):
    with pytest.raises(ValueError, match=r"prompt token ids must be ints in \[0, \d+\)"):
        llm.engine.add_request(prompt, GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_top_p_zero_is_invalid():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        LLM(str(tmp_path / "nope"))


def test_unsupported_architecture_is_a_clear_error(model_path, tmp_path):
    path = tmp_path / "gpt2ish"
    path.mkdir()
    config = json.load(open(os.path.join(model_path, "config.json")))
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        LLM(str(path))


def test_unknown_engine_option_is_a_clear_error(model_path):
    with pytest.raises(ValueError, match="blok_size"):
        LLM(model_path, blok_size=16)


def test_abort_returns_the_blocks(llm):
    engine = llm.engine
    seq = engine.add_request(list(range(2, 40)), GREEDY, request_id="to-abort")
    engine.step()
    assert seq.block_table
    engine.abort_request("to-abort")
    assert seq.finish_reason == "abort" and not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_sliding_window_models_are_capped_at_their_window(tmp_path):
    path = make_tiny_model(str(tmp_path), "mistral", sliding_window=64)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(path, max_model_len=100)
    assert LLM(path).engine.config.max_model_len == 64
