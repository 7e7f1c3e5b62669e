"""Serving from the controller: the one generation-lease ledger, the on-demand pause, and loads on demand.

Generation never takes the operation slot: a request holds a :class:`GenerationSlot` (its lease), which an
emergency clear, an unload of that deployment, or (when asked) a switch cancels. The serving scheduler
(:mod:`.scheduler`) hands these out; every slot lives in one :class:`ServingState`, the only ledger of
requests in flight (apply waits for it to drain, the emergency clear cancels all of it).

**The pause.** An emergency clear, or an explicit unload of a model, pauses on-demand loading (of every model,
or of that one) so that a client's automatic retry does not load again what the user just freed. It lasts
until the user loads a model (any apply) or resumes serving (``resume_serving``: ``memctl serve resume``, the
dashboard). An unload the scheduler makes itself because a model sat idle does not pause.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .backend import Backend, Deployment, DeploymentState
from .errors import (
    InsufficientMemoryError,
    InvalidModelIdError,
    MemctlError,
    ModelLoadError,
    ModelNotFoundError,
    RequestRefusedError,
)
from .planning import not_fit_error
from .reports import GenerationSlot
from .types import CachedModel, ProgressCallback

if TYPE_CHECKING:
    from .catalog import Catalog
    from .fleet import Fleet
    from .runner import Operation

PAUSING_REASONS = frozenset({"emergency_clear", "unload"})
Listener = Callable[[str, "frozenset[str] | None"], None]  # (event, model ids or None = all)


@dataclass(frozen=True)
class Pause:
    """On-demand loading is paused: ``models`` (None: every model) since ``since`` (epoch s) for ``reason``."""

    reason: str  # "emergency_clear" | "unload"
    since: float
    models: frozenset[str] | None

    def covers(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "since": self.since,
                "models": None if self.models is None else sorted(self.models)}


class ServingState:
    """Thread-safe: the slots of requests in flight, the pause, and who listens for serving events.

    Events told to listeners (on the thread that caused them; listeners must not block): ``"cancel"`` with
    the model ids whose slots were cancelled (None: all), ``"paused"``, ``"resumed"``."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._slots: list[GenerationSlot] = []
        self._pause: Pause | None = None
        self._quiet: set[str] = set()  # models the scheduler unloads itself (idle): no pause
        self._listeners: list[Listener] = []

    # ------------------------------------------------------------------ slots
    def open(self, deployment: Deployment, generator: Any) -> GenerationSlot:
        slot = GenerationSlot(deployment, generator)
        with self._lock:
            self._slots.append(slot)
        return slot

    def close(self, slot: GenerationSlot) -> None:
        with self._lock:
            if slot in self._slots:
                self._slots.remove(slot)

    @contextmanager
    def hold(self, deployment: Deployment, generator: Any) -> Iterator[GenerationSlot]:
        """A slot for the block's length (:meth:`open` then :meth:`close`)."""
        slot = self.open(deployment, generator)
        try:
            yield slot
        finally:
            self.close(slot)

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for s in self._slots:
                out[s.deployment.model_id] = out.get(s.deployment.model_id, 0) + 1
            return out

    def slots_on(self, handles: set[tuple[str, str]]) -> int:
        with self._lock:
            return sum(1 for s in self._slots if (s.deployment.backend_id, s.deployment.handle) in handles)

    on = slots_on  # how many slots generate on the given (backend id, handle) pairs

    def cancel(self, handles: set[tuple[str, str]] | None, reason: str,
               models: frozenset[str] | None = None) -> int:
        """Cancel slots on (backend id, handle) pairs (None: all); an emergency clear frees every slot from the
        ledger at once (a wedged thread keeps no lease) and, like an unload, pauses on-demand loading (of
        ``models``, the model ids of ``handles``)."""
        with self._lock:
            hit = [s for s in self._slots
                   if handles is None or (s.deployment.backend_id, s.deployment.handle) in handles]
            if handles is None:
                self._slots.clear()
                models = None
            else:
                models = frozenset(models or ()) | {s.deployment.model_id for s in hit}
            pause = None
            if reason in PAUSING_REASONS:
                pause = self._pause_locked(reason, models)
        for s in hit:
            s.cancel(reason)
        self._tell("cancel", models)
        if pause is not None:
            self._tell("paused", pause.models)
        return len(hit)

    # ------------------------------------------------------------------ pause
    def _pause_locked(self, reason: str, models: frozenset[str] | None) -> Pause | None:
        if models is not None:
            models = frozenset(m for m in models if m not in self._quiet)
            if not models:
                return None
        old = self._pause
        if old is not None and models is not None:
            if old.models is None:
                return old
            models = old.models | models
        self._pause = Pause(reason, time.time(), models)
        return self._pause

    def pause(self) -> Pause | None:
        with self._lock:
            return self._pause

    def paused(self, model_id: str) -> Pause | None:
        with self._lock:
            p = self._pause
            return p if p is not None and p.covers(model_id) else None

    def resume(self) -> bool:
        """Lift the pause; True when there was one."""
        with self._lock:
            was, self._pause = self._pause, None
        if was is not None:
            self._tell("resumed", was.models)
        return was is not None

    @contextmanager
    def quiet(self, model_id: str) -> Iterator[None]:
        """An unload of ``model_id`` inside this block does not pause (the scheduler's idle unload)."""
        with self._lock:
            self._quiet.add(model_id)
        try:
            yield
        finally:
            with self._lock:
                self._quiet.discard(model_id)

    # ------------------------------------------------------------------ listeners
    def subscribe(self, fn: Listener) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._listeners:
                    self._listeners.remove(fn)
        return unsubscribe

    def _tell(self, event: str, models: frozenset[str] | None) -> None:
        with self._lock:
            fns = list(self._listeners)
        for fn in fns:
            try:
                fn(event, models)
            except Exception:  # noqa: BLE001 - a listener must not break a clear or an unload
                pass


