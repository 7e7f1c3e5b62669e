"""Generation for serving: chat templates (with tools), token streaming, stop strings, cancellation.

``generate`` runs on a worker thread and hands each new token id to a queue; the caller's thread
decodes incrementally (a prefix/read offset pair, as vLLM does, so each token costs O(1) decoding),
looks for stop strings, and yields text. A StoppingCriteria polled after every token ends the
generation when the caller cancels, a stop string was found, or the consumer went away.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from memory_controller.backend import GenerationChunk, GenerationRequest
from memory_controller.errors import InsufficientMemoryError, MemctlError, ModelLoadError

from .loading import free_bytes_for, is_oom

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 32768
_END = object()


# --------------------------------------------------------------------------- requests and templates


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
    try:
        text = tokenizer.apply_chat_template(template_messages(request.messages or ()), **kwargs)
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


# --------------------------------------------------------------------------- streaming


class _QueueStreamer:
    """A ``generate(streamer=...)`` target: token ids go to a queue (the prompt's are skipped)."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(_END)


def _make_stop_criteria(should_stop: Callable[[], bool]) -> Any:
    import torch
    from transformers import StoppingCriteria

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), bool(should_stop()), dtype=torch.bool, device=input_ids.device)

    return _Stop()


class _Detokenizer:
    """Incremental decoding: text of new tokens only, never a half UTF-8 character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        # The Rust tokenizer decodes without transformers' per-call Python work (~5x cheaper per token);
        # used when transformers' decode would not post-process its text (clean_up_tokenization_spaces).
        rust = getattr(tokenizer, "backend_tokenizer", None)
        if rust is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._decode = lambda ids: rust.decode(ids, skip_special_tokens=True)
        else:
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, new: list[int]) -> str:
        self.ids.extend(new)
        dec = self.tok.decode
        before = dec(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = dec(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def full(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` may be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def stream(model: Any, tokenizer: Any, request: GenerationRequest, cancel: Callable[[], bool],
           *, model_id: str, input_device: Any, closing: Callable[[], bool],
           on_worker: Callable[[threading.Thread], None] | None = None) -> Iterator[GenerationChunk]:
    """Yield the text as it is generated; the last chunk has finish_reason and token counts.

    The caller serialises calls on one model. When the generator is closed early, the worker thread is
    told to stop and joined before it returns.
    """
    import torch

    check_request(request)
    stops = tuple(s for s in request.stop if s)
    ids = prompt_ids(tokenizer, request, model_id)
    n_prompt = len(ids)
    streamer = _QueueStreamer()
    halt = threading.Event()
    criteria = _make_stop_criteria(lambda: halt.is_set() or cancel() or closing())
    eos = _eos_ids(model, tokenizer)
    kwargs: dict[str, Any] = {"max_new_tokens": request.max_new_tokens, "streamer": streamer,
                              "stopping_criteria": [criteria], "do_sample": request.temperature > 0}
    if request.temperature > 0:
        kwargs.update(temperature=float(request.temperature), top_p=float(request.top_p))
    if eos:
        kwargs["eos_token_id"] = eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    if pad is not None:
        kwargs["pad_token_id"] = pad
    failure: list[BaseException] = []

    def work() -> None:
        try:
            if request.seed is not None:
                torch.manual_seed(int(request.seed))
            input_ids = torch.tensor([ids], dtype=torch.long, device=input_device)
            with torch.inference_mode():
                model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            failure.append(exc)
        finally:
            streamer.end()

    worker = threading.Thread(target=work, name=f"generate:{model_id}", daemon=True)
    if on_worker is not None:
        on_worker(worker)  # lets a stop join it even while the consumer sits between two chunks
    detok = _Detokenizer(tokenizer)
    emitted = ""  # text yielded so far
    pending = ""  # decoded, not yet yielded (may begin a stop string)
    finish: str | None = None
    n_done = 0
    worker.start()
    try:
        ended = False
        while not ended:
            item = streamer.queue.get()
            ended = item is _END
            new: list[int] = [] if ended else list(item)
            while not ended and not streamer.queue.empty():  # behind the worker: catch up in one decode
                item = streamer.queue.get()
                ended = item is _END
                if not ended:
                    new.extend(item)
            if finish is not None or not new:
                continue  # a stop string was found: drain until the worker ends
            n_done += len(new)
            pending += detok.add(new)
            if stops:
                hit = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                if hit >= 0:
                    pending = pending[:hit]
                    finish = "stop"
                    halt.set()
                    if pending:
                        yield GenerationChunk(pending)
                        emitted += pending
                    pending = ""
                    continue
                keep = _held_back(pending, stops)
                out, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
            else:
                out, pending = pending, ""
            if out:
                emitted += out
                yield GenerationChunk(out)
    finally:
        halt.set()
        worker.join()
    if failure:
        raise _map_failure(failure[0], model_id, input_device)
    if finish is None:
        if cancel() or closing():
            finish = "cancelled"
        else:
            rest = detok.full()
            tail = rest[len(emitted):] if rest.startswith(emitted) else pending
            if tail and stops:  # a stop string may sit in text the incremental decoder held back
                hit = min((i for i in (tail.find(s) for s in stops) if i >= 0), default=-1)
                if hit >= 0:
                    tail, finish = tail[:hit], "stop"
            if tail:
                yield GenerationChunk(tail)
            if finish is None:
                last_eos = bool(detok.ids) and detok.ids[-1] in eos
                finish = "length" if n_done >= request.max_new_tokens and not last_eos else "stop"
    yield GenerationChunk("", finish, n_prompt, n_done)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    out: list[int] = []
    gc = getattr(model, "generation_config", None)
    for v in (getattr(gc, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for i in v if isinstance(v, list) else [v]:
            if isinstance(i, int) and i not in out:
                out.append(i)
    return out


def _map_failure(exc: BaseException, model_id: str, input_device: Any) -> BaseException:
    if isinstance(exc, MemctlError) or not isinstance(exc, Exception):
        return exc
    if is_oom(exc):
        dev = str(input_device)
        return InsufficientMemoryError(f"out of memory while generating with {model_id}",
                                       "lower max_new_tokens or the context, or clear memory",
                                       free_bytes=free_bytes_for(dev if dev.startswith("cuda") else "cpu"))
    return ModelLoadError(f"generation with {model_id} failed: {type(exc).__name__}: {exc}",
                          "unload and load the model again", code="gen.failed", args={"model": model_id})
