"""Tool calls on /v1/chat/completions, as vLLM serves them.

- ``tool_choice: "required"`` or a named function: the output is held by a JSON schema
  (structured outputs), so the arguments always parse: a named function's output is its
  arguments object; "required" writes ``[{"name": ..., "parameters": {...}}, ...]``.
- ``tool_choice: "auto"``: the model writes calls in its own format, which a parser picked with
  ``--tool-call-parser`` finds in the text: ``hermes`` (Qwen2.5/Qwen3, Hermes:
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``) or ``llama3_json`` (Llama 3:
  ``{"name": ..., "parameters": {...}}``, several joined by ``;``).

Every parser reads the text as it streams (``feed``, then ``finish``) and returns the content
to show and OpenAI's tool-call deltas; the full response runs the same parser over the whole
text. A call that does not parse stays in the content as text.
"""

from __future__ import annotations

import json
import uuid

from vllm_lite.entrypoints.protocol import ChatCompletionRequest, NamedToolChoice, RequestError
from vllm_lite.structured_output import StructuredOutputsParams

_EMPTY_OBJECT = {"type": "object", "properties": {}}


def _parameters(tool) -> dict:
    return tool.function.parameters or _EMPTY_OBJECT


def tool_choice_constraint(req: ChatCompletionRequest) -> StructuredOutputsParams | None:
    """The JSON schema a "required" or named tool_choice holds the output to (None otherwise);
    RequestError (400) for a tool_choice that names no given tool."""
    tools, choice = req.tools, req.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise RequestError("'tool_choice' needs 'tools'", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        by_name = {t.function.name: t for t in tools}
        if choice.function.name not in by_name:
            raise RequestError(
                f"tool_choice names '{choice.function.name}', which is not among the tools "
                f"{sorted(by_name)}",
                param="tool_choice",
            )
        return StructuredOutputsParams(json=_parameters(by_name[choice.function.name]))
    if choice != "required":
        return None
    call = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t.function.name]},
                "parameters": _parameters(t),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = {
        "type": "array",
        "minItems": 1,
        "items": call[0] if len(call) == 1 else {"anyOf": call},
    }
    if req.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


def template_messages(req: ChatCompletionRequest, text_of) -> list[dict]:
    """The messages as chat templates take them: an assistant's tool calls with their arguments
    as objects (transformers' convention), a tool's answer with its call id."""
    out = []
    for m in req.messages:
        message = {"role": m.role, "content": text_of(m)}
        if m.name:
            message["name"] = m.name
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": _loads_or_text(c.function.arguments),
                    },
                }
                for c in m.tool_calls
            ]
        out.append(message)
    return out


def _loads_or_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


class ToolCallStream:
    """Text in, (content, tool-call deltas) out; ``calls`` holds the complete calls."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def feed(self, text: str) -> tuple[str, list[dict]]:
        raise NotImplementedError

    def finish(self) -> tuple[str, list[dict]]:
        return "", []

    def _call(self, name: str, arguments) -> dict:
        """Record a complete call; its delta (OpenAI's streamed shape)."""
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        call = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        self.calls.append(call)
        return {"index": len(self.calls) - 1, **call}


def _call_fields(obj) -> tuple[str, object] | None:
    """(name, arguments) of a parsed call object, or None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    return (obj["name"], arguments) if isinstance(arguments, (dict, str)) else None


class HermesToolParser(ToolCallStream):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, anywhere in the text."""

    start, end = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self.pending, self.in_call = "", False

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.pending += text
        content, deltas = [], []
        while True:
            if not self.in_call:
                at = self.pending.find(self.start)
                if at < 0:  # keep a tail that may be the start of a tag
                    keep = next(
                        (
                            k
                            for k in range(len(self.start) - 1, 0, -1)
                            if self.pending.endswith(self.start[:k])
                        ),
                        0,
                    )
                    cut = len(self.pending) - keep
                    content.append(self.pending[:cut])
                    self.pending = self.pending[cut:]
                    break
                content.append(self.pending[:at])
                self.pending, self.in_call = self.pending[at:], True
            at = self.pending.find(self.end)
            if at < 0:
                break
            block, self.pending, self.in_call = (
                self.pending[: at + len(self.end)],
                self.pending[at + len(self.end) :],
                False,
            )
            self._block(block, block[len(self.start) : -len(self.end)], content, deltas)
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[dict]]:
        content, deltas, rest = [], [], self.pending
        self.pending = ""
        if self.in_call:  # the model stopped before closing its last call
            self._block(rest, rest[len(self.start) :], content, deltas)
        else:
            content.append(rest)
        return "".join(content), deltas

    def _block(self, raw: str, body: str, content: list, deltas: list) -> None:
        try:
            fields = _call_fields(json.loads(body))
        except ValueError:
            fields = None
        if fields is None:
            content.append(raw)  # malformed: left as text
        else:
            deltas.append(self._call(*fields))


