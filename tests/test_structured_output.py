"""Structured outputs (JSON schema, regex, choice, grammar) and tool calls, offline and through the
server, on a tiny random model: whatever the weights, an output that ends with "stop" must
follow its constraint. Greedy or seeded, so every run is the same."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from typing import Annotated

import jsonschema
import pytest
import torch
from openai import BadRequestError, OpenAI
from pydantic import BaseModel, Field
from tiny_models import make_tiny_model
from transformers import AutoTokenizer

from vllm_lite import LLM, GuidedDecodingParams, SamplingParams, StructuredOutputsParams
from vllm_lite.config import EngineConfig
from vllm_lite.entrypoints.async_engine import AsyncLLM
from vllm_lite.entrypoints.openai_server import bind, build_app, make_server
from vllm_lite.entrypoints.protocol import ChatCompletionRequest, RequestError
from vllm_lite.entrypoints.tool_calls import (
    HermesToolParser,
    Llama3JsonToolParser,
    parse_tool_calls,
    tool_stream,
)

ENGINE = dict(num_blocks=64, block_size=16, max_model_len=256, max_num_seqs=4)
PROMPTS = ["The quick brown fox", "Paged attention keeps", [5, 6, 7, 8], "Héllo wörld"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "color": {"enum": ["red", "green", "blue"]},
        "scores": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "maxItems": 3,
        },
        "owner": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 999},
                "ok": {"type": "boolean"},
            },
            "required": ["id", "ok"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "color", "scores", "owner"],
    "additionalProperties": False,
}
COMPACT = dict(disable_any_whitespace=True)  # a random model may emit whitespace forever otherwise


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = make_tiny_model(str(tmp_path_factory.mktemp("structured")), "llama")
    tokenizer = AutoTokenizer.from_pretrained(path)  # a template that shows the tools it is given
    tokenizer.chat_template = (
        "{% if tools %}<tools>{{ tools | tojson }}\n{% endif %}" + tokenizer.chat_template
    )
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llm(model_path):
    engine = LLM(model_path, **ENGINE)
    yield engine
    engine.close()


def texts(outputs, reason="stop"):
    """Every completion's text; each must have ended with ``reason``."""
    done = [c for out in outputs for c in out.outputs]
    assert [c.finish_reason for c in done] == [reason] * len(done), [
        (c.text, c.finish_reason) for c in done
    ]
    return [c.text for c in done]


# ---- offline ------------------------------------------------------------------------------------
def test_json_schema_outputs_parse_and_validate_greedy_and_sampled(llm):
    so = StructuredOutputsParams(json=SCHEMA, **COMPACT)
    greedy = llm.generate(
        PROMPTS,
        SamplingParams(temperature=0, max_tokens=120, structured_outputs=so),
        use_tqdm=False,
    )
    sampled = llm.generate(
        PROMPTS[:2],
        SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=120, structured_outputs=so),
        use_tqdm=False,
    )
    for text in texts(greedy) + texts(sampled):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_output_matches_the_regex(llm):
    pattern = r"[a-z]{2,5}@[0-9]{3}\.(com|org)"
    outs = llm.generate(
        PROMPTS,
        SamplingParams(
            temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(regex=pattern)
        ),
        use_tqdm=False,
    )
    for text in texts(outs):
        assert re.fullmatch(pattern, text), text


def test_a_token_its_grammar_refuses_never_reaches_the_output(llm):
    """allowed_token_ids that leave the grammar nothing: the sampled token is refused, and the
    completion ends before it (with a warning), the batch's other request untouched."""
    tokenizer = llm.engine.tokenizer
    yes = tokenizer.encode("yes", add_special_tokens=False)
    outside = next(t for t in range(tokenizer.vocab_size) if t not in yes and t != 0)
    stuck = SamplingParams(
        temperature=0,
        max_tokens=8,
        allowed_token_ids=[outside],
        structured_outputs=StructuredOutputsParams(choice=["yes"]),
    )
    free = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with pytest.warns(UserWarning, match="breaks its structured output"):
        outs = llm.generate([PROMPTS[0], PROMPTS[1]], [stuck, free], use_tqdm=False)
    refused = outs[0].outputs[0]
    assert outside not in refused.token_ids and refused.finish_reason == "abort"
    assert len(outs[1].outputs[0].token_ids) == 8


