"""Serving one generation request: admission and a lease from the core scheduler, then an in-process run or
the proxy, answered in the protocol's shapes (:mod:`.schemas`, :mod:`.stream`).

routes (``OpenAIService``) → this module → the scheduler (``memory_controller.scheduler``) → Run / Proxy.
The lease is given back exactly once, whatever happens: the answer completes, the client goes away (streamed
or not: a non-streamed request whose client disconnects is cancelled and its generation stopped), the
generation fails, or an emergency clear frees every lease.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from memory_controller.scheduler import Facts, Lease, Need, ServingScheduler
from memory_controller.toolcalls import ToolCallStream

from . import schemas
from .errors import ApiError, from_exception
from .generation import Run
from .proxy import Proxy
from .stream import DONE, SSE_HEADERS, CleanupStreamingResponse, Shape, comment, sse, tool_call_deltas, usage

log = logging.getLogger("memctl.server.openai")
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def until_disconnected(request: Request) -> None:
    """Return when the client of a request whose body was read has gone away."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """``await work``, cancelled (ClientGone) when the client goes away first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone()


def need_of(kind: str, req: Any) -> Need:
    """What a request asks of its model (validating messages and tools: a 400 before anything loads)."""
    probe = schemas.generation_request(req, 1)
    if kind == "chat":
        return Need(req.model, request=probe, requested_tokens=req.requested_tokens, tools=req.tools_active)
    return Need(req.model, request=probe, requested_tokens=req.max_tokens)


