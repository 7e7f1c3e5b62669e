"""The fleet: every backend (the registry) and what runs on them, read together.

It owns no state of its own beyond the registry; it answers "what runs", "which backend", "is it
available", "the ready deployment of a model" for every other service.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .backend import Availability, Backend, Capabilities, Deployment, DeploymentState
from .errors import InvalidModelIdError, MemctlError
from .registry import BackendRegistry
from .types import CatalogResult, SystemSnapshot, msg
from .units import escape_text

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,255}$")


class Fleet:
    def __init__(self, registry: BackendRegistry) -> None:
        self.registry = registry

    def backends(self) -> dict[str, Backend]:
        return self.registry.all()

    def backend(self, backend_id: str) -> Backend:
        return self.registry.get(backend_id)

    def capabilities(self, backend_id: str) -> Capabilities | None:
        try:
            return self.backend(backend_id).capabilities
        except MemctlError:
            return None

    def availability(self, backend_id: str, snapshot: SystemSnapshot) -> Availability:
        try:
            b = self.backend(backend_id)
        except MemctlError as exc:
            return Availability(False, msg("backend.import_failed", exc.message, backend=backend_id))
        return b.availability(snapshot)

    def availabilities(self, snapshot: SystemSnapshot) -> dict[str, Availability]:
        return {bid: self.availability(bid, snapshot) for bid in self.registry.ids()}

    def deployments(self, *, fresh: bool = False) -> list[Deployment]:
        """What runs now, every backend together. By default it never blocks on a slow engine (a backend
        it cannot reach contributes nothing); ``fresh`` asks each backend for a listing straight from its
        engine (``Backend.list_managed``) and raises when one cannot be reached."""
        out: list[Deployment] = []
        for b in self.backends().values():
            try:
                out.extend(b.list_managed() if fresh else b.deployments())
            except MemctlError:
                if fresh:
                    raise
        return out

    def mode(self) -> str | None:
        """The backend of what runs now (the newest deployment), or None when nothing runs."""
        deps = [d for d in self.deployments() if d.state is not DeploymentState.STOPPED]
        return max(deps, key=lambda d: d.started_at).backend_id if deps else None

    def model_in_view(self, models: Callable[[], CatalogResult]) -> str | None:
        """The model every view recommends for when none is named: the one that runs, else the first cached
        model (where the dashboard's selector starts). None when there is none."""
        try:
            running = [d.model_id for d in self.deployments()]
            ids = [m.model_id for m in models().models]
        except MemctlError:
            return None
        active = [mid for mid in running if mid in ids]
        return active[0] if active else (ids[0] if ids else None)

    def ready(self, model_id: str) -> Deployment | None:
        """The READY deployment of ``model_id``, or None."""
        return next((d for d in self.deployments() if d.model_id == model_id and d.state is DeploymentState.READY),
                    None)

    def find(self, key: str) -> Deployment | None:
        """The deployment whose handle, name or model id is ``key``. Raises InvalidModelIdError for a
        malformed key ('', '/', '../x', control characters) before any backend is asked."""
        if not isinstance(key, str) or not _KEY.match(key) or ".." in key or "//" in key:
            shown = escape_text(repr(key))
            raise InvalidModelIdError(f"{shown} is not a model id, handle or container name",
                                      "use a name as `memctl ps` or `memctl containers` shows it",
                                      code="invalid_name", args={"name": shown})
        deps = self.deployments()
        return next((d for d in deps if key in (d.handle, d.name)), None) or next(
            (d for d in deps if d.model_id == key), None)

    def clear_caches(self) -> dict[str, object]:
        """Every built backend's allocator/gc caches: {action: done?}."""
        done: dict[str, object] = {}
        for b in self.registry.made().values():
            done.update(b.clear_caches())
        return done
