"""``vllm-lite serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on ``AsyncLLM``.

Routes: POST /v1/completions, POST /v1/chat/completions (both with ``stream: true`` as
server-sent events ending in ``data: [DONE]``; structured outputs on both, tool calls on chat:
``tool_calls.py``), GET /v1/models, GET /health, GET /metrics
(Prometheus), POST /tokenize, POST /detokenize. Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``. With an API key every route but /health
needs ``Authorization: Bearer KEY``. SIGTERM (or Ctrl-C) drains: new requests get 503, running
ones finish (for at most ``--drain-timeout`` seconds, then they are aborted), then the process
exits with status 0; a second signal stops at once. ``--api-server-count N``: N processes
serve this app on one engine core (``api_servers.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator

try:
    import orjson
except ImportError:  # the plain json module does the same, slower
    orjson = None

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vllm_lite.entrypoints.async_engine import (
    AsyncLLM,
    EngineDeadError,
    EngineStoppedError,
    RequestDelta,
)
from vllm_lite.entrypoints.cli_util import load_config, settle_heap
from vllm_lite.entrypoints.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from vllm_lite.entrypoints.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    RequestError,
    TokenizeRequest,
    message_text,
    to_sampling_params,
)
from vllm_lite.entrypoints.tool_calls import (
    TOOL_PARSERS,
    parse_tool_calls,
    template_messages,
    tool_stream,
)

logger = logging.getLogger("vllm_lite.server")
MIN_LOGPROB = -9999.0  # JSON has no -inf (vLLM's clamp)


# ---- errors ----------------------------------------------------------------------------------
def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type: str | None = None,
    param: str | None = None,
    code: str | int | None = None,
) -> JSONResponse:
    type = type or ("server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(error_body(message, type, param, code), status_code=status)


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable line (and the top-level field) from pydantic's errors; the first one decides."""
    err = errors[0]
    # drop "body" and the union-member tags pydantic puts in the location ("list[int]", "str")
    loc = [
        str(x)
        for x in err.get("loc", ())
        if x != "body"
        and (isinstance(x, int) or str(x).isidentifier())
        and str(x) not in _TYPE_TAGS
    ]
    where, param = ".".join(loc), (loc[0] if loc else None)
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    if kind == "extra_forbidden":
        return f"unknown or unsupported field '{where}'", param
    if kind == "missing":
        return f"missing required field '{where}'", param
    if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        return (
            "the request body must be a JSON object (sent as Content-Type: application/json)",
            None,
        )
    if not loc:
        return f"request body: {err.get('msg')}", None
    same_field = [e for e in errors if e.get("loc", ())[1:2] == err.get("loc", ())[1:2]]
    if len(same_field) > 1 and param in _FIELD_TYPES:  # a union: say which forms are accepted
        return (
            f"field '{param}' must be {_FIELD_TYPES[param]} "
            f"(got {_short(same_field[0].get('input'))})",
            param,
        )
    return f"field '{where}': {err.get('msg')} (got {_short(err.get('input'))})", param


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_FIELD_TYPES = {
    name: str(f.annotation).replace("typing.", "").replace("NoneType", "null")
    for model in (CompletionRequest, ChatCompletionRequest)
    for name, f in model.model_fields.items()
}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "model_attributes_type"}


def _engine_error_param(message: str, prompt_param: str) -> str | None:
    if message.startswith("SamplingParams."):
        return message.split()[0].split(".", 1)[1]
    if message.startswith("request needs up to"):  # prompt + max_tokens exceed the KV pool
        return "max_tokens"
    if "prompt" in message:
        return prompt_param
    if "max_tokens" in message:
        return "max_tokens"
    return None


