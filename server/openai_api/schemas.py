"""The requests the API accepts, validated into the values the backends take.

Clients send many fields we do not use (``user``, ``metadata``, ``logit_bias`` ...): extra fields are
accepted and ignored; a field we use with a bad value is a 400 naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from memory_controller.backend import GenerationRequest

from .errors import ApiError, bad_request

MAX_BODY_BYTES = 32 * 1024 * 1024
_ROLES = {"system", "developer", "user", "assistant", "tool"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=512)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        items = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in items if s)


class ChatRequest(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @property
    def requested_tokens(self) -> int | None:
        """``max_completion_tokens`` (what Roo Code sends) wins over the older ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def tools_active(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


class CompletionRequest(_Common):
    prompt: str | list[str]
    suffix: str | None = None
    echo: bool = False

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise bad_request("prompt: send one prompt per request (a list of several is not supported)",
                                  param="prompt")
            return self.prompt[0]
        return self.prompt


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """Validate a JSON body; ApiError 400 naming the first bad field."""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES // (1024 * 1024)} MiB", code="body_too_large")
    try:
        data = json.loads(raw or b"null")
    except ValueError as exc:
        raise bad_request(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise bad_request(f"{where}: {first.get('msg', 'invalid value')}", param=where) from None


def _text_of(content: Any, where: str) -> str:
    """A message's content as text: a string, or the text parts of a list (images are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out: list[str] = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise bad_request(f"{where}[{i}]: a content part must be an object", param=where)
            kind = part.get("type")
            if kind in ("text", "input_text") and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                raise bad_request(f"{where}[{i}]: content of type {kind!r} is not supported (text only)",
                                  param=where)
        return "".join(out)
    raise bad_request(f"{where}: content must be a string or a list of text parts", param=where)


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """Assistant tool calls for a chat template: arguments as an object (templates serialise it)."""
    if not isinstance(calls, list):
        raise bad_request(f"{where}: tool_calls must be a list", param=where)
    out: list[dict[str, Any]] = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise bad_request(f"{where}[{i}]: a tool call needs function.name", param=where)
        args: Any = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                pass  # keep the string as the model wrote it
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def chat_messages(req: ChatRequest) -> tuple[dict[str, Any], ...]:
    """The history in the shape chat templates take (assistant tool calls and tool results kept)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role not in _ROLES:
            raise bad_request(f"{where}.role: {role!r} is not one of {sorted(_ROLES)}", param=where)
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": _text_of(m.get("content"), f"{where}.content")}
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "tool":
            if m.get("tool_call_id") is not None:
                msg["tool_call_id"] = str(m["tool_call_id"])
            if m.get("name") is not None:
                msg["name"] = str(m["name"])
        out.append(msg)
    return tuple(out)


def tools_for_template(req: ChatRequest) -> tuple[dict[str, Any], ...] | None:
    if not req.tools_active:
        return None
    for i, t in enumerate(req.tools or ()):
        fn = t.get("function")
        if t.get("type", "function") != "function" or not isinstance(fn, Mapping) or not fn.get("name"):
            raise bad_request(f"tools[{i}]: only function tools with a name are supported", param="tools")
    return tuple(req.tools or ())


def generation_request(req: ChatRequest | CompletionRequest, max_new_tokens: int) -> GenerationRequest:
    common: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "stop": req.stops(),
        "seed": req.seed,
    }
    if isinstance(req, ChatRequest):
        return GenerationRequest(messages=chat_messages(req), tools=tools_for_template(req), **common)
    return GenerationRequest(prompt=req.prompt_text(), **common)


Kind = Literal["chat", "completion"]
