"""The OpenAI-compatible server (``vllm-lite serve``) on a tiny random model, spoken to with the
official ``openai`` client (and raw HTTP where the wire format itself is the point). One server
runs in a thread for the whole module; SIGTERM and the command line run in subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from openai import APIStatusError, OpenAI
from tiny_models import make_tiny_model, prompts_of_lengths

from vllm_lite import LLM, SamplingParams
from vllm_lite.config import EngineConfig
from vllm_lite.engine.output_processor import RequestDelta
from vllm_lite.entrypoints import protocol
from vllm_lite.entrypoints.async_engine import AsyncLLM
from vllm_lite.entrypoints.metrics import ServerMetrics, observe_many
from vllm_lite.entrypoints.openai_server import _Job, bind, build_app, make_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key"
NAME = "tiny"
ENGINE = dict(num_blocks=64, block_size=16, max_model_len=256, max_num_seqs=4)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("served")), "llama")


@pytest.fixture(scope="module")
def server(model_path):
    metrics = ServerMetrics(NAME)
    llm = AsyncLLM.from_config(EngineConfig(model_path=model_path, **ENGINE), metrics)
    sock = bind("127.0.0.1", 0)
    srv = make_server(build_app(llm, [NAME], KEY, metrics), drain_timeout=5, log_level="warning")
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    srv.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.llm = llm
    yield srv
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(model_path):
    llm = LLM(model_path, **ENGINE)
    yield llm
    llm.close()


def post(server, path, body, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(
        server.url + path,
        content=content,
        headers={**headers, "Content-Type": "application/json"},
        timeout=60,
        **kwargs,
    )


def sse_events(server, body) -> list[str]:
    """The raw ``data:`` payloads of a streamed completion."""
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]


def engine_busy(llm) -> bool:
    """Whether, after its last step, the engine process holds a request or a KV block."""
    state = llm.engine_state
    return bool(state.num_running or state.num_waiting or state.num_free_blocks != state.num_blocks)


def wait_until_idle(llm, timeout=20.0) -> None:
    deadline = time.time() + timeout
    while engine_busy(llm):
        state = llm.engine_state
        assert time.time() < deadline, (
            f"engine still busy: {state.num_free_blocks}/{state.num_blocks} blocks free"
        )
        time.sleep(0.02)


def aborted_requests(server) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total{") and 'finished_reason="abort"' in line
    )


def error_of(exc_info) -> dict:
    body = exc_info.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def needs(*fields):
    """Skip until the engine's SamplingParams has these fields (the server answers 400
    meanwhile)."""
    missing = sorted(set(fields) - protocol.supported_sampling_fields())
    return pytest.mark.skipif(bool(missing), reason=f"SamplingParams has no {missing} yet")


GREEDY = dict(
    temperature=0, max_tokens=12, extra_body={"ignore_eos": True}
)  # the openai client's keywords
GREEDY_PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
RAW_GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}  # the same, in a JSON body


# ---- completions and chat ---------------------------------------------------------------------
def test_completion_greedy_equals_llm_generate(client, reference):
    prompt = "The quick brown fox"
    ours = client.completions.create(model=NAME, prompt=prompt, **GREEDY)
    ref = reference.generate(prompt, GREEDY_PARAMS, use_tqdm=False)[0].outputs[0]
    assert ours.choices[0].text == ref.text
    assert ours.choices[0].finish_reason == "length"


def test_completion_of_token_ids_equals_llm_generate(client, reference):
    prompt = [5, 17, 42, 99, 3]
    ours = client.completions.create(model=NAME, prompt=prompt, **GREEDY)
    ref = reference.generate(prompt, GREEDY_PARAMS, use_tqdm=False)[0].outputs[0]
    assert ours.choices[0].text == ref.text


def test_chat_greedy_equals_llm_chat(client, reference):
    messages = [{"role": "user", "content": "Paged attention keeps"}]
    ours = client.chat.completions.create(model=NAME, messages=messages, **GREEDY)
    ref = reference.chat(messages, GREEDY_PARAMS, use_tqdm=False)[0].outputs[0]
    assert ours.choices[0].message.role == "assistant"
    assert ours.choices[0].message.content == ref.text


def test_streamed_completion_concatenates_to_the_non_streamed_text(client):
    full = client.completions.create(model=NAME, prompt="Continuous batching", **GREEDY)
    chunks = list(
        client.completions.create(model=NAME, prompt="Continuous batching", stream=True, **GREEDY)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_streamed_chat_starts_with_the_role_and_concatenates_to_the_non_streamed_text(client):
    messages = [{"role": "user", "content": "Hello"}]
    full = client.chat.completions.create(model=NAME, messages=messages, **GREEDY)
    chunks = list(
        client.chat.completions.create(model=NAME, messages=messages, stream=True, **GREEDY)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    )
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_ends_with_done_after_the_usage_chunk(server):
    events = sse_events(
        server,
        {
            "model": NAME,
            "prompt": "The lazy dog",
            "stream": True,
            "stream_options": {"include_usage": True},
            **RAW_GREEDY,
        },
    )
    assert events[-1] == "[DONE]"
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == GREEDY["max_tokens"]


@needs("n")
def test_usage_counts_prompt_tokens_once_and_every_completion(client, server):
    prompt = "Héllo wörld"
    n_prompt = post(server, "/tokenize", {"prompt": prompt}).json()["count"]
    out = client.completions.create(
        model=NAME,
        prompt=prompt,
        n=3,
        max_tokens=5,
        temperature=1,
        seed=1,
        extra_body={"ignore_eos": True},
    )
    assert out.usage.prompt_tokens == n_prompt
    assert out.usage.completion_tokens == 15
    assert out.usage.total_tokens == n_prompt + 15


@needs("n")
def test_several_prompts_and_n_give_choices_indexed_prompt_major(client):
    out = client.completions.create(
        model=NAME,
        prompt=[[5, 6, 7], [8, 9, 10, 11]],
        n=2,
        max_tokens=4,
        temperature=0.8,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == 7 and out.usage.completion_tokens == 16


def test_echo_prepends_the_prompt(client):
    plain = client.completions.create(model=NAME, prompt="The quick", **GREEDY)
    echoed = client.completions.create(model=NAME, prompt="The quick", echo=True, **GREEDY)
    assert echoed.choices[0].text == "The quick" + plain.choices[0].text


@needs("logprobs")
def test_completion_logprobs_have_one_entry_per_token(client):
    out = client.completions.create(model=NAME, prompt="The quick", logprobs=2, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == GREEDY["max_tokens"]
    assert all(x <= 0 for x in lp.token_logprobs)
    # the top 2 and the sampled token, keyed by text (two tokens may share one, e.g. a partial byte)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert all(
        lp.token_logprobs[i] == top[lp.tokens[i]] or lp.tokens[i] == "\ufffd"
        for i, top in enumerate(lp.top_logprobs)
    )


@needs("prompt_logprobs")
def test_prompt_logprobs_score_every_prompt_token_but_the_first(client):
    out = client.completions.create(
        model=NAME, prompt=[5, 6, 7, 8], max_tokens=1, extra_body={"prompt_logprobs": 2}
    )
    scored = out.model_extra["prompt_logprobs"]
    assert len(scored) == 4 and scored[0] is None
    assert all(str(t) in entry and 2 <= len(entry) <= 3 for t, entry in zip([6, 7, 8], scored[1:]))


@needs("logprobs")
def test_chat_logprobs_give_top_logprobs_in_rank_order(client):
    out = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Hi"}],
        logprobs=True,
        top_logprobs=3,
        **GREEDY,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == GREEDY["max_tokens"]
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert entry.logprob == pytest.approx(
            entry.top_logprobs[0].logprob
        )  # greedy: the top token


@needs("repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias")
def test_sampling_extras_are_applied(client, reference):
    extra = dict(repetition_penalty=1.3, top_k=5, min_tokens=3)
    params = dict(
        max_tokens=10,
        temperature=0,
        presence_penalty=0.5,
        frequency_penalty=0.4,
        logit_bias={"7": 5},
    )
    ours = client.completions.create(model=NAME, prompt=[4, 5, 6], extra_body=extra, **params)
    ref = reference.generate([4, 5, 6], SamplingParams(**params, **extra), use_tqdm=False)[
        0
    ].outputs[0]
    assert ours.choices[0].text == ref.text and ours.usage.completion_tokens == len(ref.token_ids)
    assert ours.choices[0].text == ref.text


def test_stop_string_text_is_never_streamed_past_the_stop(client):
    prompt = [11, 12, 13, 14]
    full = (
        client.completions.create(
            model=NAME, prompt=prompt, temperature=0, max_tokens=30, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # likely spans a token boundary
    expected = full[: full.index(stop)]
    chunks = list(
        client.completions.create(
            model=NAME,
            prompt=prompt,
            temperature=0,
            max_tokens=30,
            stop=[stop],
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_new_request_joins_the_running_batch(server):
    """A short request sent while a long one streams finishes first (continuous batching)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {
        "model": NAME,
        "prompt": [5, 6, 7],
        "max_tokens": 200,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60
    ) as long:
        lines = long.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        short = post(
            server,
            "/v1/completions",
            {
                "model": NAME,
                "prompt": [8, 9],
                "max_tokens": 2,
                **{"temperature": 0, "ignore_eos": True},
            },
        )
        assert short.status_code == 200
        rest = [line for line in lines if line.startswith("data: ")]
    finishes = [
        json.loads(e[6:])["choices"][0]["finish_reason"] for e in rest if e != "data: [DONE]"
    ]
    assert finishes[-1] == "length" and len(finishes) >= 2  # the long one was still running


