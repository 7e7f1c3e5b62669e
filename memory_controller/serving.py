"""Serving: models on demand and generation slots, as one service the facade composes.

Generation never takes the operation slot: a request holds a :class:`GenerationSlot` (the ledger's), which
an emergency clear, an unload of that deployment, or (when asked) a switch cancels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .backend import Availability, Deployment
from .errors import MemctlError, ModelLoadError
from .planning import Plan, not_fit_error
from .reports import GenerationLedger, GenerationSlot
from .types import CachedModel, ProgressCallback, Recommendation

if TYPE_CHECKING:
    from .catalog import Catalog
    from .fleet import Fleet


class Serving:
    """``plan(backend_id, cached)`` makes an IDE-aware plan; ``apply(plan, progress)`` runs it as an operation;
    ``recommend()`` and ``availabilities()`` choose the backend of an on-demand load."""

    def __init__(self, catalog: Catalog, fleet: Fleet, ledger: GenerationLedger,
                 plan: Callable[[str, CachedModel], Plan], apply: Callable[[Plan, ProgressCallback | None], object],
                 recommend: Callable[[], Recommendation], availabilities: Callable[[], Mapping[str, Availability]]
                 ) -> None:
        self.catalog, self.fleet, self.ledger = catalog, fleet, ledger
        self._plan, self._apply, self._recommend, self._availabilities = plan, apply, recommend, availabilities

    def ensure_deployment(self, model_id: str, *, progress: ProgressCallback | None = None) -> Deployment:
        """The READY deployment of ``model_id``, loading it on demand (IDE-aware plan) when it fits.

        Raises InsufficientMemoryError (with needed/free and the suggestion) leaving what runs untouched,
        OperationBusyError, ModelNotFoundError, ModelLoadError.
        """
        cached = self.catalog.resolve(model_id)
        ready = self.fleet.ready(cached.model_id)
        if ready is not None:
            return ready
        plan = self._plan(self.serving_backend_id(), cached)
        if plan.blockers:
            raise ModelLoadError(f"{cached.model_id}: {plan.blockers[0].text}", "see the plan in the dashboard",
                                 code=plan.blockers[0].code, args=dict(plan.blockers[0].args))
        if not plan.fits:
            raise not_fit_error(plan)
        self._apply(plan, progress)
        ready = self.fleet.ready(cached.model_id)
        if ready is None:
            raise ModelLoadError(f"{cached.model_id} was started but is not ready", "see the operation log")
        return ready

    def supports_tools(self, model_id: str) -> bool | None:
        """Whether ``model_id`` can call tools, as the backend that lists it says (its optional
        ``supports_tools(model)``); None when no backend knows (tools are then passed on). Never raises."""
        try:
            cached = self.catalog.resolve(model_id)
            if cached.source not in self.fleet.registry.ids():
                return None
            ask = getattr(self.fleet.backend(cached.source), "supports_tools", None)
            return None if ask is None else ask(cached)
        except MemctlError:
            return None

    def serving_backend_id(self) -> str:
        """The backend on-demand loads use: the one running now, else the recommendation's when available."""
        current = self.fleet.mode()
        if current is not None:
            return current
        avail = self._availabilities()
        rec = self._recommend()
        if rec.profile.mode in avail and avail[rec.profile.mode].ok:
            return rec.profile.mode
        return next(bid for bid, a in avail.items() if a.ok)

    @contextmanager
    def generating(self, deployment: Deployment) -> Iterator[GenerationSlot]:
        """A slot for one request on ``deployment``; cancelled by an emergency clear or an unload of it.
        Never takes the operation slot."""
        backend = self.fleet.backend(deployment.backend_id)
        gen = backend if backend.capabilities.generates_in_process else None
        with self.ledger.hold(deployment, gen) as slot:  # type: ignore[arg-type]
            yield slot