class Serving:
    def __init__(self, scheduler: ServingScheduler, proxy: Proxy, heartbeat_s: Callable[[], float]) -> None:
        self.scheduler = scheduler
        self.proxy = proxy
        self.heartbeat_s = heartbeat_s
        self._runs: set[Run] = set()

    def stop_all(self) -> None:
        for run in list(self._runs):
            run.stop()

    async def handle(self, request: Request, kind: str, req: Any, raw: bytes) -> Response:
        need = need_of(kind, req)
        facts = await self.scheduler.admit(need)  # refusals here: plain JSON, nothing loaded or evicted
        if req.stream and self.scheduler.effects.ready(req.model) is None:
            return self._stream_after_load(kind, req, raw, need, facts)
        try:
            lease = await unless_gone(request, self.scheduler.acquire(need, facts))
            return await self._respond(request, kind, req, raw, lease)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it

    def _releaser(self, lease: Lease) -> Callable[[], None]:
        return lambda: self.scheduler.release(lease)

    async def _respond(self, request: Request | None, kind: str, req: Any, raw: bytes, lease: Lease) -> Response:
        """Answer with ``lease`` held; the lease is given back exactly once, whatever happens."""
        release = self._releaser(lease)
        try:
            if lease.deployment.endpoint:
                forward = self.proxy.forward("chat/completions" if kind == "chat" else "completions",
                                             json.loads(raw), lease.deployment, lease.slot, release)
                if req.stream or request is None:
                    return await forward
                try:  # a non-streamed client that leaves: the upstream request is cancelled, the lease given back
                    return await unless_gone(request, forward)
                except ClientGone:
                    return Response(status_code=499)
            run = self._new_run(req, lease)
            run.on_finish(release)
            first = await self._first_event(run, lease)
            if not req.stream:
                try:
                    work = self._collect(kind, req, run, first)
                    return JSONResponse(await (unless_gone(request, work) if request is not None else work))
                except ClientGone:
                    return Response(status_code=499)
                finally:
                    run.finish()
            return CleanupStreamingResponse(self._stream_events(kind, req, run, first), run.finish,
                                            headers=SSE_HEADERS)
        except BaseException:
            release()
            raise

    def _new_run(self, req: Any, lease: Lease) -> Run:
        requested = req.requested_tokens if isinstance(req, schemas.ChatRequest) else req.max_tokens
        run = Run(lease, lambda n: schemas.generation_request(req, n), requested)
        self._runs.add(run)
        run.on_finish(lambda: self._runs.discard(run))
        return run

    async def _first_event(self, run: Run, lease: Lease) -> Any:
        """Start the run (the lease holds the model's turn) and return its "start" event, or raise its error
        (a lease cancelled meanwhile: the pause or a retryable cancellation, never "not loaded")."""
        try:
            run.start()
            run.reader = run.events()
            first = await run.reader.__anext__()
        except BaseException:
            run.finish()
            raise
        if first.kind == "error":
            run.finish()
            if lease.cancelled():
                raise self.scheduler.gone_error(lease)
            raise first.error
        return first

    def _stopped(self, req: Any, reason: str | None) -> ApiError:
        why = {"emergency_clear": "an emergency clear ran", "unload": f"{req.model} was unloaded",
               "switch": "another model is being loaded in its place"}.get(
            reason or "", "the memctl server is stopping" if self.proxy.closed
            else f"{req.model} was unloaded or an emergency clear ran")
        return ApiError(503, f"generation stopped: {why}", type_="server_error", code="generation_cancelled",
                        headers={"Retry-After": "1"})

    async def _generate(self, req: Any, run: Run, first: Any) -> AsyncIterator[tuple[str, Any]]:
        """("text", str) pieces, then ("end", (calls, finish_reason, usage)) or ("error", ApiError)."""
        tools = isinstance(req, schemas.ChatRequest) and req.tools_active
        tcs = ToolCallStream(first.family if tools else None)
        finish, completion, complete = "stop", 0, False
        try:
            assert run.reader is not None
            async for ev in run.reader:
                if ev.kind == "chunk":
                    shown = tcs.feed(ev.chunk.text) if ev.chunk.text else ""
                    if shown:
                        yield "text", shown
                    if ev.chunk.finish_reason:
                        finish = ev.chunk.finish_reason
                        completion = ev.chunk.completion_tokens or 0
                        complete = finish != "cancelled"  # the answer ended on its own
                elif ev.kind == "error":
                    yield "error", (self._stopped(req, run.lease.reason) if run.lease.cancelled()
                                    else from_exception(ev.error))
                    return
                elif ev.kind == "end" and (finish == "cancelled" or (not complete and (ev.cancelled_by_controller
                                                                                   or ev.stopped))):
                    yield "error", self._stopped(req, ev.reason)
                    return
        finally:
            run.finish()
        rest = tcs.finish()
        if rest.content:
            yield "text", rest.content
        calls = rest.tool_calls
        if calls and isinstance(req, schemas.ChatRequest) and req.parallel_tool_calls is False:
            calls = calls[:1]
        if calls:
            finish = "tool_calls"
        yield "end", (calls, finish, usage(first.prompt_tokens, completion))

    async def _collect(self, kind: str, req: Any, run: Run, first: Any) -> dict[str, Any]:
        shape = Shape(kind, req.model)
        parts: list[str] = []
        async for what, value in self._generate(req, run, first):
            if what == "text":
                parts.append(value)
            elif what == "error":
                raise value
            else:
                calls, finish, use = value
                text = "".join(parts)
                return shape.response(text if (text or not calls) else None, calls, finish, use)
        raise ApiError(500, "generation ended without a result", type_="server_error", code="internal_error")

    async def _stream_events(self, kind: str, req: Any, run: Run, first: Any) -> AsyncIterator[bytes]:
        shape = Shape(kind, req.model)
        with_usage = req.include_usage
        if kind == "chat":
            yield sse(shape.chunk(role=True, content="", with_usage_field=with_usage))
        async for what, value in self._generate(req, run, first):
            if what == "text":
                yield sse(shape.chunk(content=value, with_usage_field=with_usage))
            elif what == "error":
                yield value.sse()
                yield DONE
                return
            else:
                calls, finish, use = value
                if calls:
                    yield sse(shape.chunk(tool_calls=tool_call_deltas(calls), with_usage_field=with_usage))
                yield sse(shape.chunk(finish_reason=finish, with_usage_field=with_usage))
                if with_usage:
                    yield sse(shape.usage_chunk(use))
        yield DONE

    def _stream_after_load(self, kind: str, req: Any, raw: bytes, need: Need, facts: Facts) -> Response:
        """An SSE answer that waits for the on-demand load with comment heartbeats, then streams. Admission
        already passed, so what can still go wrong here is the load itself (told as an error event)."""
        inner_box: list[CleanupStreamingResponse] = []

        async def body() -> AsyncIterator[bytes]:
            task = asyncio.ensure_future(self.scheduler.acquire(need, facts))
            taken = False
            try:
                while True:
                    done, _ = await asyncio.wait({task}, timeout=self.heartbeat_s())
                    if done:
                        break
                    yield comment(f"loading {req.model} ...")
                taken = True
            finally:
                if not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                elif not taken and not task.cancelled() and task.exception() is None:
                    self.scheduler.release(task.result())  # leased just as the client went away
            try:
                lease = task.result()
            except BaseException as exc:  # noqa: BLE001 - told to the client as an error event
                yield from_exception(exc).sse()
                yield DONE
                return
            try:
                inner = await self._respond(None, kind, req, raw, lease)
            except BaseException as exc:  # noqa: BLE001
                yield from_exception(exc).sse()
                yield DONE
                return
            if isinstance(inner, CleanupStreamingResponse):
                inner_box.append(inner)
                async for piece in inner.body_iterator:
                    yield piece if isinstance(piece, bytes) else bytes(piece)
            else:  # an error answer from the engine: say it as an event
                yield b"data: " + bytes(inner.body) + b"\n\n"
                yield DONE

        async def cleanup() -> None:
            for inner in inner_box:
                await inner.close()

        return CleanupStreamingResponse(body(), cleanup, headers=SSE_HEADERS)
