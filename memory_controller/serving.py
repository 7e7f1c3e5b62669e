"""Serving from the controller: models on demand and generation slots (mixed into MemoryController).

Generation never takes the operation slot: a request holds a :class:`GenerationSlot`, which an emergency
clear, an unload of that deployment, or (when asked) a switch cancels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from . import applying
from .backend import Deployment, DeploymentState
from .errors import MemctlError, ModelLoadError
from .reports import GenerationSlot
from .types import ProgressCallback

if TYPE_CHECKING:
    from .controller import MemoryController


class ServingMixin:
    def ensure_deployment(self: MemoryController, model_id: str, *, progress: ProgressCallback | None = None) -> Deployment:
        """The READY deployment of ``model_id``, loading it on demand (IDE-aware plan) when it fits.

        Raises InsufficientMemoryError (with needed/free and the suggestion) leaving what runs untouched,
        OperationBusyError, ModelNotFoundError, ModelLoadError.
        """
        cached = self.resolve(model_id)
        ready = self._ready(cached.model_id)
        if ready is not None:
            return ready
        plan = self.plan(self.serving_backend_id(), cached, purpose="ide")
        if plan.blockers:
            raise ModelLoadError(f"{cached.model_id}: {plan.blockers[0].text}", "see the plan in the dashboard",
                                 code=plan.blockers[0].code, args=dict(plan.blockers[0].args))
        if not plan.fits:
            raise applying.not_fit_error(plan)
        self.apply(plan, progress=progress)
        ready = self._ready(cached.model_id)
        if ready is None:
            raise ModelLoadError(f"{cached.model_id} was started but is not ready", "see the operation log")
        return ready

    def supports_tools(self: MemoryController, model_id: str) -> bool | None:
        """Whether ``model_id`` can call tools, as the backend that lists it says (its optional
        ``supports_tools(model)``); None when no backend knows (tools are then passed on). Never raises."""
        try:
            cached = self.resolve(model_id)
            if cached.source not in self.registry.ids():
                return None
            ask = getattr(self.backend(cached.source), "supports_tools", None)
            return None if ask is None else ask(cached)
        except MemctlError:
            return None

    def _ready(self, model_id: str) -> Deployment | None:
        return next((d for d in self.deployments()
                     if d.model_id == model_id and d.state is DeploymentState.READY), None)

    def serving_backend_id(self) -> str:
        """The backend on-demand loads use: the one running now, else the recommendation's when available."""
        current = self.mode
        if current is not None:
            return current
        rec = self.recommend()
        if self.availability(rec.profile.mode).ok:
            return rec.profile.mode
        return next(bid for bid in self.registry.ids() if self.availability(bid).ok)

    @contextmanager
    def generating(self, deployment: Deployment) -> Iterator[GenerationSlot]:
        """A slot for one request on ``deployment``; cancelled by an emergency clear or an unload of it.
        Never takes the operation slot."""
        backend = self.backend(deployment.backend_id)
        gen = backend if backend.capabilities.generates_in_process else None
        slot = GenerationSlot(deployment, gen)  # type: ignore[arg-type]
        with self._state_lock:
            self._slots.append(slot)
        try:
            yield slot
        finally:
            with self._state_lock:
                self._slots.remove(slot)

    def in_flight(self) -> dict[str, int]:
        with self._state_lock:
            out: dict[str, int] = {}
            for s in self._slots:
                out[s.deployment.model_id] = out.get(s.deployment.model_id, 0) + 1
            return out

    def cancel_generation(self, handles: set[tuple[str, str]] | None, reason: str) -> int:
        """Cancel slots on the given (backend id, handle) pairs (None: all). Returns how many."""
        with self._state_lock:
            hit = [s for s in self._slots
                   if handles is None or (s.deployment.backend_id, s.deployment.handle) in handles]
        for s in hit:
            s.cancel(reason)
        return len(hit)

    def slots_on(self, handles: set[tuple[str, str]]) -> int:
        with self._state_lock:
            return sum(1 for s in self._slots if (s.deployment.backend_id, s.deployment.handle) in handles)

