"""Request bodies of the OpenAI-compatible server (pydantic), and their translation into the
engine's ``SamplingParams``.

Models are strict (a string where a number belongs is a 400, not coerced) and forbid unknown
fields: a field this server does not implement is a 400 naming it, never silently ignored.
Sampling fields use OpenAI's names where OpenAI has one and vLLM's extra names otherwise.
Whether the engine supports a sampling field is decided per request from
``dataclasses.fields(SamplingParams)``: a field the engine lacks is a 400 naming it unless its
value is the neutral one (``presence_penalty: 0`` asks for nothing).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vllm_lite.sampling_params import SamplingParams
from vllm_lite.structured_output import StructuredOutputsParams

MAX_LOGPROBS = 20  # vLLM's default max_logprobs: top-k logprobs cost a sort over the vocabulary


class RequestError(ValueError):
    """A bad request: HTTP ``status``, OpenAI error ``param`` and ``code``."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = (
            message,
            param,
            status,
            code,
            type,
        )


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM: usage on every chunk


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    name: str
    description: str | None = None
    json_schema: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``: plain text, any JSON object, or JSON of a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(_Strict):
    """vLLM's extra ``structured_outputs`` (one of json, regex, choice, grammar, json_object)."""

    json_: dict | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class _SamplingRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    # OpenAI
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None  # accepted; identifies the end user, changes nothing here
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs (and older guided_*)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]  # ids before list[str]: ~70 us less
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer to that call
    refusal: str | None = None


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class ChatTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = True  # vLLM's extra
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    # accepted OpenAI fields that change nothing in generation
    metadata: dict[str, str] | None = None
    store: bool | None = None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# (request field, SamplingParams field, neutral value: asking for it needs no support)
_NO_NEUTRAL = object()
SAMPLING_FIELDS = [
    ("n", "n", 1),
    ("temperature", "temperature", _NO_NEUTRAL),
    ("top_p", "top_p", 1.0),
    ("top_k", "top_k", -1),
    ("min_p", "min_p", 0.0),
    ("seed", "seed", _NO_NEUTRAL),
    ("stop", "stop", _NO_NEUTRAL),
    ("stop_token_ids", "stop_token_ids", []),
    ("ignore_eos", "ignore_eos", False),
    ("min_tokens", "min_tokens", 0),
    ("presence_penalty", "presence_penalty", 0.0),
    ("frequency_penalty", "frequency_penalty", 0.0),
    ("repetition_penalty", "repetition_penalty", 1.0),
    ("logit_bias", "logit_bias", {}),
    ("skip_special_tokens", "skip_special_tokens", True),
    ("include_stop_str_in_output", "include_stop_str_in_output", False),
    ("allowed_token_ids", "allowed_token_ids", _NO_NEUTRAL),
    ("prompt_logprobs", "prompt_logprobs", _NO_NEUTRAL),
]


def supported_sampling_fields() -> set[str]:
    """The engine's SamplingParams fields, read at request time (they grow as features land)."""
    return {f.name for f in dataclasses.fields(SamplingParams) if f.init}


def _neutral(value, neutral) -> bool:
    if neutral is _NO_NEUTRAL:
        return False
    if neutral == -1 and value == 0:  # top_k 0 also means all tokens
        return True
    return value == neutral