def test_choice_output_is_one_of_the_choices(llm):
    choices = ["yes", "no way", 'say "hi"\n', "東京"]
    outs = llm.generate(
        PROMPTS,
        SamplingParams(
            temperature=1.0,
            seed=0,
            n=2,
            max_tokens=20,
            structured_outputs=StructuredOutputsParams(choice=choices),
        ),
        use_tqdm=False,
    )
    assert set(texts(outs)) <= set(choices)


def test_ebnf_grammar_output_is_in_its_language(llm):
    grammar = 'root ::= "(" num (" + " num){0,2} ")"\nnum ::= [1-9] [0-9]?'
    outs = llm.generate(
        PROMPTS,
        SamplingParams(
            temperature=0,
            max_tokens=40,
            structured_outputs=StructuredOutputsParams(grammar=grammar),
        ),
        use_tqdm=False,
    )
    for text in texts(outs):
        assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?){0,2}\)", text), text


def test_json_object_output_is_a_json_object(llm):
    so = StructuredOutputsParams(json_object=True, **COMPACT)
    outs = llm.generate(
        PROMPTS,
        SamplingParams(temperature=0, max_tokens=100, structured_outputs=so),
        use_tqdm=False,
    )
    done = [c.text for out in outs for c in out.outputs if c.finish_reason == "stop"]
    assert done  # its keys are free strings: a random model may not close them all in time
    for text in done:
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    "spec, names",
    [
        (dict(json={"type": "foo"}), "structured_outputs.json: invalid JSON schema"),
        (dict(json="{not json"), "structured_outputs.json: invalid JSON schema"),
        (dict(regex="a(b"), "structured_outputs.regex: invalid regex"),
        (dict(grammar="root ::= undefined_rule"), "structured_outputs.grammar: invalid grammar"),
        (dict(choice=[]), "structured_outputs.choice"),
        (dict(regex="a", choice=["a"]), "exactly one"),
    ],
)
def test_an_invalid_spec_is_a_value_error_naming_it_before_anything_is_queued(llm, spec, names):
    with pytest.raises(ValueError, match=re.escape(names)):
        llm.generate(
            "hello",
            SamplingParams(structured_outputs=StructuredOutputsParams(**spec)),
            use_tqdm=False,
        )
    assert not llm.engine.has_unfinished_requests()