def test_more_requests_than_max_num_seqs_wait_and_all_complete(server):
    import concurrent.futures

    body = {
        "model": NAME,
        "prompt": [5, 6, 7],
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
    }
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: post(server, "/v1/completions", body), range(12)))
    assert [r.status_code for r in results] == [200] * 12
    assert len({r.json()["choices"][0]["text"] for r in results}) == 1


@needs("logprobs")
def test_a_consumer_that_falls_behind_gets_the_queued_deltas_merged(model_path):
    import asyncio

    async def run():
        llm = AsyncLLM.from_config(EngineConfig(model_path=model_path, **ENGINE))
        llm.start()
        try:
            stream = llm.generate(
                [5, 6, 7], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1)
            )
            first = await stream.__anext__()
            while engine_busy(llm):  # the engine runs ahead of the reader
                await asyncio.sleep(0.01)
            rest = [delta async for delta in stream]
        finally:
            await llm.shutdown()
        return [first, *rest]

    deltas = asyncio.run(run())
    tokens = [t for d in deltas for c in d.outputs for t in c.token_ids]
    logprobs = [lp for d in deltas for c in d.outputs for lp in c.logprobs]
    assert len(deltas) == 2 and deltas[-1].finished
    assert len(tokens) == len(logprobs) == 40 and deltas[-1].outputs[0].finish_reason == "length"