class Serving:
    """The serving calls the facade exposes, as a service over the ledger (a :class:`ServingState`), the
    catalog and the fleet. ``plan(backend_id, model)`` makes an IDE-aware plan; ``apply(plan, progress)`` runs it
    as a user's operation (it lifts the pause); ``run_plan(ctx, plan)`` runs one inside an operation already
    started; ``submit(kind, title, body, params, queue=)`` is the runner's; ``unload(model_id)`` is the facade's."""

    def __init__(self, catalog: Catalog, fleet: Fleet, ledger: ServingState,
                 plan: Callable[[str, Any], Any], apply: Callable[[Any, ProgressCallback | None], object],
                 run_plan: Callable[[Any, Any], object], submit: Callable[..., Operation],
                 recommend: Callable[[], Any], availabilities: Callable[[], Mapping[str, Any]],
                 unload: Callable[[str], Any]) -> None:
        self.catalog, self.fleet, self.ledger = catalog, fleet, ledger
        self._plan, self._apply, self._run_plan, self._submit = plan, apply, run_plan, submit
        self._recommend, self._availabilities, self._unload = recommend, availabilities, unload

    def ensure_deployment(self, model_id: str, *, progress: ProgressCallback | None = None) -> Deployment:
        """The READY deployment of ``model_id``, loading it now (IDE-aware plan) when it fits — a user's load:
        it lifts the on-demand pause like any apply.

        Raises InsufficientMemoryError (with needed/free and the suggestion) leaving what runs untouched,
        OperationBusyError, ModelNotFoundError, ModelLoadError.
        """
        cached = self.catalog.resolve(model_id)
        ready = self.ready_deployment(cached.model_id)
        if ready is not None:
            return ready
        plan = self._plan(self.serving_backend_id(), cached)
        _raise_unless_fits(cached.model_id, plan)
        self._apply(plan, progress)
        ready = self.ready_deployment(cached.model_id)
        if ready is None:
            raise ModelLoadError(f"{cached.model_id} was started but is not ready", "see the operation log")
        return ready

    def submit_load(self, model_id: str) -> Operation:
        """Queue an on-demand load of ``model_id`` into the operation runner (it starts when the slot frees;
        planned when it starts, against what runs then; an emergency clear drops it). Not a user's load: the
        pause stays. The operation's result is the READY deployment, or its error."""
        backend_id = self.serving_backend_id()

        def body(ctx: Any) -> Deployment:
            ready = self.ready_deployment(model_id)
            if ready is not None:
                return ready
            plan = self._plan(backend_id, model_id)
            _raise_unless_fits(model_id, plan)
            self._run_plan(ctx, plan)
            ready = self.ready_deployment(model_id)
            if ready is None:
                raise ModelLoadError(f"{model_id} was started but is not ready", "see the operation log",
                                     code="model.not_ready", args={"model": model_id})
            return ready

        return self._submit("apply", f"{backend_id} → {model_id} (on demand)", body,
                            {"backend": backend_id, "model": model_id, "force": False, "on_demand": True},
                            queue=True)

    def unload_idle(self, model_id: str) -> Any:
        """Unload ``model_id`` because it sat idle: like an unload, but it does not pause on-demand loads."""
        with self.ledger.quiet(model_id):
            return self._unload(model_id)

    def supports_tools(self, model_id: str) -> bool | None:
        """Whether ``model_id`` can call tools, as the backend that lists it says (its
        ``supports_tools(model)``); None when no backend knows (tools are then passed on). Never raises."""
        try:
            cached = self.catalog.resolve(model_id)
            if cached.source not in self.fleet.registry.ids():
                return None
            return self.fleet.backend(cached.source).supports_tools(cached)
        except MemctlError:
            return None

    def ready_deployment(self, model_id: str) -> Deployment | None:
        """The READY deployment of ``model_id``, or None."""
        return self.fleet.ready(model_id)

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

    # ------------------------------------------------------------------ leases
    def open_slot(self, deployment: Deployment) -> GenerationSlot:
        """A lease for one request on ``deployment`` (close it with :meth:`close_slot`)."""
        backend = self.fleet.backend(deployment.backend_id)
        gen = backend if backend.capabilities.generates_in_process else None
        return self.ledger.open(deployment, gen)

    def close_slot(self, slot: GenerationSlot) -> None:
        self.ledger.close(slot)

    @contextmanager
    def generating(self, deployment: Deployment) -> Iterator[GenerationSlot]:
        """A slot for one request on ``deployment``; cancelled by an emergency clear or an unload of it.
        Never takes the operation slot."""
        slot = self.open_slot(deployment)
        try:
            yield slot
        finally:
            self.close_slot(slot)

    def cancel_generation(self, handles: set[tuple[str, str]] | None, reason: str) -> int:
        """Cancel slots on the given (backend id, handle) pairs (None: all). Returns how many.
        ``"emergency_clear"`` and ``"unload"`` also pause on-demand loading (see the module doc)."""
        models = None
        if handles is not None:
            try:
                models = frozenset(d.model_id for d in self.fleet.deployments()
                                   if (d.backend_id, d.handle) in handles)
            except Exception:  # noqa: BLE001 - the slots still name their models
                models = frozenset()
        return self.ledger.cancel(handles, reason, models)

    # ------------------------------------------------------------------ pause
    def serving_pause(self) -> dict[str, Any] | None:
        """The on-demand pause as a dict (reason, since, models: None = all), or None when not paused."""
        p = self.ledger.pause()
        return p.to_dict() if p is not None else None


