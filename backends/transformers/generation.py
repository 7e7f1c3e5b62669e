"""Generation for serving: token streaming, stop strings, cancellation (templates: :mod:`.templates`).

``generate`` runs on a worker thread and hands each new token id to a buffer; the caller's thread
decodes incrementally (a prefix/read offset pair, as vLLM does, so each token costs O(1) decoding),
looks for stop strings, and yields text. A StoppingCriteria polled after every token ends the
generation when the caller cancels, a stop string was found, or the consumer went away.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from memory_controller.backend import GenerationChunk, GenerationRequest
from memory_controller.errors import InsufficientMemoryError, MemctlError, ModelLoadError

from .loading import free_bytes_for, is_oom
from .templates import (  # noqa: F401 - re-exported: generation is where callers look for them
    chat_template_of,
    check_request,
    model_family,
    prompt_ids,
    template_messages,
)

log = logging.getLogger(__name__)

WAKE_INTERVAL_S = 0.002


# --------------------------------------------------------------------------- streaming


class _TokenStreamer:
    """A ``generate(streamer=...)`` target: new token ids are buffered for the consumer (the prompt's are
    skipped). The consumer is woken at most every ``WAKE_INTERVAL_S``: with a model slower than that per
    token (any real one) every token wakes it at once; a tiny fast model hands over a few tokens per
    wake-up instead of paying a thread switch per token."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._ids: list[int] = []
        self._ended = False
        self._prompt_seen = False
        self._last_wake = 0.0

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        with self._lock:
            self._ids.extend(value.reshape(-1).tolist())
        now = time.perf_counter()
        if now - self._last_wake >= WAKE_INTERVAL_S:
            self._last_wake = now
            self._ready.set()

    def end(self) -> None:
        with self._lock:
            self._ended = True
        self._ready.set()

    def take(self) -> tuple[list[int], bool]:
        """(new ids, whether generation ended); blocks until there is something."""
        while True:
            self._ready.wait()  # a token that did not wake us comes with the next one (or the end)
            with self._lock:
                self._ready.clear()
                ids, self._ids = self._ids, []
                if ids or self._ended:
                    return ids, self._ended


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
    streamer = _TokenStreamer()
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
            new, ended = streamer.take()
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
