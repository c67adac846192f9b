import pytest
from tiny_models import make_tiny_model, prompts_of_lengths

from vllm_lite import LLM, SamplingParams
from vllm_lite.engine.detokenizer import IncrementalDetokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(make_tiny_model(str(tmp_path_factory.mktemp("m")), "qwen2"), num_blocks=128)


def test_outputs_come_back_in_input_order(llm):
    prompts = prompts_of_lengths([40, 3, 20, 1], 400)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 2, 5, 1)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outputs] == [9, 2, 5, 1]


def test_string_prompts_are_tokenized_and_echoed(llm):
    out = llm.generate("The quick brown fox", GREEDY, use_tqdm=False)[0]
    assert out.prompt == "The quick brown fox"
    assert out.prompt_token_ids == llm.tokenizer.encode("The quick brown fox")
    assert out.outputs[0].text == llm.tokenizer.decode(
        out.outputs[0].token_ids, skip_special_tokens=True
    )


def test_chat_applies_the_chat_template(llm):
    messages = [{"role": "user", "content": "Hello"}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    expected = llm.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert out.prompt == expected
    assert out.prompt_token_ids == llm.tokenizer.encode(expected, add_special_tokens=False)


def test_incremental_detokenizer_never_emits_a_broken_character(llm):
    tok = llm.tokenizer
    text = "naïve café 東京 🙂 Ελληνικά"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    pieces = [detok.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert any(p == "" for p in pieces), "expected a token that ends mid-character (held back)"
