"""The memctl server's FastAPI app: ``GET /health``, the control API under ``/control`` and the
OpenAI-compatible API (``server.openai_api``) for the IDE."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from memory_controller.errors import MemctlError

from . import security
from .control import make_control_router, memctl_error_handler

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.settings import Settings


def _openai_service(ctl: Any, settings: Settings) -> Any | None:
    """The OpenAI-compatible routes, or None on a checkout without them."""
    try:
        from .openai_api import OpenAIService
    except ModuleNotFoundError as exc:
        if exc.name not in ("server.openai_api", __package__ + ".openai_api"):
            raise  # a dependency of theirs is missing: say so, do not serve half an API
        return None
    return OpenAIService(ctl, settings)


def create_app(ctl: Any, settings: Settings, *, token: str) -> FastAPI:
    """The app over ``ctl`` (the local controller). ``token`` guards ``/control``.

    ``app.state.memctl_close()`` stops what the app runs (in-flight generations, idle timers);
    the runner calls it on shutdown.
    """
    app = FastAPI(title="memctl", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(MemctlError, memctl_error_handler)
    service = _openai_service(ctl, settings)
    app.state.memctl_close = service.close if service is not None else None
    app.state.openai_service = service

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "service": "memctl", "pid": os.getpid(), "openai_api": service is not None}

    app.include_router(make_control_router(ctl, token, serve_status=service.status if service else None),
                       prefix="/control")
    if service is not None:
        app.include_router(service.router)
    security.install(app, settings)  # Host, Origin, Content-Type and body limits on every route
    return app
