"""The requests the API accepts, validated into the values the backends take.

Clients send many fields we do not use (``user``, ``metadata``, ``logit_bias`` ...): extra fields are
accepted and ignored; a field we use with a bad value is a 400 naming the field. Types are strict
(``max_tokens: "10"`` and ``stream: "yes"`` are refused, not guessed at); options memctl does not
implement and that change the answer's shape (``logprobs``, ``response_format`` other than text,
completions' ``echo``/``suffix``/``best_of``) are refused, never silently ignored. Nesting is bounded and
lone surrogates are refused where the body is parsed, so no client input reaches a template or a
tokenizer as something that raises there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from memory_controller.backend import GenerationRequest

from .errors import ApiError, bad_request

MAX_BODY_BYTES = 32 * 1024 * 1024
_ROLES = {"system", "developer", "user", "assistant", "tool"}


MAX_DEPTH = 64  # nesting of the body (tool schemas and arguments included)
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
_TOOL_CHOICES = ("none", "auto", "required")


def _not_implemented(field: str, what: str) -> ValueError:
    return ValueError(f"{what} is not implemented by memctl; remove {field} from the request")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, max_length=512)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int = Field(1, ge=1, le=1)
    logprobs: Any = None
    top_logprobs: Any = None
    response_format: Any = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any, info: Any) -> Any:
        if v not in (None, False, 0):
            raise _not_implemented(info.field_name, "returning log-probabilities")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if v is None:
            return v
        kind = v.get("type") if isinstance(v, dict) else None
        if kind == "text":
            return v
        if kind in ("json_object", "json_schema"):
            raise _not_implemented("response_format", f"response_format {kind!r} (constrained JSON output)")
        raise ValueError('must be {"type": "text"} (other formats are not implemented by memctl)')

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

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, t in enumerate(v or ()):
            fn = t.get("function")
            if t.get("type", "function") != "function" or not isinstance(fn, dict):
                raise ValueError(f"tools[{i}]: only function tools ({{\"type\": \"function\", \"function\": "
                                 "{...}}) are supported")
            name = fn.get("name")
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"tools[{i}].function.name: a tool needs a name")
            params = fn.get("parameters")
            if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
                raise ValueError(f"tools[{i}].function.parameters: must be a JSON Schema object "
                                 '({"type": "object", "properties": {...}})')
        return v

    @field_validator("tool_choice")
    @classmethod
    def _choice_shape(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(v, str) and v not in _TOOL_CHOICES:
            raise ValueError(f"{v[:40]!r} is not one of {list(_TOOL_CHOICES)} (or "
                             '{"type": "function", "function": {"name": ...}})')
        if isinstance(v, dict):
            fn = v.get("function")
            if v.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError('must name a function: {"type": "function", "function": {"name": "..."}}')
        return v

    @model_validator(mode="after")
    def _choice_matches_tools(self) -> ChatRequest:
        names = {t["function"]["name"] for t in self.tools or ()}
        choice = self.tool_choice
        if choice == "required" and not names:
            raise ValueError('tool_choice: "required" needs tools; send tools or drop tool_choice')
        if isinstance(choice, dict):
            name = choice["function"]["name"]
            if name not in names:
                known = ", ".join(sorted(names)[:20]) or "none were sent"
                raise ValueError(f"tool_choice: function {name[:80]!r} is not among the tools ({known})")
        for i, m in enumerate(self.messages):
            if m.get("role") == "tool" and not isinstance(m.get("tool_call_id"), str):
                raise ValueError(f"messages[{i}].tool_call_id: a tool message must say which call it answers "
                                 "(the id of the assistant's tool call)")
        return self

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
    best_of: int | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise _not_implemented("suffix", "fill-in-the-middle (suffix)")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise _not_implemented("echo", "echoing the prompt (echo: true)")
        return v

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise _not_implemented("best_of", "best_of above 1")
        return v

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise bad_request("prompt: send one prompt per request (a list of several is not supported)",
                                  param="prompt")
            return self.prompt[0]
        return self.prompt


def _check_tree(value: Any, where: str, depth: int = 0) -> None:
    """Nesting within MAX_DEPTH and no lone surrogate (``"\\ud800"``) in any string or key; 400 naming
    where. Iterative over siblings, recursive only as deep as MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise bad_request(f"{where}: nested deeper than {MAX_DEPTH} levels; send flatter JSON", param=where)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request(f"{where}: the text holds a lone UTF-16 surrogate (an escape such as \\ud800 "
                              "without its pair), which is no character; send valid Unicode", param=where) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_tree(k, f"{where}.<key>", depth + 1)
            _check_tree(v, f"{where}.{k}" if where else str(k), depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_tree(v, f"{where}[{i}]", depth + 1)


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """Validate a JSON body; ApiError 400 naming the first bad field."""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES // (1024 * 1024)} MiB", code="body_too_large")
    try:
        data = json.loads(raw or b"null")
    except RecursionError:
        raise bad_request(f"the request body is nested deeper than {MAX_DEPTH} levels; send flatter JSON",
                          param="body") from None
    except ValueError as exc:
        raise bad_request(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    _check_tree(data, "")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        text = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        if where == "body" or text.startswith((where, "tool_choice:", "messages[")):
            raise bad_request(text, param=text.split(":", 1)[0] if ":" in text else None) from None
        raise bad_request(f"{where}: {text}", param=where) from None


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