def test_a_constrained_neighbour_leaves_an_unconstrained_output_unchanged(llm):
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], plain, use_tqdm=False)[0].outputs[0].token_ids
    so = SamplingParams(
        temperature=0, max_tokens=24, structured_outputs=StructuredOutputsParams(regex="[ab]{30}")
    )
    mixed = llm.generate([PROMPTS[0], PROMPTS[1]], [plain, so], use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone
    assert re.fullmatch("[ab]*", mixed[1].outputs[0].text)


def test_constrained_steps_stay_overlapped_and_no_placeholder_reaches_the_output(llm):
    engine = llm.engine
    so = StructuredOutputsParams(regex="[a-z]{5}-[0-9]{5}")
    for prompt in PROMPTS[:2]:
        engine.add_request(
            prompt, SamplingParams(temperature=0, max_tokens=20, structured_outputs=so)
        )
    overlapped, outputs = 0, []
    while engine.has_unfinished_requests():
        outputs += engine.step()
        # a step in flight whose tokens the host has not read yet: the pipeline did not stall
        overlapped += engine.inflight is not None and any(
            -1 in s.token_ids for s in engine.inflight.seqs
        )
    assert overlapped >= 10
    for out in outputs:
        assert (
            re.fullmatch("[a-z]{5}-[0-9]{5}", out.outputs[0].text)
            and -1 not in out.outputs[0].token_ids
        )


def test_a_constrained_step_is_sampled_after_the_next_step_is_prepared(llm):
    """The host prepares step N+1 while the grammar worker fills step N's masks: step N is
    sampled only then (an unconstrained step at once, at its launch)."""
    engine, events = llm.engine, []
    prepare, sample = engine.runner.prepare, engine._sample
    engine.runner.prepare = lambda batch: events.append("prepare") or prepare(batch)
    engine._sample = lambda inflight: events.append(bool(inflight.grammar_rows)) or sample(inflight)
    so = StructuredOutputsParams(regex="[a-z]{5}-[0-9]{5}")
    try:
        llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        assert events[:3] == ["prepare", False, "prepare"]  # each step sampled at its launch
        events.clear()
        params = SamplingParams(temperature=0, max_tokens=8, structured_outputs=so)
        llm.generate(PROMPTS[:2], params, use_tqdm=False)
    finally:
        del engine.runner.prepare, engine._sample
    assert events[:5] == ["prepare", "prepare", True, "prepare", True]


def test_masks_filled_ahead_on_the_worker_equal_masks_filled_in_step(llm):
    """Overlapped steps advance the matchers and fill the next masks on a worker thread; steps
    run one by one fill them in the engine's thread. Requests of different lengths and kinds
    (some unconstrained) change the batch's rows as they finish: the same tokens either way."""
    so = [
        StructuredOutputsParams(json=SCHEMA, **COMPACT),
        None,
        StructuredOutputsParams(regex="[a-z]{3,9}-[0-9]{2,30}"),
        StructuredOutputsParams(choice=["alpha", "beta gamma"]),
    ]
    params = [
        SamplingParams(temperature=0.8, seed=i, max_tokens=10 + 15 * i, structured_outputs=s)
        for i, s in enumerate(so)
    ]
    runs = []
    for overlap in (True, False):
        llm.engine.overlap = overlap
        try:
            outs = llm.generate(PROMPTS * 2, params * 2, use_tqdm=False)
        finally:
            llm.engine.overlap = True
        runs.append([o.outputs[0].token_ids for o in outs])
    assert runs[0] == runs[1]
    assert re.fullmatch("[a-z]{3,9}-[0-9]{2,30}", outs[2].outputs[0].text)


def test_the_gil_switch_interval_is_short_while_the_grammar_worker_lives(llm):
    import sys

    from vllm_lite.structured_output import SWITCH_INTERVAL, StructuredOutputManager

    engine, before = llm.engine, sys.getswitchinterval()
    sys.setswitchinterval(0.005)  # CPython's default
    try:
        manager = StructuredOutputManager(engine.tokenizer, engine.hf_config.vocab_size, {0})
        matcher = manager.matcher(StructuredOutputsParams(regex="[ab]+"))
        mask = manager.bitmask([matcher], [0], 1)
        job = manager.advance_async([matcher], [0], 1, lambda: engine.tokenizer.encode("a"), mask)
        job.mask.result()
        assert sys.getswitchinterval() <= SWITCH_INTERVAL
        manager.close()
        assert sys.getswitchinterval() == 0.005
    finally:
        sys.setswitchinterval(before)


def test_the_worker_gives_the_verdicts_and_masks_of_calls_on_the_engines_thread(llm):
    """The grammar worker's job (accept, then fill the rows that go on) gives the same verdicts
    (accepted, ended, refused) and next masks as the calls on the engine's thread."""
    from vllm_lite.structured_output import ACCEPTED, ENDED, REFUSED

    manager = llm.engine.structured_output_manager()
    so = StructuredOutputsParams(json=SCHEMA, **COMPACT)
    n, rng = 13, random.Random(0)
    ahead, inline = [manager.matcher(so) for _ in range(n)], [manager.matcher(so) for _ in range(n)]
    active, seen = list(range(n)), set()
    for step in range(24):
        mask = manager.bitmask([inline[r] for r in active], active, n).clone()
        tokens = [0] * n
        for r in active:
            allowed = [t for t in range(manager.vocab_size) if mask[r, t // 32] >> (t % 32) & 1]
            if step == 5 and r == 3:  # a token its grammar refuses
                allowed = sorted(set(range(manager.vocab_size)) - set(allowed))
            tokens[r] = rng.choice(allowed)
        job = manager.advance_async([ahead[r] for r in active], active, n, lambda t=tokens: t, mask)
        codes = manager.advance([inline[r] for r in active], [tokens[r] for r in active])
        assert job.status.result() == codes
        unusual = {r: code for r, code in zip(active, codes) if code != ACCEPTED}
        assert job.verdicts(tokens, manager.stop_token_ids) == unusual
        host, filled = job.mask.result()
        live = [r for r, code in zip(active, codes) if code == ACCEPTED]
        assert filled == set(live)
        expected = manager.bitmask([inline[r] for r in live], live, n)
        assert torch.equal(host[live], expected[live])
        seen.update(codes)
        active = [r for r, code in zip(active, codes) if code != ENDED]
    assert REFUSED in seen and len(active) > 4  # rows refused, ended and going on


def test_tokens_their_masks_allowed_are_accepted_without_waiting_for_the_worker(llm):
    """The engine's thread reads a step's verdicts while the worker still accepts its tokens:
    a token inside its row's mask that is no stop token needs no wait (the status here never
    comes); a stop token or one outside the mask does (here: the worker's error)."""
    from vllm_lite.structured_output import GrammarAdvance

    manager = llm.engine.structured_output_manager()
    matchers = [manager.matcher(StructuredOutputsParams(regex="[ab]+")) for _ in range(2)]
    mask = manager.bitmask(matchers, [0, 2], 3)
    a, c = (llm.engine.tokenizer.convert_tokens_to_ids(t) for t in ("a", "c"))
    job = GrammarAdvance([0, 2], mask)
    job.status.set_exception(RuntimeError("the worker's verdict was waited for"))
    assert job.verdicts([a, c, a], manager.stop_token_ids) == {}  # row 1 is not constrained
    for tokens in ([c, a, a], [a, a, next(iter(manager.stop_token_ids))]):
        with pytest.raises(RuntimeError, match="waited for"):
            job.verdicts(tokens, manager.stop_token_ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xgrammar's mask kernel is CUDA's")
def test_the_managers_warm_up_compiles_every_mask_kernel_variant_a_step_picks(llm):
    """Row counts of every class, all rows or some: no compile after the warm-up."""
    from xgrammar.kernels.apply_token_bitmask_inplace_triton import (
        apply_token_bitmask_inplace_kernel as kernel,
    )

    from vllm_lite.structured_output import apply_bitmask

    engine = llm.engine
    manager = engine.structured_output_manager()  # warmed up when made

    def compiled() -> int:
        return sum(len(caches[0]) for caches in kernel.device_caches.values())

    before, vocab = compiled(), engine.hf_config.vocab_size
    for n in (1, 2, 5, 16, 32, 48, 200, 256):
        logits = torch.randn(n, vocab, dtype=engine.runner.dtype, device=engine.device)
        mask = manager.bitmask([], [], n).to(engine.device)
        apply_bitmask(logits, mask, None)
        some = torch.arange(0, n, 2, dtype=torch.int32, device=engine.device)
        apply_bitmask(logits, mask, some)
    assert compiled() == before


def test_structured_outputs_survive_preemption(model_path, llm):
    so = StructuredOutputsParams(json=SCHEMA, **COMPACT)
    params = SamplingParams(temperature=0, max_tokens=120, structured_outputs=so)
    roomy = texts(llm.generate(PROMPTS, params, use_tqdm=False))
    with LLM(model_path, **{**ENGINE, "num_blocks": 12}) as tight:  # 192 KV slots for 4 requests
        squeezed = texts(tight.generate(PROMPTS, params, use_tqdm=False))
        assert tight.engine.scheduler.num_preemptions > 0
    assert squeezed == roomy


def test_a_grammar_that_ends_finishes_with_stop_even_with_ignore_eos(llm):
    so = StructuredOutputsParams(choice=["alpha", "beta"])
    outs = llm.generate(
        PROMPTS,
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, structured_outputs=so),
        use_tqdm=False,
    )
    assert set(texts(outs)) <= {"alpha", "beta"}


def test_guided_decoding_is_the_old_name_of_structured_outputs(llm):
    old = SamplingParams(
        temperature=0, max_tokens=30, guided_decoding=GuidedDecodingParams(regex="[0-9]{4}")
    )
    new = SamplingParams(
        temperature=0, max_tokens=30, structured_outputs=StructuredOutputsParams(regex="[0-9]{4}")
    )
    assert texts(llm.generate(PROMPTS, old, use_tqdm=False)) == texts(
        llm.generate(PROMPTS, new, use_tqdm=False)
    )


def test_a_grammar_is_compiled_once_per_spec(llm):
    so = StructuredOutputsParams(regex="x[0-9]{2}y")
    llm.generate(PROMPTS, SamplingParams(max_tokens=10, n=2, structured_outputs=so), use_tqdm=False)
    llm.generate(
        PROMPTS,
        SamplingParams(
            max_tokens=10, structured_outputs=StructuredOutputsParams(regex="x[0-9]{2}y")
        ),
        use_tqdm=False,
    )
    manager = llm.engine.structured_output_manager()
    assert [k for k in manager.grammars if k[1] == "x[0-9]{2}y"] == [("regex", "x[0-9]{2}y", False)]


# ---- tool-call parsers on fixed text ------------------------------------------------------------
CALL_A = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_B = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'


def calls_of(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def streamed(parser, text, step=3):
    """Feed ``text`` a few characters at a time: (content, calls assembled from the deltas)."""
    content, calls = "", {}
    pieces = [text[i : i + step] for i in range(0, len(text), step)]
    for out in [parser.feed(p) for p in pieces] + [parser.finish()]:
        content += out[0]
        for d in out[1]:
            call = calls.setdefault(d["index"], {"function": {"name": "", "arguments": ""}})
            call["function"]["name"] += d.get("function", {}).get("name") or ""
            call["function"]["arguments"] += d.get("function", {}).get("arguments") or ""
    return content.strip() or None, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize(
    "text, content, expected",
    [
        (CALL_A, None, [("get_weather", {"city": "Paris"})]),
        (
            CALL_A + "\n" + CALL_B,
            None,
            [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})],
        ),
        ("Let me check. " + CALL_B, "Let me check.", [("add", {"a": 1, "b": 2})]),
        (
            '<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>',
            '<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>',
            [],
        ),
        ("no calls <tool at all", "no calls <tool at all", []),
    ],
)
def test_hermes_parser_finds_calls_streamed_or_not(text, content, expected):
    whole_content, whole_calls = parse_tool_calls(HermesToolParser(), text)
    assert (whole_content, calls_of(whole_calls)) == (content, expected)
    for step in (1, 4, 50):
        assert (lambda c, k: (c, calls_of(k)))(*streamed(HermesToolParser(), text, step)) == (
            content,
            expected,
        )


@pytest.mark.parametrize(
    "text, content, expected",
    [
        ('{"name": "add", "parameters": {"a": 1}}', None, [("add", {"a": 1})]),
        (
            '<|python_tag|>{"name": "a", "parameters": {}}; '
            '{"name": "b", "parameters": {"x": "y"}}',
            None,
            [("a", {}), ("b", {"x": "y"})],
        ),
        ("Hello there", "Hello there", []),
        ('{"name": "add", "parameters": ', '{"name": "add", "parameters":', []),
    ],
)
def test_llama3_json_parser_finds_calls_streamed_or_not(text, content, expected):
    whole_content, whole_calls = parse_tool_calls(Llama3JsonToolParser(), text)
    assert (whole_content, calls_of(whole_calls)) == (content, expected)
    c, k = streamed(Llama3JsonToolParser(), text, 2)
    assert (c, calls_of(k)) == (content, expected)


def test_auto_tool_choice_without_a_parser_is_a_400():
    req = ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi"}],
        tool_choice="auto",
        tools=[{"type": "function", "function": {"name": "f"}}],
    )
    with pytest.raises(RequestError, match="--tool-call-parser"):
        tool_stream(req, None)


# ---- the server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(model_path):
    llm = AsyncLLM.from_config(
        EngineConfig(model_path=model_path, **{**ENGINE, "max_model_len": 1024, "num_blocks": 128})
    )  # tools in prompts
    sock = bind("127.0.0.1", 0)
    srv = make_server(
        build_app(llm, ["tiny"], None, None, tool_call_parser="hermes"),
        drain_timeout=5,
        log_level="warning",
    )
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    yield OpenAI(
        base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1",
        api_key="x",
        max_retries=0,
        timeout=60,
    )
    srv.should_exit = True
    thread.join(30)


COMPACT_BODY = {"structured_outputs": COMPACT}
HI = [{"role": "user", "content": "Describe a thing."}]


class Owner(BaseModel):
    id: int = Field(ge=0, le=999)
    ok: bool


class Thing(BaseModel):
    name: str = Field(min_length=1, max_length=6)
    scores: list[Annotated[int, Field(ge=0, le=9)]] = Field(max_length=3)
    owner: Owner


def test_chat_parse_with_a_pydantic_response_format_gives_the_model(client):
    r = client.chat.completions.parse(
        model="tiny",
        messages=HI,
        response_format=Thing,
        temperature=0,
        max_tokens=150,
        extra_body=COMPACT_BODY,
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, Thing)


def test_streamed_json_schema_chat_parses_and_validates(client):
    rf = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    stream = client.chat.completions.create(
        model="tiny",
        messages=HI,
        response_format=rf,
        temperature=0,
        max_tokens=150,
        stream=True,
        extra_body=COMPACT_BODY,
    )
    chunks = [c for c in stream if c.choices]
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(
        json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), SCHEMA
    )