class Llama3JsonToolParser(ToolCallStream):
    """Llama 3's JSON calls: the whole output is ``{"name": ..., "parameters": {...}}`` (after
    an optional ``<|python_tag|>``), several joined by ``;``. Anything else is text."""

    tag = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self.text, self.is_text = "", None  # None: undecided

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.text += text
        if self.is_text is None:  # decided by the first characters that are not whitespace
            head = self.text.lstrip()
            if not head:
                return "", []
            self.is_text = not (head.startswith(("{", self.tag)) or self.tag.startswith(head))
        if self.is_text:
            out, self.text = self.text, ""
            return out, []
        return "", []  # a call, maybe: read whole at the end

    def finish(self) -> tuple[str, list[dict]]:
        text, self.text = self.text, ""
        if self.is_text:
            return text, []
        body, calls, decoder = text.strip().removeprefix(self.tag).strip(), [], json.JSONDecoder()
        at = 0
        try:
            while at < len(body):
                obj, at = decoder.raw_decode(body, at)
                fields = _call_fields(obj)
                if fields is None:
                    return text, []
                calls.append(fields)
                while at < len(body) and body[at] in " \n\t\r;":
                    at += 1
        except ValueError:
            return text, []
        return "", [self._call(*c) for c in calls]


class NamedFunctionStream(ToolCallStream):
    """tool_choice naming a function: the output is its arguments object, streamed as they come."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.text = name, ""

    def feed(self, text: str) -> tuple[str, list[dict]]:
        if not self.calls:
            delta = self._call(self.name, "")
            delta["function"]["arguments"] = text
            self.text = text
            return "", [delta]
        self.text += text
        return "", [{"index": 0, "function": {"arguments": text}}] if text else []

    def finish(self) -> tuple[str, list[dict]]:
        if self.calls:
            self.calls[0]["function"]["arguments"] = self.text
        return "", []


class RequiredStream(ToolCallStream):
    """tool_choice "required": ``[{"name": ..., "parameters": {...}}, ...]``, sent when complete."""

    def __init__(self) -> None:
        super().__init__()
        self.text = ""

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.text += text
        return "", []

    def finish(self) -> tuple[str, list[dict]]:
        try:
            items = json.loads(self.text)
        except ValueError:
            return self.text, []
        fields = [_call_fields(x) for x in items] if isinstance(items, list) else [None]
        if any(f is None for f in fields):
            return self.text, []
        return "", [self._call(*f) for f in fields]


TOOL_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def tool_stream(req: ChatCompletionRequest, parser_name: str | None) -> ToolCallStream | None:
    """The request's tool-call reader, or None (no tools, or tool_choice "none"). "auto" needs
    a server started with ``--tool-call-parser``: RequestError (400) otherwise."""
    choice = req.tool_choice
    if not req.tools or choice == "none":
        return None
    if isinstance(choice, NamedToolChoice):
        return NamedFunctionStream(choice.function.name)
    if choice == "required":
        return RequiredStream()
    if parser_name is None:
        raise RequestError(
            '"auto" tool choice needs a server started with --tool-call-parser '
            f'({" or ".join(TOOL_PARSERS)}); or use tool_choice "required", a named '
            'function, or "none"',
            param="tool_choice",
        )
    return TOOL_PARSERS[parser_name]()


def parse_tool_calls(stream: ToolCallStream, text: str) -> tuple[str | None, list[dict]]:
    """A whole output: (content, or None if it is only calls; the calls)."""
    a, _ = stream.feed(text)
    b, _ = stream.finish()
    content = (a + b).strip()
    if isinstance(stream, NamedFunctionStream):
        try:
            json.loads(text)
        except ValueError:  # cut short (length): no call, the text as it is
            stream.calls, content = [], text
    return content or None, stream.calls