def test_an_engine_process_that_dies_fails_its_streams_and_new_requests(model_path):
    import asyncio

    from vllm_lite.entrypoints.async_engine import EngineDeadError

    async def run():
        llm = AsyncLLM.from_config(EngineConfig(model_path=model_path, **ENGINE))
        llm.start()
        try:
            stream = llm.generate(
                [5, 6, 7], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
            )
            await stream.__anext__()
            os.kill(
                llm._process.pid, signal.SIGKILL
            )  # the engine dies mid-request (OOM killer, a crash)
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass
            assert not llm.is_running
            with pytest.raises(EngineDeadError):
                await llm.generate([5], SamplingParams(max_tokens=1)).__anext__()
        finally:
            await llm.shutdown()

    asyncio.run(run())


@pytest.mark.skipif(
    torch.cuda.device_count() == 1, reason="tp 2 on CUDA needs 2 GPUs (on CPU: gloo)"
)
def test_tensor_parallel_engine_runs_in_the_engine_process_as_rank_0(model_path, reference):
    """The engine process starts the other ranks itself (so it must not be a daemon)."""
    import asyncio

    async def run():
        llm = AsyncLLM.from_config(
            EngineConfig(model_path=model_path, tensor_parallel_size=2, **ENGINE)
        )
        llm.start()
        try:
            return [
                t
                async for d in llm.generate([5, 17, 42], GREEDY_PARAMS)
                for t in d.outputs[0].token_ids
            ]
        finally:
            await llm.shutdown()

    ours = asyncio.run(run())
    assert (
        ours
        == reference.generate([5, 17, 42], GREEDY_PARAMS, use_tqdm=False)[0].outputs[0].token_ids
    )