def test_completions_take_structured_outputs_and_guided_fields(client):
    regex = client.completions.create(
        model="tiny",
        prompt="hello",
        max_tokens=20,
        temperature=0,
        extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}},
    )
    choice = client.completions.create(
        model="tiny",
        prompt="hello",
        max_tokens=20,
        temperature=0,
        n=2,
        seed=1,
        extra_body={"guided_choice": ["red", "green"]},
    )
    obj = client.completions.create(
        model="tiny",
        prompt="hello",
        max_tokens=200,
        temperature=0,
        extra_body={
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "thing", "schema": SCHEMA},
            },
            **COMPACT_BODY,
        },
    )
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", regex.choices[0].text)
    assert {c.text for c in choice.choices} <= {"red", "green"}
    assert obj.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(obj.choices[0].text), SCHEMA)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"structured_outputs": {"json": {"type": "foo"}}}, "structured_outputs"),
        ({"guided_regex": "a(b"}, "guided_regex"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "bogus"}},
                }
            },
            "response_format",
        ),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ],
)
def test_an_invalid_constraint_is_a_400_naming_the_field(client, body, param):
    with pytest.raises(BadRequestError) as info:
        client.completions.create(model="tiny", prompt="hello", max_tokens=5, extra_body=body)
    assert info.value.body["param"] == param


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 8},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}


