"""The control API: the owner's controller, for other memctl processes (``/control/*``).

Every route requires the owner's token in the ``X-Memctl-Token`` header (compared in constant time);
a missing or wrong token is 401. Results are ``to_jsonable`` of the controller's values; a
``MemctlError`` comes back as ``{"error": err.to_dict()}`` with a status by kind (400 bad input,
404 not found, 409 busy or stale, 503 no memory, 500 otherwise) and the client raises it again.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from memory_controller import errors
from memory_controller.types import Profile, to_jsonable

from .client import from_jsonable
from .owner import TOKEN_HEADER

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


class PlanBody(BaseModel):
    backend_id: str = Field(min_length=1, max_length=200)
    model_id: str = Field(min_length=1, max_length=1000)
    profile: dict[str, Any] | None = None
    purpose: str = Field("switch", pattern=r"^[a-z_]{1,32}$")


class ApplyBody(BaseModel):
    # either a plan as the client got it from /plan (run exactly, or 409 stale_plan), or what to plan
    plan: dict[str, Any] | None = None
    backend_id: str | None = Field(None, min_length=1, max_length=200)
    model_id: str | None = Field(None, min_length=1, max_length=1000)
    profile: dict[str, Any] | None = None
    force: bool = False
    cancel_generation: bool = False


class UnloadBody(BaseModel):
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


def make_control_router(ctl: Any, token: str, *,
                        serve_status: Callable[[], dict[str, dict]] | None = None) -> APIRouter:
    """Routes over ``ctl`` (the owner's MemoryController), guarded by ``token``."""
    expected = token.encode()

    def require_token(x_memctl_token: str | None = Header(default=None, alias=TOKEN_HEADER)) -> None:
        if x_memctl_token is None or not hmac.compare_digest(x_memctl_token.encode(), expected):
            raise HTTPException(status_code=401, detail="missing or wrong memctl token",
                                headers={"WWW-Authenticate": TOKEN_HEADER})

    router = APIRouter(dependencies=[Depends(require_token)])

    # sync handlers: FastAPI runs them on its thread pool, so a long apply does not block the loop
    @router.get("/ping")
    def ping() -> dict[str, Any]:
        import os

        return {"ok": True, "pid": os.getpid()}

    @router.get("/devices")
    def devices() -> Any:
        return to_jsonable(ctl.devices())

    @router.get("/deployments")
    def deployments() -> Any:
        return to_jsonable(ctl.deployments())

    @router.get("/models")
    def models(refresh: bool = False) -> Any:
        return to_jsonable(ctl.models(refresh=refresh))

    @router.post("/plan")
    def plan(body: PlanBody) -> Any:
        return to_jsonable(ctl.plan(body.backend_id, body.model_id, _profile(body.profile), purpose=body.purpose))

    @router.post("/apply")
    def apply(body: ApplyBody) -> Any:
        opts = {"force": body.force, "cancel_generation": body.cancel_generation}
        if body.plan is not None:
            return to_jsonable(ctl.apply(_plan(body.plan), **opts))
        if body.backend_id is None or body.model_id is None:
            raise errors.MemctlError("apply needs a plan, or a backend_id and a model_id",
                                     "send the plan /plan returned", code="invalid_request")
        return to_jsonable(ctl.apply(body.backend_id, body.model_id, _profile(body.profile), **opts))

    @router.get("/serving_backend")
    def serving_backend() -> Any:
        return {"backend_id": ctl.serving_backend_id()}

    @router.post("/unload")
    def unload(body: UnloadBody) -> Any:
        return to_jsonable(ctl.unload(body.model_id))

    @router.post("/clear_memory")
    def clear_memory() -> Any:
        return to_jsonable(ctl.clear_memory())

    @router.post("/emergency_clear")
    def emergency_clear() -> Any:
        return to_jsonable(ctl.emergency_clear())

    @router.get("/history")
    def history(limit: int = 50) -> Any:
        return to_jsonable(ctl.history(limit=max(1, min(limit, 1000))))

    @router.get("/status")
    def status() -> Any:
        return to_jsonable(ctl.status())

    @router.get("/current_operation")
    def current_operation() -> Any:
        return to_jsonable(ctl.current_operation())

    @router.get("/in_flight")
    def in_flight() -> Any:
        fn = getattr(ctl, "in_flight", None)
        return dict(fn()) if fn is not None else {}

    @router.get("/serve_status")
    def serve_status_route() -> Any:
        return to_jsonable(serve_status()) if serve_status is not None else {}

    return router