# ---- other routes -----------------------------------------------------------------------------
def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]


def test_tokenize_and_detokenize_round_trip(server):
    ids = post(
        server, "/tokenize", {"prompt": "The quick brown fox", "add_special_tokens": False}
    ).json()["tokens"]
    assert post(server, "/detokenize", {"tokens": ids}).json()["prompt"] == "The quick brown fox"


def test_health_needs_no_key(server):
    assert httpx.get(server.url + "/health").status_code == 200


def test_metrics_count_tokens_and_latencies(client, server):
    client.completions.create(model=NAME, prompt="metrics", **GREEDY)  # noqa
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    label = f'{{model_name="{NAME}"}}'
    assert values[f"vllm:prompt_tokens_total{label}"] > 0
    assert values[f"vllm:generation_tokens_total{label}"] >= GREEDY["max_tokens"]
    for name in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
    ):
        assert values[f"vllm:{name}_count{label}"] > 0
    for gauge in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "num_preemptions_total",
    ):
        assert f"vllm:{gauge}{label}" in values


def test_observe_many_counts_as_that_many_observations():
    def rendered(record) -> list[str]:
        metrics = ServerMetrics(NAME)
        record(metrics.itl)
        return [
            line
            for line in metrics.render().decode().splitlines()
            if "inter_token" in line and "_created" not in line
        ]

    amounts = [(0.0005, 3), (0.001, 2), (0.0031, 5), (0.05, 1), (99.0, 4)]  # a bound, past all

    def one_by_one(h):
        for amount, count in amounts:
            for _ in range(count):
                h.observe(amount)

    def many(h):
        for amount, count in amounts:
            observe_many(h, amount, count)

    assert rendered(many) == rendered(one_by_one)


def test_metrics_count_prefix_cache_queries_and_hits_in_tokens(client, server):
    def counters():
        text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        label = f'{{model_name="{NAME}"}}'
        values = dict(
            line.rsplit(" ", 1)
            for line in text.splitlines()
            if line.startswith("vllm:prefix_cache_")
        )
        return float(values[f"vllm:prefix_cache_queries_total{label}"]), float(
            values[f"vllm:prefix_cache_hits_total{label}"]
        )

    prompt = prompts_of_lengths([40], 400, seed=99)[0]
    before = counters()
    for _ in range(2):
        client.completions.create(model=NAME, prompt=prompt, **GREEDY)  # noqa
    wait_until_idle(server.llm)
    queries, hits = counters()
    assert (queries - before[0], hits - before[1]) == (80, 32)  # the second found 2 blocks of 16


def test_usage_reports_cached_prompt_tokens_and_reset_prefix_cache_forgets_them(client, server):
    prompt = prompts_of_lengths([40], 400, seed=123)[0]
    first = client.completions.create(model=NAME, prompt=prompt, **GREEDY)  # noqa
    second = client.completions.create(model=NAME, prompt=prompt, **GREEDY)  # noqa
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 32  # 2 full blocks of 16
    wait_until_idle(server.llm)
    assert post(server, "/reset_prefix_cache", {}).json() == {"reset": True}
    third = client.completions.create(model=NAME, prompt=prompt, **GREEDY)  # noqa
    assert third.usage.prompt_tokens_details.cached_tokens == 0
    assert third.choices[0].text == first.choices[0].text


# ---- errors -----------------------------------------------------------------------------------
def test_malformed_json_is_400(server):
    r = post(server, "/v1/completions", '{"model": "tiny", "prompt": ')
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]