def check_calls(calls, names):
    assert [c.function.name for c in calls] == names
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_call_has_arguments_that_validate(client, stream):
    kwargs = dict(
        model="tiny",
        messages=HI,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        temperature=0,
        max_tokens=60,
        extra_body=COMPACT_BODY,
    )
    if not stream:
        r = client.chat.completions.create(**kwargs)
        assert r.choices[0].finish_reason == "tool_calls"
        return check_calls(r.choices[0].message.tool_calls, ["add"])
    with client.chat.completions.stream(**kwargs) as s:
        final = s.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    check_calls(final.choices[0].message.tool_calls, ["add"])


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_calls_have_arguments_that_validate(client, stream):
    kwargs = dict(
        model="tiny",
        messages=HI,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=150,
        extra_body=COMPACT_BODY,
    )
    if not stream:
        message = client.chat.completions.create(**kwargs).choices[0]
    else:
        with client.chat.completions.stream(**kwargs) as s:
            message = s.get_final_completion().choices[0]
    assert message.finish_reason == "tool_calls" and not message.message.content
    check_calls(message.message.tool_calls, [message.message.tool_calls[0].function.name])


def test_assistant_tool_calls_and_tool_answers_are_accepted_in_the_history(client):
    history = HI + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    r = client.chat.completions.create(
        model="tiny", messages=history, tools=TOOLS, max_tokens=5, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tools_reach_the_chat_template(client):
    plain = client.chat.completions.create(model="tiny", messages=HI, max_tokens=1)
    with_tools = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=1, tools=TOOLS, tool_choice="none"
    )
    assert (
        with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50
    )  # the definitions, as JSON


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_reads_the_models_hermes_calls(client, stream):
    # the text is forced (a choice) to what a Hermes-format model writes: text, then a call
    said = 'Sure. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    kwargs = dict(
        model="tiny",
        messages=HI,
        tools=TOOLS,
        tool_choice="auto",
        max_tokens=120,
        temperature=0,
        extra_body={"structured_outputs": {"choice": [said]}},
    )
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
    else:
        with client.chat.completions.stream(**kwargs) as s:
            choice = s.get_final_completion().choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content.strip() == "Sure."
    check_calls(choice.message.tool_calls, ["add"])
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"a": 1, "b": 2}