def context_length_error(
    num_prompt_tokens: int, max_tokens: int | None, max_model_len: int
) -> str | None:
    """vLLM's server rule: a request whose prompt fits but whose ``max_tokens`` would run past
    ``max_model_len`` is refused, not cut short (the offline ``LLM`` stops at the limit instead,
    as vLLM's does). The message is vLLM's word for word: clients parse its numbers."""
    if (
        max_tokens is None
        or num_prompt_tokens >= max_model_len
        or num_prompt_tokens + max_tokens <= max_model_len
    ):
        return None  # no limit asked, a prompt too long (the engine's error), or it fits
    return (
        f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
        f"maximum context length is {max_model_len} tokens and your request has "
        f"{num_prompt_tokens} input tokens ({max_tokens} > {max_model_len} - "
        f"{num_prompt_tokens})."
    )


# ---- the app ---------------------------------------------------------------------------------
class ServerState:
    def __init__(
        self,
        async_llm: AsyncLLM,
        served_model_names: list[str],
        api_key: str | None,
        metrics: ServerMetrics | None,
    ) -> None:
        self.llm, self.names, self.api_key, self.metrics = (
            async_llm,
            served_model_names,
            api_key,
            metrics,
        )
        self.draining = False
        self.created = int(time.time())

    @property
    def model_name(self) -> str:
        return self.names[0]

    def check_model(self, name: str | None) -> str:
        if name is None or name in self.names:
            return self.model_name if name is None else name
        raise RequestError(
            f"The model `{name}` does not exist.", param="model", status=404, code="model_not_found"
        )


