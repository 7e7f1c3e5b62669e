"""Requests and chat templates: validation, OpenAI messages as templates expect them (tool-call
arguments as objects, 9-character ids for Mistral), the prompt's token ids, and the tool-call family."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from memory_controller.backend import GenerationRequest
from memory_controller.errors import MemctlError

MAX_NEW_TOKENS = 32768


def check_request(request: GenerationRequest) -> None:
    """Refuse a malformed request with a clear MemctlError before any work."""
    if (request.messages is None) == (request.prompt is None):
        raise MemctlError("a request needs either messages (chat) or a prompt (completion)",
                          "send one of the two", code="gen.bad_request")
    if request.prompt is not None and (not isinstance(request.prompt, str) or not request.prompt):
        raise MemctlError("the prompt is empty", "type a prompt", code="gen.empty_prompt")
    if request.messages is not None and not request.messages:
        raise MemctlError("the chat has no messages", "send at least one message", code="gen.empty_prompt")
    n = request.max_new_tokens
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_NEW_TOKENS:
        raise MemctlError(f"max_new_tokens {n!r} is out of range", f"use 1 to {MAX_NEW_TOKENS}",
                          code="gen.bad_max_tokens", args={"value": n})
    if not 0.0 <= float(request.temperature) <= 5.0:
        raise MemctlError(f"temperature {request.temperature!r} is out of range", "use 0 (greedy) to 5",
                          code="gen.bad_temperature", args={"value": request.temperature})
    if not 0.0 < float(request.top_p) <= 1.0:
        raise MemctlError(f"top_p {request.top_p!r} is out of range", "use a value in (0, 1]",
                          code="gen.bad_top_p", args={"value": request.top_p})


def _text_of(content: Any) -> Any:
    """OpenAI content parts ``[{"type": "text", "text": ...}]`` -> one string; other values as they are."""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return content


def template_messages(messages: tuple[Mapping[str, Any], ...]) -> list[dict[str, Any]]:
    """OpenAI chat messages as chat templates expect them.

    ``tool_calls[].function.arguments`` arrive as a JSON string; templates (Qwen, Llama 3, Mistral)
    render them with ``tojson`` and expect an object, so a string that parses as a JSON object becomes
    that object (one that does not parse stays a string). ``role: "tool"`` messages are kept; content
    parts become one string; an empty ``tool_calls`` is dropped.
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        d = dict(m)
        if "content" in d:
            d["content"] = _text_of(d["content"])
        calls = d.get("tool_calls")
        if "tool_calls" in d and not calls:
            del d["tool_calls"]  # "tool_calls": null / [] means none (Llama 3 templates test the key)
            if d.get("content") is None:
                d["content"] = ""
        if isinstance(calls, list) and calls:
            fixed = []
            for call in calls:
                call = dict(call) if isinstance(call, Mapping) else call
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, Mapping) and isinstance(fn.get("arguments"), str):
                    fn = dict(fn)
                    try:
                        parsed = json.loads(fn["arguments"])
                    except ValueError:
                        parsed = None
                    if isinstance(parsed, dict):
                        fn["arguments"] = parsed
                    call["function"] = fn
                fixed.append(call)
            d["tool_calls"] = fixed
        out.append(d)
    return out


def _nine(call_id: Any) -> Any:
    if not isinstance(call_id, str) or (len(call_id) == 9 and call_id.isalnum()):
        return call_id
    return hashlib.sha1(call_id.encode()).hexdigest()[:9]


def nine_character_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool-call ids as Mistral's templates require them (9 alphanumerics; OpenAI clients send longer
    ones such as ``call_…``): each id becomes a stable 9-character digest, the same in the assistant's
    call and in the tool's answer, so the pairing survives."""
    out = []
    for m in messages:
        d = dict(m)
        if isinstance(d.get("tool_calls"), list):
            d["tool_calls"] = [{**c, "id": _nine(c.get("id"))} if isinstance(c, dict) else c for c in d["tool_calls"]]
        if "tool_call_id" in d:
            d["tool_call_id"] = _nine(d["tool_call_id"])
        out.append(d)
    return out


def chat_template_of(tokenizer: Any) -> str | None:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("tool_use") or tpl.get("default") or next(iter(tpl.values()), None)
    return tpl if isinstance(tpl, str) and tpl.strip() else None


def prompt_ids(tokenizer: Any, request: GenerationRequest, model_id: str) -> list[int]:
    """Token ids of the request's prompt: the chat template (with tools) or the plain prompt."""
    check_request(request)
    if request.prompt is not None:
        return list(tokenizer(request.prompt, add_special_tokens=True)["input_ids"])
    if chat_template_of(tokenizer) is None:
        raise MemctlError(f"{model_id} has no chat template, so it cannot take chat messages",
                          "use the completions endpoint, or pick an instruct/chat model",
                          code="model.no_chat_template", args={"model": model_id})
    kwargs: dict[str, Any] = {"add_generation_prompt": True, "tokenize": False}
    if request.tools:
        kwargs["tools"] = [dict(t) for t in request.tools]
    messages = template_messages(request.messages or ())
    if "length != 9" in (chat_template_of(tokenizer) or ""):  # Mistral's templates want 9-character call ids
        messages = nine_character_ids(messages)
    try:
        text = tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as exc:  # noqa: BLE001 - jinja raises its own errors (raise_exception in templates)
        raise MemctlError(f"the chat template of {model_id} refused the messages: {type(exc).__name__}: {exc}",
                          "check the roles and their order (most templates want user/assistant turns)",
                          code="gen.template_error", args={"model": model_id, "problem": str(exc)}) from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def model_family(config: Any, template: str | None) -> str | None:
    """The tool-call format a model writes: "qwen", "llama3", "mistral", or None when unknown."""
    tpl = template or ""
    if "<tool_call>" in tpl:
        return "qwen"
    if "[TOOL_CALLS]" in tpl or "[AVAILABLE_TOOLS]" in tpl:
        return "mistral"
    if "<|start_header_id|>" in tpl or "<|eot_id|>" in tpl:
        return "llama3"
    model_type = str(getattr(config, "model_type", "") or "")
    if model_type.startswith("qwen"):
        return "qwen"
    if model_type in ("mistral", "mixtral", "ministral"):
        return "mistral"
    return None
