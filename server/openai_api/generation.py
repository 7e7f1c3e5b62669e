"""One in-process generation on a worker thread, its events handed to the event loop.

The thread generates under the request's lease (its slot is what an emergency clear or an unload cancels),
counts the prompt's tokens, applies the context guard (the scheduler's output budget), then streams chunks. The loop side reads
:class:`Event` values; when the client goes away (the reader is cancelled) the thread is told to
stop through the generator's ``cancel`` callback.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from memory_controller.backend import GenerationChunk, GenerationRequest
from memory_controller.scheduler import Lease, output_budget

from .errors import ApiError


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
    """The number of new tokens to allow (see ``memory_controller.scheduler.output_budget``); raises
    RequestRefusedError ``context_length_exceeded`` (400) naming both numbers when over the context."""
    return output_budget(model_id, prompt_tokens, requested, context_tokens)


class Run:
    """Start with :meth:`start`; read with :meth:`events`; :meth:`stop` asks the thread to finish."""

    def __init__(self, lease: Lease, build: Callable[[int], GenerationRequest],
                 requested_tokens: int | None) -> None:
        self.lease = lease
        self.deployment = lease.deployment
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
        slot = self.lease.slot  # the lease: given back by the scheduler when the run finishes
        try:
            gen = slot.generator
            if gen is None:
                raise ApiError(500, f"{dep.model_id} runs on {dep.backend_id}, which does not generate "
                                    "in-process and gave no endpoint", type_="server_error", code="no_generator")
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