class _Gate:
    """Pure ASGI middleware (streams stay untouched): 503 while draining, then the API key."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.state.draining and path != "/metrics":
            response = error_response(
                503, "the server is shutting down", type="server_error", code="draining"
            )
            return await response(scope, receive, send)
        if self.state.api_key and path != "/health":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode("latin-1")
            expected = f"Bearer {self.state.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                response = error_response(
                    401,
                    "Incorrect API key provided (send 'Authorization: Bearer KEY').",
                    code="invalid_api_key",
                )
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class _SSE(StreamingResponse):
    """Server-sent events; ``on_close`` runs however the response ends (client gone included)."""

    def __init__(self, content: AsyncIterator[str], on_close) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def sse(data) -> bytes:
    """One server-sent event. orjson where installed: ~10x cheaper than json.dumps per chunk,
    and a chunk per request per engine step is most of the front end's CPU."""
    if orjson is not None:
        return b"data: " + orjson.dumps(data) + b"\n\n"
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def build_app(
    async_llm: AsyncLLM,
    served_model_names: list[str],
    api_key: str | None = None,
    metrics: ServerMetrics | None = None,
    tool_call_parser: str | None = None,
) -> FastAPI:
    """``tool_call_parser``: how "auto" tool calls are read from the text (``TOOL_PARSERS``)."""
    if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
        raise ValueError(
            f"unknown tool call parser {tool_call_parser!r}; known: {sorted(TOOL_PARSERS)}"
        )
    state = ServerState(async_llm, served_model_names, api_key, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async_llm.start()
        try:
            yield
        finally:
            await async_llm.shutdown()

    app = FastAPI(title="vllm-lite", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_middleware(_Gate, state=state)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(list(exc.errors()))
        return error_response(400, message, param=param)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return error_response(
            exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), code=exc.status_code)

    @app.exception_handler(EngineDeadError)
    @app.exception_handler(EngineStoppedError)
    async def _engine_gone(request: Request, exc: Exception):
        return error_response(503, str(exc), type="server_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("request failed")
        return error_response(500, f"internal error: {exc!r}", type="server_error")

    tokenizer = async_llm.tokenizer
    info = async_llm.info

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids) if tokenizer is not None else ""

    def encode_prompt(prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise RequestError(
                    "this model has no tokenizer: send the prompt as token ids", param="prompt"
                )
            return prompt, tokenizer.encode(prompt)
        return None, list(prompt)

    def chat_prompt(req) -> tuple[str, list[int]]:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise RequestError(
                "this model has no chat template: use /v1/completions", param="messages"
            )
        messages = template_messages(req, message_text)
        tools = getattr(req, "tools", None)
        extra = {"tools": [t.model_dump(exclude_none=True) for t in tools]} if tools else {}
        try:
            text = tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=bool(req.add_generation_prompt),
                **extra,
            )
        except Exception as exc:  # noqa: BLE001 - a template that rejects the conversation
            raise RequestError(
                f"the chat template rejected the messages: {exc}", param="messages"
            ) from None
        return text, tokenizer.encode(text, add_special_tokens=False)

    def check(prompts: list[list[int]], params, prompt_param: str) -> None:
        for i, ids in enumerate(prompts):
            try:
                too_long = context_length_error(
                    len(ids), params.max_tokens, info.limits.max_model_len
                )
                if too_long:
                    raise ValueError(too_long)
                async_llm.check_request(ids, params)
            except ValueError as exc:
                message = str(exc) if len(prompts) == 1 else f"prompt {i}: {exc}"
                raise RequestError(
                    message, param=_engine_error_param(str(exc), prompt_param)
                ) from None

    def token_text(entry, token_id: int) -> str:
        text = getattr(entry, "decoded_token", None)
        return text if text is not None else f"token_id:{token_id}"

    def clamp(lp: float) -> float:
        return max(lp, MIN_LOGPROB)

    def prompt_logprobs_json(entries: list | None) -> list | None:
        """vLLM's layout: per prompt token None (the first) or {token id: {logprob, rank,
        decoded_token}}."""
        if entries is None:
            return None
        return [
            None
            if d is None
            else {
                str(t): {
                    "logprob": clamp(e.logprob),
                    "rank": e.rank,
                    "decoded_token": e.decoded_token,
                }
                for t, e in d.items()
            }
            for d in entries
        ]

    # ---- routes ----------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not async_llm.is_running:
            return error_response(503, "the engine is not running", type="server_error")
        return Response(status_code=200)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        """vLLM's route: forget every cached prefix (not while requests hold KV blocks)."""
        return {"reset": await async_llm.reset_prefix_cache()}

    @app.get("/v1/models")
    async def models():
        card = {
            "object": "model",
            "created": state.created,
            "owned_by": "vllm-lite",
            "root": info.model_path,
            "parent": None,
            "max_model_len": info.config.max_model_len,
            "vocab_size": info.vocab_size,
        }
        return {"object": "list", "data": [{"id": name, **card} for name in state.names]}

    @app.get("/metrics")
    async def prometheus_metrics():
        body = metrics.render() if metrics is not None else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise RequestError("give exactly one of 'prompt' and 'messages'", param="prompt")
        if tokenizer is None:
            raise RequestError("this model has no tokenizer", param="prompt")
        if req.messages is not None:
            _, ids = chat_prompt(req)
        else:
            ids = tokenizer.encode(req.prompt, add_special_tokens=bool(req.add_special_tokens))
        return {"tokens": ids, "count": len(ids), "max_model_len": info.config.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        state.check_model(req.model)
        if tokenizer is None:
            raise RequestError("this model has no tokenizer", param="tokens")
        vocab = info.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise RequestError(f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        model = state.check_model(req.model)
        params = to_sampling_params(req)
        prompt = req.prompt
        if isinstance(prompt, list) and not prompt:
            raise RequestError("'prompt' must not be empty", param="prompt")
        items = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        encoded = [encode_prompt(p) for p in items]
        check([ids for _, ids in encoded], params, "prompt")
        texts = [
            text if text is not None else decode(ids) if req.echo else "" for text, ids in encoded
        ]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        job = _Job(async_llm, request_id, [ids for _, ids in encoded], params)
        n, k = params.n if hasattr(params, "n") else 1, req.logprobs
        created = int(time.time())
        num_prompt_tokens = sum(len(ids) for _, ids in encoded)

        def logprobs_of(token_ids, entries, offset: int):
            out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for t, d in zip(token_ids, entries):
                if d is None:  # the first prompt token has no logprob
                    text = decode([t])
                    out["tokens"].append(text)
                    out["token_logprobs"].append(None)
                    out["top_logprobs"].append(None)
                else:
                    text = token_text(d[t], t)
                    out["tokens"].append(text)
                    out["token_logprobs"].append(clamp(d[t].logprob))
                    out["top_logprobs"].append(
                        {token_text(e, tid): clamp(e.logprob) for tid, e in d.items()}
                    )
                out["text_offset"].append(offset)
                offset += len(text)
            return out, offset

        def choice_part(i: int, c: _Choice, delta, first: bool):
            text = delta.text
            lp = None
            if first and req.echo:
                text = texts[i] + text
            if k is not None:
                if first and req.echo:
                    pl = job.prompt_logprobs[i] or [None] * len(job.prompts[i])
                    lp, c.offset = logprobs_of(job.prompts[i], pl, c.offset)
                else:
                    lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                new_lp, c.offset = logprobs_of(delta.token_ids, delta.logprobs or [], c.offset)
                for key in lp:
                    lp[key] += new_lp[key]
            return {
                "index": i * n + delta.index,
                "text": text,
                "logprobs": lp,
                "finish_reason": delta.finish_reason,
                "stop_reason": delta.stop_reason,
            }

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)

            async def events():
                async for i, delta in job.run():
                    for cd in delta.outputs:
                        c = job.choice(i, cd.index)
                        choice = choice_part(i, c, cd, c.first)
                        c.first = False
                        chunk = {
                            "id": request_id,
                            "object": "text_completion",
                            "created": created,
                            "model": model,
                            "choices": [choice],
                        }
                        if continuous:
                            chunk["usage"] = job.usage(num_prompt_tokens)
                        yield sse(chunk)
                if include_usage:
                    yield sse(
                        {
                            "id": request_id,
                            "object": "text_completion",
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": job.usage(num_prompt_tokens),
                        }
                    )
                yield "data: [DONE]\n\n"

            return _SSE(_guard(events()), job.cancel)

        choices = {}
        async for i, delta in job.run_until_disconnect(raw):
            for cd in delta.outputs:
                c = job.choice(i, cd.index)
                part = choice_part(i, c, cd, c.first)
                c.first = False
                acc = choices.setdefault(part["index"], part)
                if acc is not part:
                    acc["text"] += part["text"]
                    if part["logprobs"] is not None:
                        for key in acc["logprobs"]:
                            acc["logprobs"][key] += part["logprobs"][key]
                    acc["finish_reason"], acc["stop_reason"] = (
                        part["finish_reason"],
                        part["stop_reason"],
                    )
        for idx in range(len(items) * n):  # completions an abort never started
            choices.setdefault(
                idx,
                {
                    "index": idx,
                    "text": "",
                    "logprobs": None,
                    "finish_reason": "abort",
                    "stop_reason": None,
                },
            )
        out = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choices[i] for i in sorted(choices)],
            "usage": job.usage(num_prompt_tokens),
        }
        if (
            req.prompt_logprobs is not None
        ):  # vLLM's field: per prompt (one list for a single prompt)
            lists = [prompt_logprobs_json(pl) for pl in job.prompt_logprobs]
            out["prompt_logprobs"] = lists[0] if len(lists) == 1 else lists
        return out

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        model = state.check_model(req.model)
        params = to_sampling_params(req)
        tool_reader = tool_stream(req, tool_call_parser)  # "auto" without a parser: 400 here
        prompt_text, ids = chat_prompt(req)
        check([ids], params, "messages")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        job = _Job(async_llm, request_id, [ids], params)
        n = getattr(params, "n", 1)
        k = params.logprobs if req.logprobs else None
        created = int(time.time())

        def logprobs_of(delta):
            if k is None:
                return None
            content = []
            for t, d in zip(delta.token_ids, delta.logprobs or []):
                text = token_text(d[t], t)
                top = sorted(
                    (
                        (e.rank, tid, e)
                        for tid, e in d.items()
                        if e.rank is not None and e.rank <= k
                    ),
                    key=lambda x: x[0],
                )
                content.append(
                    {
                        "token": text,
                        "logprob": clamp(d[t].logprob),
                        "bytes": list(text.encode()),
                        "top_logprobs": [
                            {
                                "token": token_text(e, tid),
                                "logprob": clamp(e.logprob),
                                "bytes": list(token_text(e, tid).encode()),
                            }
                            for _, tid, e in top
                        ],
                    }
                )
            return {"content": content}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)

            def chunk(choices):
                out = {
                    "id": request_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": choices,
                }
                if continuous:
                    out["usage"] = job.usage(len(ids))
                return out

            async def events():
                for i in range(n):
                    yield sse(
                        chunk(
                            [
                                {
                                    "index": i,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    )
                readers: dict[int, object] = {}
                async for _, delta in job.run():
                    for cd in delta.outputs:
                        message, finish_reason = {"content": cd.text}, cd.finish_reason
                        if tool_reader is not None:  # calls in the text: tool-call deltas
                            if cd.index not in readers:
                                readers[cd.index] = tool_stream(req, tool_call_parser)
                            reader = readers[cd.index]
                            content, calls = reader.feed(cd.text)
                            if finish_reason is not None:
                                more, more_calls = reader.finish()
                                content, calls = content + more, calls + more_calls
                                finish_reason = tool_finish_reason(reader.calls, finish_reason)
                            if not (content or calls or finish_reason or cd.logprobs):
                                continue  # held back: maybe the start of a call
                            message = {"content": content}
                            if calls:
                                message["tool_calls"] = calls
                        yield sse(
                            chunk(
                                [
                                    {
                                        "index": cd.index,
                                        "delta": message,
                                        "logprobs": logprobs_of(cd),
                                        "finish_reason": finish_reason,
                                        "stop_reason": cd.stop_reason,
                                    }
                                ]
                            )
                        )
                if include_usage:
                    out = chunk([])
                    out["usage"] = job.usage(len(ids))
                    yield sse(out)
                yield "data: [DONE]\n\n"

            return _SSE(_guard(events()), job.cancel)

        choices: dict[int, dict] = {}
        async for _, delta in job.run_until_disconnect(raw):
            for cd in delta.outputs:
                c = choices.setdefault(
                    cd.index,
                    {
                        "index": cd.index,
                        "message": {"role": "assistant", "content": ""},
                        "logprobs": {"content": []} if k is not None else None,
                        "finish_reason": None,
                        "stop_reason": None,
                    },
                )
                c["message"]["content"] += cd.text
                if k is not None:
                    c["logprobs"]["content"] += logprobs_of(cd)["content"]
                c["finish_reason"], c["stop_reason"] = cd.finish_reason, cd.stop_reason
        for idx in range(n):
            choices.setdefault(
                idx,
                {
                    "index": idx,
                    "message": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": "abort",
                    "stop_reason": None,
                },
            )
        if tool_reader is not None:
            for c in choices.values():
                reader = tool_stream(req, tool_call_parser)
                content, calls = parse_tool_calls(reader, c["message"]["content"])
                c["message"]["content"] = content
                if calls:
                    c["message"]["tool_calls"] = calls
                c["finish_reason"] = tool_finish_reason(calls, c["finish_reason"])
        out = {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [choices[i] for i in sorted(choices)],
            "usage": job.usage(len(ids)),
        }
        if req.prompt_logprobs is not None:
            out["prompt_logprobs"] = prompt_logprobs_json(job.prompt_logprobs[0])
        return out

    return app


def tool_finish_reason(calls: list, finish_reason: str | None) -> str | None:
    """OpenAI's "tool_calls" for an output that ended on its own with calls in it."""
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }  # from the prefix cache


async def _guard(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An error after the stream started becomes an error event, then ``[DONE]``."""
    try:
        async for event in events:
            yield event
    except RequestError as exc:
        yield sse(error_body(exc.message, exc.type, exc.param, exc.code))
        yield "data: [DONE]\n\n"
    except ValueError as exc:
        yield sse(error_body(str(exc)))
        yield "data: [DONE]\n\n"
    except (EngineDeadError, EngineStoppedError) as exc:
        yield sse(error_body(str(exc), "server_error"))
        yield "data: [DONE]\n\n"


class _Choice:
    __slots__ = ("first", "offset")

    def __init__(self) -> None:
        self.first, self.offset = True, 0


class _Job:
    """The engine requests of one HTTP request (one per prompt), merged into one stream of
    (prompt index, delta). Cancelling it (client gone) aborts every one of them.

    A streamed job of one request reads that request's stream itself (no task, no queue between:
    a task switch less per token); several requests, or a full response that must notice a
    client going away while it waits, read each stream in a task of its own."""

    def __init__(
        self, async_llm: AsyncLLM, request_id: str, prompts: list[list[int]], params
    ) -> None:
        self.llm, self.request_id, self.prompts, self.params = (
            async_llm,
            request_id,
            prompts,
            params,
        )
        self.tasks: list[asyncio.Task] = []
        self._stream: AsyncIterator | None = None  # the one request's stream, read directly
        self.num_output_tokens = 0
        self.cached_tokens = [0] * len(prompts)  # per prompt, from the prefix cache
        self.prompt_logprobs: list[list | None] = [None] * len(prompts)
        self.choices: dict[tuple[int, int], _Choice] = {}

    def usage(self, prompt_tokens: int) -> dict:
        return _usage(prompt_tokens, self.num_output_tokens, sum(self.cached_tokens))

    def choice(self, i: int, index: int) -> _Choice:
        return self.choices.setdefault((i, index), _Choice())

    def _account(self, i: int, delta: RequestDelta) -> None:
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs[i] = delta.prompt_logprobs
        self.num_output_tokens += delta.num_new_tokens
        self.cached_tokens[i] = delta.num_cached_tokens

    async def run(self, direct: bool = True) -> AsyncIterator[tuple[int, RequestDelta]]:
        if direct and len(self.prompts) == 1:
            self._stream = stream = self.llm.generate(self.prompts[0], self.params, self.request_id)
            try:
                async for delta in stream:
                    self._account(0, delta)
                    yield 0, delta
                self._stream = None  # it ended: nothing to close
            finally:
                self.cancel()
            return
        q: asyncio.Queue = asyncio.Queue()
        done = object()

        async def one(i: int, ids: list[int]) -> None:
            rid = self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{i}"
            try:
                async for delta in self.llm.generate(ids, self.params, request_id=rid):
                    q.put_nowait((i, delta))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - handed to the reader
                q.put_nowait(exc)
            finally:
                q.put_nowait(done)

        self.tasks = [asyncio.ensure_future(one(i, ids)) for i, ids in enumerate(self.prompts)]
        remaining = len(self.tasks)
        try:
            while remaining:
                item = await q.get()
                if item is done:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                i, delta = item
                self._account(i, delta)
                yield i, delta
        finally:
            self.cancel()

    async def run_until_disconnect(
        self, request: Request
    ) -> AsyncIterator[tuple[int, RequestDelta]]:
        """``run()`` for a non-streaming response: a client that goes away aborts the job."""
        gone = asyncio.Event()

        async def watch() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    self.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            async for item in self.run(direct=False):  # tasks: cancel() interrupts their wait
                yield item
        except asyncio.CancelledError:
            if gone.is_set():
                raise RequestError("client disconnected", status=499) from None
            raise
        finally:
            watcher.cancel()

    def cancel(self) -> None:
        for task in self.tasks:
            if not task.done():
                task.cancel()
        stream, self._stream = self._stream, None
        if stream is not None:  # left at a yield (the client went away): closing it aborts it
            asyncio.ensure_future(_close(stream))


async def _close(stream) -> None:
    with contextlib.suppress(RuntimeError):  # still being read: its reader's error ends it
        await stream.aclose()


# ---- the command ----------------------------------------------------------------------------
def _drain_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, but the first SIGTERM/SIGINT drains: the gate answers 503, running requests
        finish (at most ``drain_timeout`` s, then they are aborted), then a normal shutdown.
        A second signal stops at once. Exits 0 (uvicorn re-raises a caught signal).
        ``ignore_sigint``: one of several front ends, whose supervisor forwards Ctrl-C as
        SIGTERM; ``on_started``: called once it accepts connections."""

        def __init__(
            self,
            config,
            state: ServerState,
            drain_timeout: float,
            ignore_sigint: bool = False,
            on_started=None,
        ) -> None:
            super().__init__(config)
            self.state, self.drain_timeout, self.signals = state, drain_timeout, 0
            self.ignore_sigint, self.on_started = ignore_sigint, on_started

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and self.on_started is not None:
                self.on_started()

        def handle_exit(self, sig, frame) -> None:
            if sig == signal.SIGINT and self.ignore_sigint:
                return
            self.signals += 1
            if self.signals == 1:
                self.state.draining = True
                print(
                    f"vllm-lite serve: {signal.Signals(sig).name}: draining "
                    f"({self.state.llm.num_unfinished_requests} running, "
                    f"at most {self.drain_timeout:g} s)",
                    file=sys.stderr,
                    flush=True,
                )
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # not serving yet
                    self.should_exit = True
                    return
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))
            elif self.signals == 2:
                self.should_exit = True
            else:
                self.force_exit = True

        async def _drain(self) -> None:
            deadline = time.monotonic() + self.drain_timeout
            llm = self.state.llm
            while llm.num_unfinished_requests and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if llm.num_unfinished_requests:
                print(
                    "vllm-lite serve: drain timeout, "
                    f"aborting {llm.num_unfinished_requests} request(s)",
                    file=sys.stderr,
                    flush=True,
                )
                llm.abort_all()
                for _ in range(100):
                    if not llm.num_unfinished_requests:
                        break
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)  # the last responses leave
            self.should_exit = True

    return DrainingServer