def to_sampling_params(req: _SamplingRequest) -> SamplingParams:
    """SamplingParams of a completion or chat request; RequestError (400) naming the field for
    anything unsupported or invalid."""
    supported = supported_sampling_fields()
    kwargs: dict = {}
    names: dict[str, str] = {}  # SamplingParams field -> request field (for error messages)

    def put(api_name: str, sp_name: str, value, neutral=_NO_NEUTRAL) -> None:
        if value is None:
            return
        if sp_name not in supported:
            if _neutral(value, neutral):
                return
            raise RequestError(
                f"'{api_name}' is not supported by this engine yet (SamplingParams has no "
                f"'{sp_name}')",
                param=api_name,
            )
        kwargs[sp_name], names[sp_name] = value, api_name

    for api_name, sp_name, neutral in SAMPLING_FIELDS:
        put(api_name, sp_name, getattr(req, api_name), neutral)

    if isinstance(req, ChatCompletionRequest):
        max_tokens_name = (
            "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        )
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if req.top_logprobs is not None and req.top_logprobs < 0:
            raise RequestError(
                f"'top_logprobs' must be >= 0, got {req.top_logprobs}", param="top_logprobs"
            )
        if req.logprobs:
            put(
                "top_logprobs" if req.top_logprobs is not None else "logprobs",
                "logprobs",
                req.top_logprobs or 0,
            )
    else:
        max_tokens_name = "max_tokens"
        max_tokens = (
            16 if req.max_tokens is None else req.max_tokens
        )  # OpenAI's default for completions
        if req.suffix is not None:
            raise RequestError("'suffix' is not supported", param="suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise RequestError("'best_of' is not supported (only best_of == n)", param="best_of")
        put("logprobs", "logprobs", req.logprobs)
        if req.echo and req.logprobs is not None and req.prompt_logprobs is None:
            put(
                "logprobs", "prompt_logprobs", req.logprobs
            )  # echo's prompt tokens get logprobs too
    tool_constraint = None
    if isinstance(req, ChatCompletionRequest):
        from vllm_lite.entrypoints.tool_calls import tool_choice_constraint

        tool_constraint = tool_choice_constraint(req)
    structured = structured_outputs_of(req, tool_constraint)
    if structured is not None:
        put(structured[0], "structured_outputs", structured[1])
    if max_tokens is None:
        kwargs["max_tokens"] = None  # chat's default: up to max_model_len
    else:
        put(max_tokens_name, "max_tokens", max_tokens)
    if req.stream_options is not None and not req.stream:
        raise RequestError(
            "'stream_options' is only allowed with 'stream': true", param="stream_options"
        )

    for sp_name in ("logprobs", "prompt_logprobs"):
        k = kwargs.get(sp_name)
        if isinstance(k, int) and k > MAX_LOGPROBS:
            raise RequestError(
                f"'{names[sp_name]}' must be <= {MAX_LOGPROBS}, got {k}", param=names[sp_name]
            )
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        param = None
        for sp_name, api_name in names.items():
            if message.startswith(f"SamplingParams.{sp_name} "):
                param = api_name
                message = api_name + message[len(f"SamplingParams.{sp_name}") :]
                break
        raise RequestError(message, param=param) from None


def structured_outputs_of(req: _SamplingRequest, extra: StructuredOutputsParams | None = None):
    """(request field, StructuredOutputsParams) of the request's constraint, or None. One source
    at most: ``response_format`` (json_object, json_schema), ``structured_outputs`` or the
    older ``guided_*`` fields; ``structured_outputs`` holding only ``disable_any_whitespace``
    sets that option of the others. RequestError (400) naming the field."""
    sources = []
    options = {}
    so = req.structured_outputs
    if so is not None:
        given = so.model_dump(exclude_none=True, exclude={"disable_any_whitespace"})
        options = {"disable_any_whitespace": bool(so.disable_any_whitespace)}
        if given:
            spec = {
                "json": so.json_,
                "regex": so.regex,
                "choice": so.choice,
                "grammar": so.grammar,
                "json_object": so.json_object,
            }
            sources.append(("structured_outputs", spec))
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            sources.append(("response_format", {"json_object": True}))
        else:
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise RequestError(
                    "response_format of type 'json_schema' needs 'json_schema.schema'",
                    param="response_format",
                )
            sources.append(("response_format", {"json": rf.json_schema.json_schema}))
    for name, key in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        if getattr(req, name) is not None:
            sources.append((name, {key: getattr(req, name)}))
    if extra is not None:  # tool_choice "required" / a named function
        sources.append(("tool_choice", {"json": extra.json}))
    if not sources:
        return None
    if len(sources) > 1:
        names = [name for name, _ in sources]
        raise RequestError(f"give one structured output constraint, got {names}", param=names[1])
    name, spec = sources[0]
    try:
        return name, StructuredOutputsParams(**spec, **options)
    except ValueError as exc:
        message = str(exc)
        if name != "structured_outputs":  # name the field the client sent
            message = re.sub(r"^structured_outputs(\.\w+)?", name, message)
        raise RequestError(message, param=name) from None


def message_text(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)
