"""One in-process generation on a worker thread, its events handed to the event loop.

The thread opens ``ctl.generating(deployment)`` (the slot an emergency clear cancels), counts the
prompt's tokens, applies the context guard, then streams chunks. The loop side reads
:class:`Event` values; when the client goes away (the reader is cancelled) the thread is told to
stop through the generator's ``cancel`` callback.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from memory_controller.backend import Deployment, GenerationChunk, GenerationRequest

from .errors import ApiError, bad_request

DEFAULT_MAX_NEW_TOKENS_UNKNOWN_CONTEXT = 512


@dataclass(frozen=True)
class Event:
    kind: str  # "start" | "chunk" | "end" | "error"
    chunk: GenerationChunk | None = None
    prompt_tokens: int = 0
    max_new_tokens: int = 0
    family: str | None = None
    cancelled_by_controller: bool = False
    stopped: bool = False  # stop() was called (client gone, server closing) before the answer ended
    reason: str | None = None  # why the controller cancelled: "emergency_clear", "unload", "switch"
    error: BaseException | None = None


def context_guard(prompt_tokens: int, requested: int | None, context_tokens: int | None,
                  model_id: str) -> int:
    """The number of new tokens to allow; ApiError 400 naming both numbers when over the context."""
    if context_tokens is None:
        return requested or DEFAULT_MAX_NEW_TOKENS_UNKNOWN_CONTEXT
    if requested is not None and prompt_tokens + requested > context_tokens:
        raise bad_request(
            f"{model_id} is served with a context of {context_tokens} tokens, but this request needs "
            f"{prompt_tokens + requested}: {prompt_tokens} in the prompt plus {requested} requested for the "
            f"answer. Shorten the conversation or ask for fewer output tokens.",
            param="messages", code="context_length_exceeded")
    if requested is None and prompt_tokens >= context_tokens:
        raise bad_request(
            f"{model_id} is served with a context of {context_tokens} tokens, but the prompt alone takes "
            f"{prompt_tokens} tokens (0 left for the answer). Shorten the conversation.",
            param="messages", code="context_length_exceeded")
    return requested if requested is not None else context_tokens - prompt_tokens


class Run:
    """Start with :meth:`start`; read with :meth:`events`; :meth:`stop` asks the thread to finish."""

    def __init__(self, ctl: Any, deployment: Deployment, build: Callable[[int], GenerationRequest],
                 requested_tokens: int | None) -> None:
        self.ctl = ctl
        self.deployment = deployment
        self.build = build
        self.requested_tokens = requested_tokens
        self._client_gone = threading.Event()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.reader: AsyncIterator[Event] | None = None
        self._finalizers: list[Callable[[], None]] = []

    def on_finish(self, fn: Callable[[], None]) -> None:
        self._finalizers.append(fn)

    def finish(self) -> None:
        """Stop the thread and run the finalizers (FIFO turn, counters); idempotent."""
        self._client_gone.set()
        fns, self._finalizers = self._finalizers, []
        for fn in fns:
            fn()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._work, name=f"memctl-gen:{self.deployment.model_id}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._client_gone.set()

    def _post(self, event: Event) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is going away
            self._client_gone.set()

    def _work(self) -> None:
        dep = self.deployment
        try:
            with self.ctl.generating(dep) as slot:
                gen = slot.generator
                if gen is None:
                    raise ApiError(500, f"{dep.model_id} runs on {dep.backend_id}, which does not generate "
                                        "in-process and gave no endpoint", type_="server_error",
                                   code="no_generator")
                probe = self.build(1)
                prompt_tokens = int(gen.prompt_tokens(dep, probe))
                max_new = context_guard(prompt_tokens, self.requested_tokens, dep.context_tokens, dep.model_id)
                family = gen.model_family(dep)
                self._post(Event("start", prompt_tokens=prompt_tokens, max_new_tokens=max_new, family=family))

                def cancel() -> bool:
                    return self._client_gone.is_set() or bool(slot.cancelled())

                for chunk in gen.generate_stream(dep, self.build(max_new), cancel):
                    self._post(Event("chunk", chunk=chunk))
                    if self._client_gone.is_set():
                        break
                self._post(Event("end", cancelled_by_controller=bool(slot.cancelled()),
                                 stopped=self._client_gone.is_set(), reason=getattr(slot, "reason", None)))
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, mapped to an HTTP error there
            self._post(Event("error", error=exc))

    async def events(self) -> AsyncIterator[Event]:
        """Every event until "end" or "error" (inclusive)."""
        try:
            while True:
                event = await self._queue.get()
                yield event
                if event.kind in ("end", "error"):
                    return
        finally:
            self._client_gone.set()

    async def join(self, timeout_s: float = 5.0) -> None:
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout_s)
