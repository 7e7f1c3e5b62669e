"""Requests and chat templates: validation, OpenAI messages as templates expect them (tool-call
arguments as objects, 9-character ids for Mistral), the prompt's token ids, and the tool-call family."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from memory_controller.backend import GenerationRequest
from memory_controller.errors import MemctlError

MAX_NEW_TOKENS = 32768
TEMPLATE_TIMEOUT_S = 10.0  # rendering one prompt; a real template takes milliseconds
TEMPLATE_MAX_OUTPUT_CHARS = 64 * 1024 * 1024  # the rendered prompt (and the text the template reads)
TEMPLATE_MAX_RANGE_STEPS = 2_000_000  # items produced by range() in one rendering

log = logging.getLogger(__name__)
_budget = threading.local()


class TemplateBudgetExceeded(Exception):
    """A chat template ran past its time or size budget (raised from inside the rendering)."""


def _tick(value: Any = None) -> None:
    deadline = getattr(_budget, "deadline", None)
    if deadline is None:
        return
    if isinstance(value, str):
        _budget.chars += len(value)
        if _budget.chars > TEMPLATE_MAX_OUTPUT_CHARS:
            raise TemplateBudgetExceeded(f"it read more than {TEMPLATE_MAX_OUTPUT_CHARS} characters")
    _budget.steps += 1
    if _budget.steps % 256 == 0 and time.monotonic() > deadline:
        raise TemplateBudgetExceeded(f"it ran longer than {TEMPLATE_TIMEOUT_S:g} s")


class _BoundedRange:
    """jinja's safe_range whose every step counts against the rendering's budget."""

    def __init__(self, *args: int) -> None:
        from jinja2.sandbox import safe_range

        self._range = safe_range(*args)

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, i: Any) -> Any:
        return self._range[i]

    def __contains__(self, x: Any) -> bool:
        return x in self._range

    def __reversed__(self) -> Iterator[int]:
        return self._steps(reversed(self._range))

    def __iter__(self) -> Iterator[int]:
        return self._steps(iter(self._range))

    @staticmethod
    def _steps(it: Iterator[int]) -> Iterator[int]:
        for i in it:
            steps = getattr(_budget, "range_steps", None)
            if steps is not None:
                _budget.range_steps = steps + 1
                if steps + 1 > TEMPLATE_MAX_RANGE_STEPS:
                    raise TemplateBudgetExceeded(f"its loops ran more than {TEMPLATE_MAX_RANGE_STEPS} steps")
            _tick()
            yield i


def _bound_environment(template_text: str) -> bool:
    """Hook the sandboxed environment Transformers compiled ``template_text`` into (its compile is cached, so the
    same one renders next): every call, attribute and item lookup and every range() step counts against the
    budget of the rendering thread. False when this Transformers has no such function (then it is not bounded)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        env = _compile_jinja_template(template_text).environment
    except Exception:  # noqa: BLE001 - another Transformers layout, or a template that does not compile
        return False
    if getattr(env, "_memctl_bounded", False):
        return True
    call, getattr_, getitem = env.call, env.getattr, env.getitem

    def bounded_call(__context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _tick()
        return call(__context, __obj, *args, **kwargs)

    def bounded_getattr(obj: Any, attribute: str) -> Any:
        value = getattr_(obj, attribute)
        _tick(value)
        return value

    def bounded_getitem(obj: Any, argument: Any) -> Any:
        value = getitem(obj, argument)
        _tick(value)
        return value

    env.call, env.getattr, env.getitem = bounded_call, bounded_getattr, bounded_getitem
    env.globals["range"] = _BoundedRange
    env._memctl_bounded = True
    return True


@contextlib.contextmanager
def template_budget(timeout_s: float = TEMPLATE_TIMEOUT_S) -> Iterator[None]:
    """Bound chat-template rendering on this thread (see :func:`_bound_environment`)."""
    _budget.deadline = time.monotonic() + timeout_s
    _budget.steps = 0
    _budget.chars = 0
    _budget.range_steps = 0
    try:
        yield
    finally:
        _budget.deadline = None
        _budget.range_steps = None


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
    _bound_environment(chat_template_of(tokenizer) or "")
    try:
        with template_budget():
            text = tokenizer.apply_chat_template(messages, **kwargs)
    except TemplateBudgetExceeded as exc:
        raise MemctlError(f"the chat template of {model_id} was stopped: {exc} (it loops or blows up its output)",
                          "the model's chat template is broken: pick another model, or fix chat_template in its "
                          "tokenizer_config.json / chat_template.jinja", code="gen.template_runaway",
                          args={"model": model_id, "problem": str(exc)}) from None
    except RecursionError:
        raise MemctlError(f"the chat template of {model_id} recursed too deep", "the model's chat template is broken: "
                          "pick another model", code="gen.template_runaway", args={"model": model_id}) from None
    except Exception as exc:  # noqa: BLE001 - jinja raises its own errors (raise_exception in templates)
        problem = str(exc)[:500]
        raise MemctlError(f"the chat template of {model_id} refused the messages: {type(exc).__name__}: {problem}",
                          "check the roles and their order (most templates want user/assistant turns); if every "
                          "request fails so, the model's chat template is broken: pick another model",
                          code="gen.template_error", args={"model": model_id, "problem": problem}) from None
    if not isinstance(text, str) or len(text) > TEMPLATE_MAX_OUTPUT_CHARS:
        raise MemctlError(f"the chat template of {model_id} made a prompt over {TEMPLATE_MAX_OUTPUT_CHARS} characters",
                          "shorten the conversation; if it is short, the model's chat template is broken",
                          code="gen.template_runaway", args={"model": model_id})
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
