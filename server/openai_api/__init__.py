"""The OpenAI-compatible API of the memctl server: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

``OpenAIService(ctl, settings).router`` is mounted by the app. In-process deployments generate on a
worker thread (one request at a time per model, FIFO); HTTP deployments (vLLM) are proxied. A
request for a cached model that is not running loads it on demand (see :mod:`.scheduler`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from memory_controller.backend import Deployment
from memory_controller.errors import InsufficientMemoryError, MemctlError
from memory_controller.toolcalls import ToolCallStream

from . import schemas
from .errors import NO_RETRY, ApiError, from_exception
from .generation import Run
from .proxy import Proxy
from .scheduler import MEMORY_BLOCKER_CODES, Scheduler, not_loaded_error
from .stream import DONE, SSE_HEADERS, CleanupStreamingResponse, Shape, comment, sse, tool_call_deltas, usage

log = logging.getLogger("memctl.server.openai")

MODELS_CACHE_TTL_S = 30.0


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _config_problem(model: Any) -> str | None:
    """Why a cached model whose ``config.json`` exists cannot be listed normally (a link out of the cache, not a
    regular file, malformed), or None when it has no config at all."""
    import os

    from memory_controller import safefiles

    path = str(getattr(model, "path", "") or "")
    if not path or not os.path.lexists(os.path.join(path, "config.json")):
        return None
    try:
        safefiles.check_model_dir(path, safefiles.roots_of(path, getattr(model, "source", None)))
    except MemctlError as exc:
        return str(exc)
    except OSError as exc:
        return f"{model.model_id}: its folder cannot be read ({exc.strerror or exc})"
    return f"{model.model_id}: config.json is unreadable or malformed — download the model again"


class OpenAIService:
    def __init__(self, ctl: Any, settings: Any) -> None:
        self.ctl = ctl
        self.settings = settings
        self.scheduler = Scheduler(ctl, settings, self._default_backend_id)
        self.proxy = Proxy(settings)
        self._ctx_cache: dict[str, tuple[float, Any, int | None, bool, str | None]] = {}
        self._runs: set[Run] = set()
        router = APIRouter(prefix="/v1", lifespan=self._lifespan)
        router.add_api_route("/models", self._models, methods=["GET"])
        router.add_api_route("/chat/completions", self._chat, methods=["POST"])
        router.add_api_route("/completions", self._completions, methods=["POST"])
        self.router = router

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        """Merged into the app's lifespan by ``include_router``: the idle-unload timer runs from startup."""
        self.scheduler.ensure_started()
        try:
            yield
        finally:
            self.scheduler.close()
            await self.proxy.aclose()

    # ------------------------------------------------------------------ public
    def status(self) -> dict[str, dict]:
        """model_id -> {"in_flight", "queued", "idle_unload_in_s", "tool_parser", "tools_parsed"} for running
        or asked-for models (``tool_parser``: "engine", "qwen", "llama3", "mistral", or None = tools not parsed)."""
        return self.scheduler.status()

    def close(self) -> None:
        """Stop the idle timer and pending switches, and tell running generations and proxied streams to
        stop (their clients get an error event). Safe from any thread; idempotent."""
        self.proxy.closed = True
        for run in list(self._runs):
            run.stop()
        self.scheduler.close()
        client = self.proxy._client
        self.proxy._client = None
        if client is not None:
            try:
                asyncio.get_running_loop().create_task(client.aclose())
            except RuntimeError:
                pass  # no loop any more: the sockets close with the process

    # ------------------------------------------------------------------ helpers
    def _default_backend_id(self) -> str:
        """The backend on-demand loads use (the one running now, else the recommended one)."""
        backend_id = self.ctl.serving_backend_id()
        return str(getattr(backend_id, "value", backend_id))  # a Mode enum names its backend by value

    def _check_auth(self, request: Request) -> None:
        if _is_loopback(str(self.settings.bind_address)):
            return
        key = self.settings.serve_api_key
        if key is None:
            raise ApiError(401, "this server listens beyond loopback and serve_api_key is not set: "
                                "set MEMCTL_SERVE_API_KEY and send it as 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers=NO_RETRY)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        ok = hmac.compare_digest(token.strip().encode(), key.get_secret_value().encode())
        if scheme.lower() != "bearer" or not ok:
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <serve_api_key>'",
                           code="invalid_api_key", headers=NO_RETRY)

    # ------------------------------------------------------------------ /v1/models
    def _served_context(self, model_id: str, running: dict[str, Deployment], key: Any
                        ) -> tuple[int | None, bool, str | None]:
        """(context, fits, problem): ``problem`` says why the model cannot be served at all (a broken file, no
        tokenizer, an absurd config), as opposed to not fitting in memory now."""
        dep = running.get(model_id)
        if dep is not None:
            return dep.context_tokens, True, None
        hit = self._ctx_cache.get(model_id)
        now = time.monotonic()
        if hit is not None and hit[0] > now and hit[1] == key:
            return hit[2], hit[3], hit[4]
        problem: str | None = None
        try:
            plan = self.ctl.plan(self._default_backend_id(), model_id, purpose="ide")
            ctx, fits = plan.profile.context_tokens if plan.profile else None, bool(plan.fits)
            hard = [b for b in plan.blockers if getattr(b, "code", "") not in MEMORY_BLOCKER_CODES]
            if hard:
                problem = "; ".join(str(b) for b in hard)
        except MemctlError as exc:
            log.info("no plan for %s: %s", model_id, exc)
            ctx, fits = None, False
            if not isinstance(exc, InsufficientMemoryError):
                problem = str(exc)
        self._ctx_cache[model_id] = (now + MODELS_CACHE_TTL_S, key, ctx, fits, problem)
        return ctx, fits, problem

    def _model_list(self) -> dict[str, Any]:
        running = {d.model_id: d for d in self.ctl.deployments() if d.state.value == "ready"}
        key = frozenset((m, d.handle) for m, d in running.items())
        data: list[dict[str, Any]] = []
        seen: set[str] = set()
        for m in self.ctl.models().models:
            if m.model_id in seen:
                continue
            if not m.has_config:
                problem = _config_problem(m)  # a config that is there but unusable: listed as broken
                if problem is None:
                    continue  # no config at all: not a model memctl can serve
                seen.add(m.model_id)
                data.append({"id": m.model_id, "object": "model", "created": 0, "owned_by": "memctl",
                             "max_model_len": None, "loaded": False,
                             "memctl": {"state": "broken", "backend": None, "fits": False, "endpoint": None,
                                        "problem": problem}})
                continue
            seen.add(m.model_id)
            ctx, fits, problem = self._served_context(m.model_id, running, key)
            dep = running.get(m.model_id)
            state = "loaded" if dep else ("broken" if problem else ("available" if fits else "does_not_fit"))
            data.append({
                "id": m.model_id, "object": "model", "created": int(dep.started_at) if dep else 0,
                "owned_by": "memctl", "max_model_len": None if problem and not dep else ctx,
                "loaded": dep is not None,
                "memctl": {"state": state, "backend": dep.backend_id if dep else None, "fits": fits and not problem,
                           "endpoint": dep.endpoint if dep else None, "problem": problem},
            })
        return {"object": "list", "data": data}

    async def _models(self, request: Request) -> Response:
        try:
            self._check_auth(request)
            return JSONResponse(await asyncio.to_thread(self._model_list))
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped answer
            if isinstance(exc, asyncio.CancelledError):
                raise
            return from_exception(exc).response()

    # ------------------------------------------------------------------ generation endpoints
    async def _chat(self, request: Request) -> Response:
        return await self._serve(request, "chat")

    async def _completions(self, request: Request) -> Response:
        return await self._serve(request, "completion")

    async def _serve(self, request: Request, kind: str) -> Response:
        try:
            self._check_auth(request)
            model_cls = schemas.ChatRequest if kind == "chat" else schemas.CompletionRequest
            raw = await request.body()
            req = schemas.parse(model_cls, raw)
            schemas.generation_request(req, 1)  # validate messages/tools before anything loads
            if getattr(req, "tools", None) and await asyncio.to_thread(self.ctl.supports_tools, req.model) is False:
                raise ApiError(400, f"{req.model} does not support tools (its backend says so): choose a model "
                                    "with tool calling for an agent", code="model_not_servable", param="tools",
                               headers=NO_RETRY)
            if self.scheduler.ready(req.model) is None:
                await asyncio.to_thread(self.ctl.resolve, req.model)  # 404 for a model not in the cache
                if not self.settings.serve_on_demand:
                    raise not_loaded_error(req.model)
                await asyncio.to_thread(self.scheduler.plan_load, req.model)  # 503 before anything stops
                if req.stream:
                    return self._stream_after_load(kind, req, raw)
            dep = await self.scheduler.acquire(req.model)
            return await self._respond(kind, req, raw, dep)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001
            return from_exception(exc).response()

    def _lease_cleanup(self, model_id: str) -> Any:
        done = False

        def cleanup() -> None:
            nonlocal done
            if not done:
                done = True
                self.scheduler.release(model_id)
        return cleanup

    async def _respond(self, kind: str, req: Any, raw: bytes, dep: Deployment) -> Response:
        """Answer with the lease on ``dep`` held; the lease is released exactly once, whatever happens."""
        release = self._lease_cleanup(dep.model_id)
        try:
            if dep.endpoint:
                return await self._proxy(kind, raw, dep, release)
            run = self._new_run(req, dep)
            run.on_finish(release)
            first = await self._first_event(run, dep.model_id)
            if not req.stream:
                try:
                    return JSONResponse(await self._collect(kind, req, run, first))
                finally:
                    run.finish()
            body = self._stream_events(kind, req, run, first)
            return CleanupStreamingResponse(body, run.finish, headers=SSE_HEADERS)
        except BaseException:
            release()
            raise

    async def _proxy(self, kind: str, raw: bytes, dep: Deployment, release: Any) -> Response:
        body = json.loads(raw)
        slot_cm = self.ctl.generating(dep)
        slot = slot_cm.__enter__()
        st = self.scheduler.state(dep.model_id)
        st.active += 1

        def cleanup() -> None:
            st.active -= 1
            slot_cm.__exit__(None, None, None)
            release()
        return await self.proxy.forward("chat/completions" if kind == "chat" else "completions",
                                        body, dep, slot, cleanup)

    def _new_run(self, req: Any, dep: Deployment) -> Run:
        requested = req.requested_tokens if isinstance(req, schemas.ChatRequest) else req.max_tokens
        run = Run(self.ctl, dep, lambda n: schemas.generation_request(req, n), requested)
        self._runs.add(run)
        run.on_finish(lambda: self._runs.discard(run))
        return run

    async def _first_event(self, run: Run, model_id: str) -> Any:
        """Wait for this model's FIFO turn, start the run, return its "start" event (or raise its error).

        From here on ``run.finish()`` gives the turn back (exactly once)."""
        st = self.scheduler.state(model_id)
        await st.gen_lock.acquire()
        st.active += 1

        def give_back() -> None:
            st.active -= 1
            st.gen_lock.release()
        run.on_finish(give_back)
        try:
            run.start()
            run.reader = run.events()
            first = await run.reader.__anext__()
        except BaseException:
            run.finish()
            raise
        if first.kind == "error":
            run.finish()
            raise first.error
        return first

    async def _generate(self, kind: str, req: Any, run: Run, first: Any) -> AsyncIterator[tuple[str, Any]]:
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
                    yield "error", from_exception(ev.error)
                    return
                elif ev.kind == "end" and (finish == "cancelled" or (not complete and (ev.cancelled_by_controller
                                                                                   or ev.stopped))):
                    why = {"emergency_clear": "an emergency clear ran", "unload": f"{req.model} was unloaded",
                           "switch": "another model is being loaded in its place"}.get(
                        ev.reason or "", "the memctl server is stopping" if self.proxy.closed
                        else f"{req.model} was unloaded or an emergency clear ran")
                    yield "error", ApiError(503, f"generation stopped: {why}", type_="server_error",
                                            code="generation_cancelled", headers={"x-should-retry": "false"})
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
        async for what, value in self._generate(kind, req, run, first):
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
        async for what, value in self._generate(kind, req, run, first):
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

    def _stream_after_load(self, kind: str, req: Any, raw: bytes) -> Response:
        """An SSE answer that waits for the on-demand load with comment heartbeats, then streams."""
        state: dict[str, Any] = {"inner": None, "release": None}

        async def body() -> AsyncIterator[bytes]:
            task = asyncio.ensure_future(self.scheduler.acquire(req.model))
            taken = False
            try:
                while True:
                    done, _ = await asyncio.wait({task}, timeout=self.settings.serve_heartbeat_s)
                    if done:
                        break
                    yield comment(f"loading {req.model} ...")
                taken = True
            finally:
                if not task.done():
                    task.cancel()
                elif not taken and not task.cancelled() and task.exception() is None:
                    self.scheduler.release(req.model)  # leased just as the client went away
            try:
                dep = task.result()
            except BaseException as exc:  # noqa: BLE001 - told to the client as an error event
                yield from_exception(exc).sse()
                yield DONE
                return
            try:
                inner = await self._respond(kind, req, raw, dep)
            except BaseException as exc:  # noqa: BLE001
                yield from_exception(exc).sse()
                yield DONE
                return
            state["inner"] = inner
            if isinstance(inner, CleanupStreamingResponse):
                async for piece in inner.body_iterator:
                    yield piece if isinstance(piece, bytes) else bytes(piece)
            else:  # an error answer from the engine: say it as an event
                yield b"data: " + bytes(inner.body) + b"\n\n"
                yield DONE

        async def cleanup() -> None:
            inner = state["inner"]
            if isinstance(inner, CleanupStreamingResponse) and not inner._cleaned:
                inner._cleaned = True
                aclose = getattr(inner.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                result = inner._cleanup()
                if result is not None:
                    await result

        return CleanupStreamingResponse(body(), cleanup, headers=SSE_HEADERS)


__all__ = ["OpenAIService"]


def status_of(handle: Any) -> dict[str, dict]:
    """``OpenAIService.status()`` of the app a running ``server.runner.ServerHandle`` serves (model_id ->
    {"in_flight", "queued", "idle_unload_in_s", ...}); {} when it serves no OpenAI API or is not running."""
    app = getattr(handle, "app", None)
    service = getattr(getattr(app, "state", None), "openai_service", None)
    try:
        return service.status() if service is not None else {}
    except Exception:  # noqa: BLE001 - a status line must never break the page
        return {}
