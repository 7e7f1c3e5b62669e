"""The control API: the owner's controller, for other memctl processes (``/control/*``).

One route per routed call of ``memory_controller.api.ControllerAPI``, at ``/control/<call>`` (GET for
reads, POST for what plans or acts); ``tests/test_controller_api.py`` fails when the Protocol, these
routes and ``server.client.RemoteController`` drift apart. ``/control/ping`` and the identity check
``/control/hello`` are the only others.

``/control/hello?nonce=N`` needs no token: it answers ``owner_proof(token, N, pid)`` so a client can
check it talks to the owner before it sends the token. Every other route requires the owner's token in the ``X-Memctl-Token`` header (compared in constant time);
a missing or wrong token is 401. Results are ``to_jsonable`` of the controller's values; a
``MemctlError`` comes back as ``{"error": err.to_dict()}`` with a status by kind (400 bad input,
404 not found, 409 busy or stale, 503 no memory, 500 otherwise) and the client raises it again.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from memory_controller import errors
from memory_controller.api import InProcessController, OperationView
from memory_controller.types import Profile, to_jsonable

from .client import from_jsonable
from .owner import PROOF_PATH, TOKEN_HEADER, owner_proof

log = logging.getLogger(__name__)

_STATUS_BY_ERROR: dict[type[errors.MemctlError], int] = {
    errors.InvalidModelIdError: 400,
    errors.SettingsError: 400,
    errors.ModelNotFoundError: 404,
    errors.OperationBusyError: 409,
    errors.StalePlanError: 409,
    errors.InsufficientMemoryError: 503,
}


def error_status(exc: errors.MemctlError) -> int:
    for cls in type(exc).__mro__:
        if cls in _STATUS_BY_ERROR:
            return _STATUS_BY_ERROR[cls]
    return 500


def error_body(exc: errors.MemctlError) -> dict[str, Any]:
    body = exc.to_dict()
    for attr in ("needed_bytes", "free_bytes"):  # InsufficientMemoryError's numbers
        if hasattr(exc, attr):
            body[attr] = getattr(exc, attr)
    return {"error": body}


async def memctl_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.MemctlError)
    return JSONResponse(error_body(exc), status_code=error_status(exc))


class _Body(BaseModel):
    """A control request's JSON body: a field this owner does not know (another memctl version's) is a 422
    naming it, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class PlanBody(_Body):
    backend_id: str = Field(min_length=1, max_length=200)
    model_id: str = Field(min_length=1, max_length=1000)
    profile: dict[str, Any] | None = None
    purpose: str = Field("switch", pattern=r"^[a-z_]{1,32}$")
    free_holders: bool = False


class PlansBody(_Body):
    backend_id: str = Field(min_length=1, max_length=200)
    model_ids: list[str] = Field(max_length=2000)
    profile: dict[str, Any]


class MaxContextBody(_Body):
    model_id: str = Field(min_length=1, max_length=1000)
    profile: dict[str, Any]
    free_bytes: int | None = Field(None, ge=0)


class ExportBody(_Body):
    fmt: str = Field(min_length=1, max_length=64)
    model_id: str = Field(min_length=1, max_length=1000)
    gpu_bytes: int | None = Field(None, ge=1)
    gpus: int = Field(1, ge=1, le=4096)
    context: int | None = Field(None, ge=1)
    batch: int | None = Field(None, ge=1)
    accelerator: str | None = Field(None, max_length=64)
    max_replicas: int = Field(2, ge=1, le=100_000)


class ApplyBody(_Body):
    # either a plan as the client got it from /plan (run exactly, or 409 stale_plan), or what to plan
    plan: dict[str, Any] | None = None
    backend_id: str | None = Field(None, min_length=1, max_length=200)
    model_id: str | None = Field(None, min_length=1, max_length=1000)
    profile: dict[str, Any] | None = None
    force: bool = False
    cancel_generation: bool = False


class UnloadBody(_Body):
    model_id: str = Field(min_length=1, max_length=1000)


def _profile(data: dict[str, Any] | None) -> Profile | None:
    if data is None:
        return None
    try:
        return from_jsonable(Profile, data)
    except (KeyError, TypeError, ValueError) as exc:
        raise errors.MemctlError(f"invalid profile: {exc}", "send a profile as `memctl` prints it",
                                 code="invalid_profile") from None