def test_missing_field_is_400_naming_it(server):
    r = post(server, "/v1/completions", {"model": NAME})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_mistyped_field_is_400_naming_it(client):
    with pytest.raises(APIStatusError) as exc:
        client.completions.create(model=NAME, prompt="x", temperature="hot")
    assert exc.value.status_code == 400 and error_of(exc)["param"] == "temperature"


def test_invalid_sampling_value_is_400_naming_it(client):
    with pytest.raises(APIStatusError) as exc:
        client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "x"}], top_p=1.5
        )
    assert exc.value.status_code == 400 and error_of(exc)["param"] == "top_p"


def test_unknown_field_is_400_not_ignored(client):
    with pytest.raises(APIStatusError) as exc:
        client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "x"}],
            prediction={"type": "content", "content": "x"},
        )
    assert exc.value.status_code == 400 and error_of(exc)["param"] == "prediction"


def test_sampling_field_the_engine_lacks_is_400_naming_it(client, monkeypatch):
    supported = protocol.supported_sampling_fields() - {"presence_penalty"}
    monkeypatch.setattr(protocol, "supported_sampling_fields", lambda: supported)
    with pytest.raises(APIStatusError) as exc:
        client.completions.create(model=NAME, prompt="x", presence_penalty=0.5)
    assert exc.value.status_code == 400 and error_of(exc)["param"] == "presence_penalty"
    assert client.completions.create(
        model=NAME, prompt="x", presence_penalty=0, max_tokens=1
    ).choices


def test_prompt_too_long_is_400(client):
    with pytest.raises(APIStatusError) as exc:
        client.completions.create(model=NAME, prompt=[5] * ENGINE["max_model_len"], max_tokens=1)
    assert exc.value.status_code == 400 and "max_model_len" in error_of(exc)["message"]


def test_completion_past_max_model_len_is_400_with_vllms_message(client):
    with pytest.raises(APIStatusError) as exc:
        client.completions.create(model=NAME, prompt=[5], max_tokens=5000)
    error = error_of(exc)
    assert exc.value.status_code == 400 and error["param"] == "max_tokens"
    assert error["message"] == (
        "'max_tokens' or 'max_completion_tokens' is too large: 5000. This model's maximum context "
        "length is 256 tokens and your request has 1 input tokens (5000 > 256 - 1)."
    )


def test_chat_past_max_model_len_is_400(client):
    with pytest.raises(APIStatusError) as exc:
        client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "Hi"}],
            max_completion_tokens=ENGINE["max_model_len"],
        )
    assert exc.value.status_code == 400
    assert "maximum context length is 256" in error_of(exc)["message"]


def test_completion_that_ends_exactly_at_max_model_len_runs(client):
    prompt = [5] * (ENGINE["max_model_len"] - 3)
    out = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 3


def test_unknown_model_is_404(client):
    with pytest.raises(APIStatusError) as exc:
        client.completions.create(model="no-such-model", prompt="x")
    assert exc.value.status_code == 404 and error_of(exc)["param"] == "model"