def make_server(
    app: FastAPI,
    drain_timeout: float = 30.0,
    log_level: str = "info",
    ignore_sigint: bool = False,
    on_started=None,
):
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        lifespan="on",
        access_log=log_level in ("debug", "trace"),
    )
    return _drain_server_class()(config, app.state.server, drain_timeout, ignore_sigint, on_started)


def sequential_tokenizers() -> None:
    """Unless the user set it, ``TOKENIZERS_PARALLELISM=false`` for the server's processes
    (read at every call of the Rust tokenizer; the core and front ends inherit it). A front end
    decodes its streams' new tokens a step at a time, a few hundred one- or two-token windows:
    tokenizers' thread pool (one thread per CPU, in every front end) spent more CPU than it
    saved. H200, 4 front ends, 256 SmolLM2 streams: 54-78 -> 27-31 us of front-end CPU per
    output token, the same throughput (BENCHMARKS.md, Serving). Offline ``LLM`` keeps the pool:
    there one thread decodes every request's text (stop strings -0.5% against text off with
    it, -4.9% without)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def auto_api_server_count() -> int:
    """``--api-server-count auto``: one front end per 4 CPUs this process may use, 1 to 4. With
    text on and 256 streams, one front end (~34 us of CPU per output token) serves 91% of the
    offline throughput and four 93%, but at 64 requests/s the TTFT p99 is 248 ms with one and
    25 ms with four (H200; BENCHMARKS.md, Serving). The engine core and each front end want a
    core of their own, so a 2-core machine keeps one."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, (cpus or 1) // 4))


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening socket. ``reuse_port`` (Linux' SO_REUSEPORT): more sockets may listen on the
    same address (``reuse_port_sockets``), and the kernel spreads new connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def bind_server(host: str, port: int, reuse_port: bool) -> socket.socket:
    """The server's listening socket; with ``reuse_port``, the front ends' sockets can join it.
    The address is first bound without SO_REUSEPORT, so that a second server on a port in use
    fails as it would without it, instead of quietly sharing the first one's connections."""
    sock = bind(host, port)
    if not reuse_port:
        return sock
    port = sock.getsockname()[1]
    sock.close()
    return bind(host, port, reuse_port=True)


def serve_main(argv: list[str]) -> int:
    from vllm_lite.config import add_config_flags

    parser = argparse.ArgumentParser(
        prog="vllm-lite serve", description="An OpenAI-compatible server (see README, 'Server')."
    )
    parser.add_argument(
        "model_arg",
        nargs="?",
        metavar="MODEL",
        help="HuggingFace model folder "
        "(default: config.yaml's model_path, else the embedded SmolLM2)",
    )
    parser.add_argument(
        "--config", default="config.yaml", help="YAML config (default: ./config.yaml if present)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="port (0: any free port, printed at start)"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("VLLM_LITE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health "
        "(default: $VLLM_LITE_API_KEY)",
    )
    parser.add_argument(
        "--served-model-name",
        action="append",
        help="name(s) clients use as 'model' (default: the model folder's name)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds running requests may take to finish (default 30)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.add_argument(
        "--tool-call-parser",
        choices=sorted(TOOL_PARSERS),
        help="how \"auto\" tool calls are read from the model's text (vLLM's "
        "names): hermes (Qwen2.5/Qwen3 <tool_call>...</tool_call>) or "
        "llama3_json",
    )
    parser.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='accepted as vLLM\'s; --tool-call-parser enables "auto"',
    )
    parser.add_argument(
        "--api-server-count",
        default="auto",
        help="front-end processes (HTTP, tokenizer, text) sharing one engine core; auto "
        "(default): one per 4 CPUs this process may use, 1 to 4",
    )
    add_config_flags(parser)
    args = vars(parser.parse_args(argv))
    model_arg = args.pop("model_arg")
    host, port, api_key = args.pop("host"), args.pop("port"), args.pop("api_key")
    names, drain_timeout, log_level = (
        args.pop("served_model_name"),
        args.pop("drain_timeout"),
        args.pop("log_level"),
    )
    tool_call_parser = args.pop("tool_call_parser")
    args.pop("enable_auto_tool_choice")
    api_server_count = args.pop("api_server_count")
    if api_server_count == "auto":
        api_server_count = auto_api_server_count()
    elif not api_server_count.isdigit() or int(api_server_count) < 1:
        parser.error(f"argument --api-server-count: must be auto or >= 1, got {api_server_count}")
    api_server_count = int(api_server_count)
    if not 0 <= port <= 65535:
        parser.error(f"argument --port: must be in 0..65535, got {port}")
    if drain_timeout < 0:
        parser.error(f"argument --drain-timeout: must be >= 0, got {drain_timeout}")
    if model_arg is not None:
        if "model_path" in args and args["model_path"] != model_arg:
            parser.error(f"MODEL {model_arg!r} and --model {args['model_path']!r} disagree")
        args["model_path"] = model_arg
    config = load_config(args.pop("config"), args)

    logging.basicConfig(
        level=getattr(logging, log_level.upper()), format="%(levelname)s %(name)s: %(message)s"
    )
    from vllm_lite.engine.llm_engine import resolve_model_path

    model_path = resolve_model_path(config)  # a missing folder fails here, before anything heavy
    sequential_tokenizers()
    try:  # several front ends: a socket each (api_servers.py)
        sock = bind_server(host, port, api_server_count > 1 and hasattr(socket, "SO_REUSEPORT"))
    except OSError as exc:
        raise SystemExit(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    model_names = names or [os.path.basename(os.path.normpath(model_path))]
    shown = f"[{host}]" if ":" in host else host
    banner = (
        f"vllm-lite serve: {model_names[0]} on http://{shown}:{sock.getsockname()[1]}"
        f"{' (API key required)' if api_key else ''}"
    )
    if api_server_count > 1:
        from vllm_lite.entrypoints.api_servers import run_api_servers

        return run_api_servers(
            config,
            api_server_count,
            sock,
            banner,
            drain_timeout,
            model_names=model_names,
            api_key=api_key,
            tool_call_parser=tool_call_parser,
            log_level=log_level,
        )
    metrics = ServerMetrics(model_names[0])
    async_llm = AsyncLLM(config, metrics)  # the engine, in a process of its own
    app = build_app(async_llm, model_names, api_key, metrics, tool_call_parser)
    server = make_server(app, drain_timeout, log_level)
    settle_heap()
    print(banner, flush=True)
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