def _raise_unless_fits(model_id: str, plan: Any) -> None:
    if plan.blockers:
        raise ModelLoadError(f"{model_id}: {plan.blockers[0].text}", "see the plan in the dashboard",
                             code=plan.blockers[0].code, args=dict(plan.blockers[0].args))
    if not plan.fits:
        raise not_fit_error(plan)


# --------------------------------------------------------------------------- the scheduler's effects
# Plan blockers that mean "not enough memory" (it may pass once memory is freed); any other blocker is a
# property of the model or the request.
MEMORY_BLOCKER_CODES = frozenset({"plan.blocked_by_holder", "plan.held_by_others", "backend.over_util_cap",
                                  "backend.gpu_memory_unknown"})
_TOOLS_TTL_S = 60.0


class ControllerEffects:
    """:class:`~.scheduler.ServingEffects` over a controller: what the serving scheduler does to the world."""

    def __init__(self, ctl: Any, settings: Any) -> None:
        self.ctl = ctl
        self.settings = settings
        self._tools: dict[tuple[str, str], tuple[float, bool | None]] = {}

    def ready(self, model_id: str) -> Deployment | None:
        return self.ctl.ready_deployment(model_id)

    def running(self) -> list[Deployment]:
        return [d for d in self.ctl.deployments() if d.state is DeploymentState.READY]

    def paused(self, model_id: str) -> Pause | None:
        return self.ctl.paused_for(model_id)

    def on_demand(self) -> bool:
        return bool(self.settings.serve_on_demand)

    def idle_unload_s(self) -> float:
        return float(self.settings.serve_idle_unload_s or 0)

    def load(self, model_id: str) -> Operation:
        return self.ctl.submit_load(model_id)

    def unload_idle(self, model_id: str) -> None:
        self.ctl.unload_idle(model_id)

    def open_lease(self, deployment: Deployment) -> GenerationSlot:
        return self.ctl.open_slot(deployment)

    def close_lease(self, slot: GenerationSlot) -> None:
        self.ctl.close_slot(slot)

    def subscribe(self, fn: Listener) -> Callable[[], None]:
        return self.ctl.subscribe_serving(fn)

    # ------------------------------------------------------------------ admission
    def _asked(self, backend_id: str | None, *, others: bool) -> list[tuple[bool, Backend]]:
        """The serving backend (it reads the tokenizer without loading), then, with ``others``, every other
        backend (a backend whose engine reads the tokenizer itself counts nothing): ``(is the serving one,
        backend)``."""
        backends = self.ctl.backends()
        first = backends.get(backend_id) if backend_id else None
        out = [(True, first)] if first is not None else []
        return out + [(False, b) for k, b in backends.items() if others and k != backend_id]

    def _serving_id(self, deployment: Deployment | None) -> str | None:
        if deployment is not None:
            return deployment.backend_id
        try:
            return str(self.ctl.serving_backend_id())
        except Exception:  # noqa: BLE001 - no backend available: nothing to ask
            return None

    def tools_supported(self, cached: CachedModel, deployment: Deployment | None,
                        backend_id: str | None = None) -> bool | None:
        """Whether the model's chat template renders tools (None: unknown, or the engine parses them)."""
        if deployment is not None and deployment.endpoint:
            return None
        key = (cached.model_id, cached.path)
        hit = self._tools.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        found: bool | None = None
        if self.ctl.supports_tools(cached.model_id) is False:  # a backend that lists the model may know (Ollama)
            self._tools[key] = (now + _TOOLS_TTL_S, False)
            return False
        bid = backend_id or self._serving_id(deployment)
        for _own, b in self._asked(bid, others=False):
            try:
                found = b.tool_support(cached)
            except MemctlError:
                found = None
            if found is not None:
                break
        self._tools[key] = (now + _TOOLS_TTL_S, found)
        return found

    def admit(self, need: Any, deployment: Deployment | None) -> Any:
        from .scheduler import Facts

        cached = self.ctl.resolve(need.model_id)
        # the backend that lists the model may know (Ollama)
        if need.tools and deployment is None and self.ctl.supports_tools(cached.model_id) is False:
            return Facts(cached.model_id, None, tools_supported=False)  # refused by check_admission
        if deployment is not None:
            return Facts(cached.model_id, deployment.context_tokens,
                         tools_supported=self.tools_supported(cached, deployment) if need.tools else None)
        try:
            plan = self.ctl.plan(self.ctl.serving_backend_id(), cached.model_id, purpose="ide")
        except (ModelNotFoundError, InvalidModelIdError):
            raise
        except MemctlError as exc:
            raise broken_error(cached.model_id, exc) from None
        servable = [b for b in plan.blockers if b.code not in MEMORY_BLOCKER_CODES]
        if servable:
            reasons = "; ".join(b.text for b in servable)
            raise RequestRefusedError(f"{cached.model_id} cannot be served: {reasons}",
                                      f"fix that (see `memctl plan {cached.model_id}`) or pick another cached model",
                                      code="model_not_servable", param="model",
                                      args={"model": cached.model_id, "blocker": servable[0].code})
        bid = str(getattr(plan, "backend_id", "") or "") or self._serving_id(None)
        tools = self.tools_supported(cached, None, bid) if need.tools else None
        prompt_tokens = None
        context = plan.profile.context_tokens if plan.profile else None
        if need.request is not None and not (need.tools and tools is False):
            for own, b in self._asked(bid, others=True):
                try:
                    counted = b.count_prompt_tokens(cached, need.request)
                    if counted is None:  # this backend does not count: ask the next
                        continue
                    prompt_tokens = int(counted)
                    break
                except RequestRefusedError:
                    raise
                except MemctlError as exc:  # another backend's tokenizer only counts; its refusals are not ours
                    if own:
                        raise RequestRefusedError(exc.message, exc.hint, code="model_not_servable",
                                                  param="messages", args={"model": cached.model_id}) from None
        facts = Facts(cached.model_id, context, prompt_tokens, tools,
                      frozenset(d.model_id for d in plan.to_stop))
        from .scheduler import check_admission

        check_admission(need, facts)  # the request's own faults first: memory cannot fix them
        if plan.blockers:
            reasons = "; ".join(b.text for b in plan.blockers)
            raise InsufficientMemoryError(f"{cached.model_id} cannot be served now: {reasons}",
                                          "free GPU memory (see `memctl ps` and the dashboard), then ask again")
        if not plan.fits:
            raise not_fit_error(plan)
        return facts


def broken_error(model_id: str, exc: MemctlError) -> RequestRefusedError:
    """A model whose files stop a plan (truncated or corrupt weights, a bad config): 400 ``model_not_servable``
    with the fix."""
    hint = exc.hint or "delete it from the cache and download it again"
    if "download" not in hint and exc.code not in ("model.bad_file",):
        hint += "; if the files are damaged, delete the model from the cache and download it again"
    return RequestRefusedError(f"{model_id} cannot be served: {exc.message}", hint, code="model_not_servable",
                               param="model", args={"model": model_id, "problem": exc.message})