def _plan(data: dict[str, Any]) -> Any:
    from memory_controller.planning import plan_from_jsonable

    try:
        return plan_from_jsonable(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise errors.MemctlError(f"invalid plan: {exc}", "send the plan as /control/plan returned it",
                                 code="invalid_plan") from None


def _apply_args(body: ApplyBody) -> tuple[tuple[Any, ...], dict[str, Any]]:
    opts = {"force": body.force, "cancel_generation": body.cancel_generation}
    if body.plan is not None:
        return (_plan(body.plan),), opts
    if body.backend_id is None or body.model_id is None:
        raise errors.MemctlError("apply needs a plan, or a backend_id and a model_id",
                                 "send the plan /plan returned", code="invalid_request")
    return (body.backend_id, body.model_id, _profile(body.profile)), opts


def encode_operation(view: OperationView | None) -> Any:
    """An OperationView as JSON: its fields, the result's type name, the error as the error body."""
    if view is None:
        return None
    error = view.error
    if error is not None and not isinstance(error, errors.MemctlError):
        error = errors.MemctlError(f"internal error: {type(error).__name__}: {error}",
                                   "see the owner process's log")
    return {"op_id": view.op_id, "kind": view.kind, "title": view.title, "params": to_jsonable(view.params),
            "started_at": view.started_at, "ended_at": view.ended_at, "running": view.running,
            "record": to_jsonable(view.record), "events": to_jsonable(list(view.events)),
            "result_type": None if view.result is None else type(view.result).__name__,
            "result": to_jsonable(view.result), "error": None if error is None else error_body(error)}


def make_control_router(ctl: Any, token: str, *,
                        serve_status: Callable[[], dict[str, dict]] | None = None) -> APIRouter:
    """Routes over ``ctl`` (the owner's MemoryController, or its ControllerAPI), guarded by ``token``."""
    import os

    api = ctl if isinstance(ctl, InProcessController) else InProcessController(ctl)
    expected = token.encode()

    def require_token(x_memctl_token: str | None = Header(default=None, alias=TOKEN_HEADER)) -> None:
        if x_memctl_token is None or not hmac.compare_digest(x_memctl_token.encode(), expected):
            raise HTTPException(status_code=401, detail="missing or wrong memctl token",
                                headers={"WWW-Authenticate": TOKEN_HEADER})

    outer = APIRouter()

    @outer.get(PROOF_PATH.removeprefix("/control"))
    def hello(nonce: str = Query(min_length=16, max_length=128)) -> dict[str, Any]:
        pid = os.getpid()
        return {"pid": pid, "proof": owner_proof(token, nonce, pid)}

    router = APIRouter(dependencies=[Depends(require_token)])

    # sync handlers: FastAPI runs them on its thread pool, so a long apply does not block the loop
    @router.get("/ping")
    def ping() -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid()}

    # ------------------------------------------------------------------ read calls
    @router.get("/devices")
    def devices() -> Any:
        return to_jsonable(api.devices())

    @router.get("/memory_history")
    def memory_history() -> Any:
        return to_jsonable(api.memory_history())

    @router.get("/models")
    def models(refresh: bool = False) -> Any:
        return to_jsonable(api.models(refresh=refresh))

    @router.get("/resolve")
    def resolve(model_id: str = Query(min_length=1, max_length=1000)) -> Any:
        return to_jsonable(api.resolve(model_id))

    @router.get("/deployments")
    def deployments(fresh: bool = False) -> Any:
        return to_jsonable(api.deployments(fresh=fresh))

    @router.get("/backend_ids")
    def backend_ids() -> Any:
        return api.backend_ids()

    @router.get("/availability")
    def availability(backend_id: str = Query(min_length=1, max_length=200)) -> Any:
        return to_jsonable(api.availability(backend_id))

    @router.get("/capabilities")
    def capabilities(backend_id: str = Query(min_length=1, max_length=200)) -> Any:
        return to_jsonable(api.capabilities(backend_id))

    @router.get("/recommend")
    def recommend(model: str | None = Query(None, min_length=1, max_length=1000),
                  device_key: str | None = Query(None, min_length=1, max_length=64)) -> Any:
        return to_jsonable(api.recommend(model=model, device_key=device_key))

    @router.get("/recommend_in_view")
    def recommend_in_view(device_key: str | None = Query(None, min_length=1, max_length=64)) -> Any:
        return to_jsonable(api.recommend_in_view(device_key=device_key))

    @router.post("/max_context")
    def max_context(body: MaxContextBody) -> Any:
        profile = _profile(body.profile)
        assert profile is not None
        return api.max_context(body.model_id, profile, free_bytes=body.free_bytes)

    @router.post("/plan")
    def plan(body: PlanBody) -> Any:
        return to_jsonable(api.plan(body.backend_id, body.model_id, _profile(body.profile), purpose=body.purpose,
                                    free_holders=body.free_holders))

    @router.post("/plans")
    def plans(body: PlansBody) -> Any:
        profile = _profile(body.profile)
        assert profile is not None
        return to_jsonable(api.plans(body.backend_id, body.model_ids, profile))

    @router.get("/export_formats")
    def export_formats() -> Any:
        return list(api.export_formats())

    @router.post("/export")
    def export(body: ExportBody) -> Any:
        return to_jsonable(api.export(body.fmt, body.model_id, gpu_bytes=body.gpu_bytes, gpus=body.gpus,
                                      context=body.context, batch=body.batch, accelerator=body.accelerator,
                                      max_replicas=body.max_replicas))

    @router.get("/holders")
    def holders() -> Any:
        return to_jsonable(api.holders())

    @router.get("/history")
    def history(limit: int = 50) -> Any:
        return to_jsonable(api.history(limit=max(1, min(limit, 1000))))

    @router.get("/log_write_errors")
    def log_write_errors() -> Any:
        return [str(e) for e in api.log_write_errors()]

    @router.get("/log_warnings")
    def log_warnings() -> Any:
        return [str(e) for e in api.log_warnings()]

    @router.post("/acknowledge_log_errors")
    def acknowledge_log_errors() -> None:
        api.acknowledge_log_errors()

    @router.get("/status")
    def status() -> Any:
        return to_jsonable(api.status())

    @router.get("/serving_backend_id")
    def serving_backend_id() -> Any:
        return api.serving_backend_id()

    @router.get("/in_flight")
    def in_flight() -> Any:
        return api.in_flight()

    @router.get("/serving_pause")
    def serving_pause() -> Any:
        """The on-demand pause (None when loads on demand are allowed)."""
        return {"pause": ctl.serving_pause()}

    @router.post("/resume_serving")
    def resume_serving() -> Any:
        """Lift the on-demand pause (after an emergency clear or an unload); the dashboard and `memctl serve resume`."""
        return {"resumed": bool(ctl.resume_serving())}

    @router.get("/serve_status")
    def serve_status_route() -> Any:
        return to_jsonable(serve_status()) if serve_status is not None else {}

    @router.get("/current_operation")
    def current_operation() -> Any:
        return to_jsonable(api.current_operation())

    # ------------------------------------------------------------------ operations
    @router.post("/submit_apply")
    def submit_apply(body: ApplyBody) -> Any:
        args, opts = _apply_args(body)
        return {"op_id": api.submit_apply(*args, **opts)}

    @router.post("/submit_unload")
    def submit_unload(body: UnloadBody) -> Any:
        return {"op_id": api.submit_unload(body.model_id)}

    @router.post("/submit_clear")
    def submit_clear() -> Any:
        return {"op_id": api.submit_clear()}

    @router.post("/submit_emergency")
    def submit_emergency() -> Any:
        return {"op_id": api.submit_emergency()}

    @router.get("/operation")
    def operation(op_id: str = Query(min_length=1, max_length=64)) -> Any:
        return encode_operation(api.operation(op_id))

    @router.get("/operations")
    def operations(limit: int = 5) -> Any:
        return [encode_operation(v) for v in api.operations(max(0, min(limit, 50)))]

    @router.post("/apply")
    def apply(body: ApplyBody) -> Any:
        args, opts = _apply_args(body)
        return to_jsonable(api.apply(*args, **opts))

    @router.post("/unload")
    def unload(body: UnloadBody) -> Any:
        return to_jsonable(api.unload(body.model_id))

    @router.post("/clear_memory")
    def clear_memory() -> Any:
        return to_jsonable(api.clear_memory())

    @router.post("/emergency_clear")
    def emergency_clear() -> Any:
        return to_jsonable(api.emergency_clear())

    outer.include_router(router)
    return outer
