"""The OpenAI-compatible API of the memctl server: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

routes (this module: auth, parsing, the model list) → serving (:mod:`.serving`: admission and a lease from the
core's one serving scheduler, ``memory_controller.scheduler``; an in-process run or the proxy) → protocol
(:mod:`.schemas`, :mod:`.stream`). ``OpenAIService(ctl, settings).router`` is mounted by the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from memory_controller.backend import Deployment, DeploymentState
from memory_controller.errors import (
    InsufficientMemoryError,
    InvalidModelIdError,
    MemctlError,
    ModelNotFoundError,
)
from memory_controller.scheduler import ServingScheduler
from memory_controller.serving import MEMORY_BLOCKER_CODES, ControllerEffects
from memory_controller.toolcalls import normalize_family

from . import schemas
from .errors import NO_RETRY, ApiError, from_exception
from .proxy import Proxy
from .serving import Serving

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
        self.effects = ControllerEffects(ctl, settings)
        self.scheduler = ServingScheduler(self.effects)
        self.proxy = Proxy(settings)
        self.serving = Serving(self.scheduler, self.proxy, lambda: float(self.settings.serve_heartbeat_s))
        self._listing: dict[str, tuple[float, Any, dict[str, Any]]] = {}
        self._families: dict[tuple, str | None] = {}
        router = APIRouter(prefix="/v1", lifespan=self._lifespan)
        router.add_api_route("/models", self._models, methods=["GET"])
        router.add_api_route("/chat/completions", self._chat, methods=["POST"])
        router.add_api_route("/completions", self._completions, methods=["POST"])
        self.router = router

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        """Merged into the app's lifespan by ``include_router``: the idle-unload timer runs from startup."""
        self.scheduler.start()
        try:
            yield
        finally:
            self.scheduler.close()
            await self.proxy.aclose()

    # ------------------------------------------------------------------ public
    def status(self) -> dict[str, dict]:
        """model_id -> {"in_flight", "queued", "leases", "idle_unload_in_s", "tool_parser", "tools_parsed",
        "tools"} for running or asked-for models (``tool_parser``: "engine", "qwen", "llama3", "mistral", or
        None = tools not parsed; ``tools``: the chat template renders tools — False: requests with tools get
        400 ``tools_not_supported``)."""
        out = self.scheduler.status()
        try:
            deps = {d.model_id: d for d in self.ctl.deployments() if d.state is DeploymentState.READY}
        except Exception:  # noqa: BLE001 - status must answer whatever a backend does
            deps = {}
        for model_id, entry in out.items():
            dep = deps.get(model_id)
            entry["tool_parser"] = self.tool_parser(dep) if dep is not None else None
            entry["tools_parsed"] = entry["tool_parser"] is not None if dep is not None else None
            entry["tools"] = self._tools_of(model_id, dep)
        return out

    def _tools_of(self, model_id: str, dep: Deployment | None) -> bool | None:
        try:
            return self.effects.tools_supported(self.ctl.resolve(model_id), dep)
        except MemctlError:
            return None

    def tool_parser(self, dep: Deployment) -> str | None:
        """How tool calls are read for ``dep``: "engine" (the engine parses them), a family ("qwen",
        "llama3", "mistral"), or None (tools accepted, text returned: the model's family is unknown)."""
        if dep.endpoint:
            return "engine"
        key = (dep.backend_id, dep.handle, dep.started_at)
        if key not in self._families:
            try:
                family = normalize_family(self.ctl.backend(dep.backend_id).model_family(dep))
            except Exception:  # noqa: BLE001 - a backend that cannot tell: tools are not parsed
                family = None
            self._families[key] = family
        return self._families[key]

    def close(self) -> None:
        """Stop the idle timer, and tell running generations and proxied streams to stop (their clients get an
        error event). Safe from any thread; idempotent."""
        self.serving.stop_all()
        self.scheduler.close()
        self.proxy.close_soon()

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
    def _unloaded_entry(self, model: Any) -> dict[str, Any]:
        """What a model that is not running would be served as: its context when it fits, else the truth
        (does not fit now, cannot be served, broken files) with the reason and what to do."""
        try:
            plan = self.ctl.plan(self._default_backend_id(), model, purpose="ide")
        except (ModelNotFoundError, InvalidModelIdError) as exc:
            return {"state": "broken", "max_model_len": None, "reason": str(exc)}
        except InsufficientMemoryError as exc:
            return {"state": "does_not_fit", "max_model_len": None, "reason": str(exc)}
        except MemctlError as exc:
            hint = exc.hint or ""
            if "download" not in hint:
                hint = (hint + "; " if hint else "") + "delete it from the cache and download it again"
            return {"state": "broken", "max_model_len": None, "reason": f"{exc.message} — {hint}"}
        ctx = plan.profile.context_tokens if plan.profile else None
        servable = [b for b in plan.blockers if b.code not in MEMORY_BLOCKER_CODES]
        if servable:
            return {"state": "broken", "max_model_len": None, "reason": "; ".join(b.text for b in servable)}
        if plan.blockers or not plan.fits:
            why = "; ".join(b.text for b in plan.blockers) or (
                plan.suggestion.text if getattr(plan, "suggestion", None) else "it does not fit in free memory")
            return {"state": "does_not_fit", "max_model_len": None, "reason": why}
        return {"state": "available", "max_model_len": ctx, "reason": None}

    def _entry(self, model: Any, dep: Deployment | None, key: Any) -> dict[str, Any]:
        if dep is not None:
            return {"state": "loaded", "max_model_len": dep.context_tokens, "reason": None}
        hit = self._listing.get(model.model_id)
        now = time.monotonic()
        if hit is not None and hit[0] > now and hit[1] == key:
            return hit[2]
        entry = self._unloaded_entry(model)
        self._listing[model.model_id] = (now + MODELS_CACHE_TTL_S, key, entry)
        return entry

    def _model_list(self) -> dict[str, Any]:
        running = {d.model_id: d for d in self.ctl.deployments() if d.state is DeploymentState.READY}
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
            dep = running.get(m.model_id)
            entry = self._entry(m, dep, key)
            tools = self.effects.tools_supported(m, dep) if entry["state"] in ("loaded", "available") else None
            pause = self.ctl.paused_for(m.model_id) if dep is None else None
            data.append({
                "id": m.model_id, "object": "model", "created": int(dep.started_at) if dep else 0,
                "owned_by": "memctl", "max_model_len": entry["max_model_len"], "loaded": dep is not None,
                "memctl": {"state": entry["state"], "reason": entry["reason"],
                           "problem": entry["reason"] if entry["state"] == "broken" else None,
                           "backend": dep.backend_id if dep else None,
                           "fits": entry["state"] in ("loaded", "available"),
                           "endpoint": dep.endpoint if dep else None,
                           "tools": tools if not (dep is not None and dep.endpoint) else None,
                           "tool_parser": self.tool_parser(dep) if dep is not None else None,
                           "paused": pause.to_dict() if pause is not None else None},
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
            return await self.serving.handle(request, kind, req, raw)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001
            return from_exception(exc).response()


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