def test_missing_or_wrong_api_key_is_401(server):
    for key in (None, "wrong"):
        r = post(server, "/v1/completions", {"model": NAME, "prompt": "x"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401


# ---- aborts -----------------------------------------------------------------------------------
def test_client_disconnect_mid_stream_aborts_and_frees_the_blocks(server):
    wait_until_idle(server.llm)
    aborted = aborted_requests(server)
    body = {
        "model": NAME,
        "prompt": list(range(5, 60)),
        "max_tokens": 150,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
        assert engine_busy(server.llm)
    # the connection is closed: the request is aborted and its blocks are back
    wait_until_idle(server.llm)
    assert aborted_requests(server) == aborted + 1


def test_settle_heap_freezes_what_start_up_built_and_collects_young_objects_less_often():
    code = (
        "import gc; from vllm_lite.entrypoints.cli_util import settle_heap; "
        "settle_heap(); print(gc.get_freeze_count(), gc.get_threshold()[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    frozen, young = map(int, out.stdout.split())
    assert frozen > 10_000 and young == 10_000  # the imports alone are ~100k objects


def test_settled_heap_gives_back_the_heap_and_thresholds_it_found():
    import gc

    from vllm_lite.entrypoints.cli_util import settled_heap

    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    with settled_heap():
        assert gc.get_freeze_count() > frozen and gc.get_threshold()[0] == 10_000
    assert gc.get_threshold() == threshold and gc.get_freeze_count() == frozen


def test_a_streamed_job_left_at_a_yield_closes_its_request_when_cancelled():
    """The client went away while the response was writing: the job's generator is never
    resumed, and cancel() (the response's on_close) must still end the engine request."""
    closed = []

    class Engine:  # AsyncLLM's generate(): deltas until closed
        async def generate(self, ids, params, request_id):
            try:
                while True:
                    yield RequestDelta(request_id, [], False, num_new_tokens=1)
                    await asyncio.sleep(0)
            finally:
                closed.append(request_id)

    async def main():
        job = _Job(Engine(), "cmpl-1", [[1, 2, 3]], SamplingParams())
        events = job.run()
        await events.__anext__()  # one delta read, then the reader stops at the yield
        job.cancel()
        for _ in range(3):
            await asyncio.sleep(0)
        assert closed == ["cmpl-1"]
        assert job.num_output_tokens == 1

    asyncio.run(main())


def test_client_disconnect_while_waiting_for_a_full_response_aborts(server):
    import socket
    from urllib.parse import urlsplit

    wait_until_idle(server.llm)
    aborted = aborted_requests(server)
    body = json.dumps(
        {
            "model": NAME,
            "prompt": [5, 6, 7],
            "max_tokens": 240,
            "temperature": 0,
            "ignore_eos": True,
        }
    ).encode()
    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.time() + 20
        while not engine_busy(server.llm):  # running: now hang up
            assert time.time() < deadline
            time.sleep(0.001)
    wait_until_idle(server.llm)
    assert aborted_requests(server) == aborted + 1


# ---- benchmark --------------------------------------------------------------------------------
def test_bench_serve_reports_throughput_and_latency_percentiles(server, tmp_path, capsys):
    from vllm_lite.entrypoints.bench_serve import bench_serve_main
    from vllm_lite.entrypoints.benchmark import Workload

    out = tmp_path / "serve.json"
    assert (
        bench_serve_main(
            [
                "--base-url",
                server.url,
                "--api-key",
                KEY,
                "--num-prompts",
                "4",
                "--input-len",
                "4",
                "4",
                "--output-len",
                "3",
                "8",
                "--request-rate",
                "50",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["completed"] == 4 and result["failed"] == 0
    assert result["total_output_tokens"] == sum(
        Workload.random(4, (4, 4), (3, 8), vocab=1, seed=0).output_lens
    )
    for metric in ("ttft", "tpot", "itl"):
        assert (
            result[f"p50_{metric}_ms"] <= result[f"p90_{metric}_ms"] <= result[f"p99_{metric}_ms"]
        )
    assert "Output token throughput" in capsys.readouterr().out


def test_bench_serve_reads_the_streams_from_several_client_processes(server, tmp_path):
    from vllm_lite.entrypoints.bench_serve import bench_serve_main
    from vllm_lite.entrypoints.benchmark import Workload

    out = tmp_path / "serve.json"
    argv = ["--base-url", server.url, "--api-key", KEY, "--num-prompts", "5"]
    argv += ["--input-len", "4", "4", "--output-len", "3", "6", "--client-processes", "2"]
    assert bench_serve_main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 5 and result["failed"] == 0
    lens = Workload.random(5, (4, 4), (3, 6), vocab=1, seed=0).output_lens
    assert result["total_output_tokens"] == sum(lens)
    assert 0 < result["duration_s"] < 30 and result["p50_tpot_ms"] > 0


def test_bench_serve_sends_text_prompts_without_vllm_fields(server, model_path, tmp_path):
    """--tokenizer: prompts go as their ids' text (servers that take only strings);
    --no-ignore-eos: the body has OpenAI's fields only."""
    from transformers import AutoTokenizer

    from vllm_lite.entrypoints.bench_serve import bench_serve_main, request_body

    out = tmp_path / "serve.json"
    assert (
        bench_serve_main(
            [
                "--base-url",
                server.url,
                "--api-key",
                KEY,
                "--num-prompts",
                "3",
                "--input-len",
                "5",
                "9",
                "--output-len",
                "2",
                "4",
                "--tokenizer",
                model_path,
                "--no-ignore-eos",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["completed"] == 3 and result["failed"] == 0 and result["total_output_tokens"] >= 3
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    body = request_body("m", [40, 41, 42], 5, 1.0, tokenizer, ignore_eos=False)
    assert body["prompt"] == tokenizer.decode([40, 41, 42]) and isinstance(body["prompt"], str)
    assert "ignore_eos" not in body and request_body("m", [40], 5, 1.0)["ignore_eos"] is True


# ---- subprocesses: SIGTERM and the command line -----------------------------------------------
def _env():
    return {
        **os.environ,
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "VLLM_LITE_API_KEY": "",
    }


@pytest.mark.parametrize("how", ["SIGTERM to the server", "Ctrl-C to the process group"])
def test_sigterm_drains_running_requests_then_exits_cleanly(model_path, tmp_path, how):
    """The engine process ignores both signals: the server drains, then stops it."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm_lite.entrypoints.cli",
            "serve",
            model_path,
            "--port",
            "0",
            "--max-model-len",
            "512",
            "--num-blocks",
            "64",
            "--log-level",
            "warning",
        ],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert " on http://" in line, line + proc.stderr.read() if proc.poll() is not None else line
        url = line.split(" on ")[1].split()[0]
        body = {
            "model": os.path.basename(model_path),
            "prompt": [5, 6, 7],
            "max_tokens": 500,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            if how == "SIGTERM to the server":
                proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGINT)
            deadline = time.time() + 10
            probe = {**body, "stream": False, "stream_options": None, "max_tokens": 1}
            while (status := httpx.post(url + "/v1/completions", json=probe).status_code) != 503:
                assert status == 200 and time.time() < deadline
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert (
            json.loads(events[-2])["usage"]["completion_tokens"] == 500
        )  # the running request finished
        assert proc.wait(timeout=30) == 0
        assert "draining" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


BAD_COMMANDS = {
    "serve --block-size 0": (["serve", "--block-size", "0"], "block_size"),
    "serve missing folder": (["serve", "/no/such/model"], "model_path"),
    "serve unknown flag": (["serve", "--blok-size", "4"], "--blok-size"),
    "serve bad port": (["serve", "--port", "99999"], "--port"),
    "serve max_model_len over the model's": (
        ["serve", "--port", "0", "--max-model-len", "99999999"],
        "max_model_len",
    ),  # raised in the engine process
    "generate --block-size 0": (["generate", "--block-size", "0"], "block_size"),
    "generate missing folder": (["generate", "--model", "/no/such/model"], "model_path"),
    "bench serve --num-prompts 0": (["bench", "serve", "--num-prompts", "0"], "--num-prompts"),
    "bench serve --client-processes 0": (
        ["bench", "serve", "--client-processes", "0"],
        "--client-processes",
    ),
    "bench serve --client-processes 2 --max-concurrency 4": (
        ["bench", "serve", "--client-processes", "2", "--max-concurrency", "4"],
        "--max-concurrency",
    ),
    "bench throughput --block-size 0": (["bench", "throughput", "--block-size", "0"], "block_size"),
}


@pytest.mark.parametrize("command", BAD_COMMANDS)
def test_bad_flag_or_config_value_is_one_line_on_stderr_and_exit_2(
    command, capsys, monkeypatch, tmp_path
):
    from vllm_lite.entrypoints.cli import main

    monkeypatch.chdir(tmp_path)  # no config.yaml
    args, key = BAD_COMMANDS[command]
    with pytest.raises(SystemExit) as exc:
        main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and key in lines[0], lines


def test_main_py_bad_config_value_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "main.py"), "--block-size", "0"],
        cwd=tmp_path,
        env={**_env(), "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "block_size" in lines[0], result.stderr
