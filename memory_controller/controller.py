"""MemoryController: the facade the UI, the CLI, the server and scripts talk to.

It holds the probe, the catalog, the registry of backends and the operation runner, and never
branches on which backend it has: everything a backend does goes through the ``Backend`` protocol
(memory_controller/backend.py). Read-only calls (devices, recommend, models, estimate, plan,
deployments, history) may run at any time on any thread. State-changing calls (apply, unload,
clear_memory, emergency_clear) are operations of the runner (memory_controller/runner.py): one
at a time, refused at once with OperationBusyError while another runs; an emergency clear stops
the running one instead of waiting. Generation (``generating``) never takes the operation slot.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import applying, maintenance, planning
from .backend import Availability, Backend, Deployment, DeploymentState, ReleaseReport
from .errors import InvalidModelIdError, MemctlError, ModelLoadError, ModelNotFoundError
from .fitting import FittingMixin
from .oplog import OperationLog
from .planning import Plan
from .recommend import level_for
from .registry import BackendRegistry
from .reports import ClearReport, EmergencyReport, GenerationSlot
from .runner import OperationRunner
from .serving import ServingMixin
from .settings import Settings, load_settings
from .status import StatusMixin
from .types import (
    CachedModel,
    CatalogResult,
    DeviceSnapshot,
    Level,
    OperationRecord,
    Profile,
    ProgressCallback,
    SystemSnapshot,
    msg,
)
from .units import escape_text

if TYPE_CHECKING:
    from .probe import DeviceProbe

_PLANS_TTL_S = 5.0
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,255}$")


class MemoryController(FittingMixin, ServingMixin, StatusMixin):
    """See the module docstring. ``MemoryController()`` reads settings from the environment.

    Args:
        settings: default ``load_settings()`` (raises SettingsError).
        nvml: an NVML module for the probe (tests pass a fake pynvml); default: import ``pynvml``.
        probe: a ready-made probe (tests, benchmarks).
        backends: ready-made backends by id, used instead of the configured ones (tests, benchmarks).
        step_hook: called with each apply step's name as it starts (fault injection in tests and
            the diagnostic page); an exception it raises fails that step.
    """

    def __init__(self, settings: Settings | None = None, *, nvml: Any | None = None,
                 probe: DeviceProbe | None = None, backends: dict[str, Backend] | None = None,
                 step_hook: Callable[[str], None] | None = None) -> None:
        self.settings = settings or load_settings()
        self.step_hook = step_hook
        if probe is None:
            from .probe import DeviceProbe

            probe = DeviceProbe(nvml, nvml_module_name=self.settings.nvml_module,
                                host_memory_budget_bytes=self.settings.host_memory_budget_bytes)
        self.probe = probe
        specs = {} if backends is not None else self.settings.backends
        self.registry = BackendRegistry(specs, self.settings, probe, backends)
        self._log = OperationLog(self.settings.state_dir)
        try:
            self._log.interrupted()  # operations whose process died mid-way are marked interrupted
        except Exception:  # noqa: BLE001 - a log we cannot read is reported by history(), not here
            pass
        self.runner = OperationRunner(on_start=self._log_start, on_end=self._write_log)
        self._state_lock = threading.RLock()
        n = max(2, int(self.settings.memory_history_s / self.settings.poll_interval_s))
        self._samples: deque[tuple[float, dict[str, tuple[int | None, int | None]]]] = deque(maxlen=n)
        self._catalog: tuple[float, CatalogResult] | None = None
        self._slots: list[GenerationSlot] = []
        self._plans_cache: tuple | None = None

    # ================================================================== backends
    def backends(self) -> dict[str, Backend]:
        return self.registry.all()

    def backend(self, backend_id: str) -> Backend:
        return self.registry.get(backend_id)

    def availability(self, backend_id: str, snapshot: SystemSnapshot | None = None) -> Availability:
        try:
            b = self.backend(backend_id)
        except MemctlError as exc:
            return Availability(False, msg("backend.import_failed", exc.message, backend=backend_id))
        return b.availability(snapshot or self.probe.snapshot())

    def deployments(self, *, fresh: bool = False) -> list[Deployment]:
        """What runs now, every backend together. By default it never blocks on a slow engine (a backend
        it cannot reach contributes nothing); ``fresh`` asks backends that manage an outside engine for a
        listing straight from it (their optional ``list_managed()``) and raises when one cannot be reached."""
        out: list[Deployment] = []
        for b in self.backends().values():
            listing = getattr(b, "list_managed", None) if fresh else None
            if listing is not None:
                out.extend(listing())
                continue
            try:
                out.extend(b.deployments())
            except MemctlError:
                if fresh:
                    raise
        return out

    @property
    def mode(self) -> str | None:
        """The backend of what runs now (the newest deployment), or None when nothing runs."""
        deps = [d for d in self.deployments() if d.state is not DeploymentState.STOPPED]
        return max(deps, key=lambda d: d.started_at).backend_id if deps else None

    # ================================================================== read-only
    def devices(self) -> SystemSnapshot:
        """A fresh snapshot of every GPU and the host; also feeds the memory history."""
        snap = self.probe.snapshot()
        with self._state_lock:
            last = self._samples[-1][0] if self._samples else None
            if last is None or snap.taken_at - last >= self.settings.poll_interval_s * 0.5:
                self._samples.append((snap.taken_at, {d.key: (d.used_bytes, d.free_bytes) for d in snap.devices}))
        return snap

    def memory_history(self) -> list[tuple[float, dict[str, tuple[int | None, int | None]]]]:
        with self._state_lock:
            return list(self._samples)

    def seed_memory_history(self, samples: list[tuple[float, dict[str, tuple[int | None, int | None]]]]) -> None:
        """Replace the memory history (benchmarks and demos that cannot wait minutes for real samples)."""
        with self._state_lock:
            self._samples.clear()
            self._samples.extend(samples)

    def level(self, device: DeviceSnapshot) -> Level:
        return level_for(device.free_bytes, self.settings.green_min_bytes, self.settings.yellow_min_bytes)

    def history(self, limit: int | None = 50) -> list[OperationRecord]:
        """Finished operations, newest first (read back from the log: survives restarts)."""
        return self._log.read(limit)

    @property
    def log_warnings(self) -> list[str]:
        """Problems reading or writing the operation log; write failures stay until a write succeeds."""
        return list(self._log.warnings)

    def current_operation(self) -> dict | None:
        op = self.runner.holder()
        if op is None:
            return None
        return {"op_id": op.op_id, "kind": op.kind, "description": op.title, "started_at": op.started_at,
                "last_event": op.last_event}

    # ================================================================== planning
    def plan(self, backend_id: str, model: str | CachedModel, profile: Profile | None = None, *,
             purpose: str = "switch", unload_ollama: bool = False) -> Plan:
        """A dry run: steps (data), what stops and is freed, what is needed, whether it fits, blockers.

        Without ``profile``: the running profile when this model already runs on this backend, else
        the recommendation for the model sized for the memory free after the unload (``purpose="ide"``:
        IDE-aware sizing, see memory_controller/servesize.py). Other holders of the GPU are counted: the
        plan notes who holds memory, offers ``ollama_offer`` when it fits only with Ollama's models unloaded
        (``unload_ollama=True`` adds that step) and is blocked when only a foreign process stopping would
        make room. Raises InvalidModelIdError / ModelNotFoundError for a bad model id, SettingsError for an
        unknown backend.
        """
        return applying.make_plan(self, str(backend_id), self.resolve(model), profile, purpose, unload_ollama)

    def plans(self, backend_id: str, models: list[CachedModel] | tuple[CachedModel, ...],
              profile: Profile) -> dict[str, Plan | None]:
        """One plan per model for the same profile, read against one live state (a verdict beside each
        cached model on every rerun); no suggestion is computed. A model whose plan fails maps to None."""
        live = applying.LiveState(self)
        # The verdicts change only when what runs or free memory (in 64 MiB steps) changes: a rerun of the
        # dashboard with nothing changed reuses them for a few seconds.
        target = planning.target_device(live.snap, profile)
        free = (target.key, (target.free_bytes or 0) >> 26)
        key = (str(backend_id), profile, tuple(m.model_id for m in models),
               frozenset((d.backend_id, d.handle) for d in live.running), free)
        cached = self._plans_cache
        if cached is not None and cached[0] == key and time.monotonic() - cached[1] < _PLANS_TTL_S:
            return dict(cached[2])
        out: dict[str, Plan | None] = {}
        for m in models:
            try:
                out[m.model_id] = applying.make_plan(self, str(backend_id), m, profile, "switch", live=live,
                                                     with_suggestion=False)
            except MemctlError:
                out[m.model_id] = None
        self._plans_cache = (key, time.monotonic(), out)
        return dict(out)

    def holders(self, snapshot: SystemSnapshot | None = None) -> list:
        """Who holds GPU memory, named (holders.MemoryHolder), per process NVML reports."""
        from . import holding

        return holding.holders(self, snapshot)

    def ollama(self):
        """The other holder a backend hands over (``holder_client``), or None when none does."""
        from . import holding

        return holding.ollama_client(self)

    # ================================================================== operations
    def apply(self, plan_or_backend: Plan | str, model: str | CachedModel | None = None,
              profile: Profile | None = None, force: bool = False, progress: ProgressCallback | None = None,
              cancel_generation: bool = False) -> OperationRecord:
        """Run a plan's steps (unload → clear → check → switch → prepare → verify), each recorded.

        ``apply(plan)`` runs exactly that plan, or raises StalePlanError (nothing touched) when what
        runs or free memory changed so that it no longer holds. ``apply(backend_id, model, profile)``
        plans and applies. Refuses (InsufficientMemoryError) when it does not fit, unless ``force``.
        A failure at any step rolls back what this operation started and restores the previous model
        when ``restore_previous_on_failure`` and it fits. Requests generating on what is stopped are
        waited for (``step_timeout_s``) or, with ``cancel_generation``, cancelled.
        """
        op = self.submit_apply(plan_or_backend, model, profile, force=force, cancel_generation=cancel_generation)
        return self._wait(op, progress)

    def submit_apply(self, plan_or_backend: Plan | str, model: str | CachedModel | None = None,
                     profile: Profile | None = None, *, force: bool = False, cancel_generation: bool = False):
        """Like :meth:`apply` but returns the running Operation at once (the dashboard polls it)."""
        if isinstance(plan_or_backend, Plan):
            plan: Plan | None = plan_or_backend
            backend_id, model_id = plan.backend_id, plan.model_id
        else:
            if model is None:
                raise ModelLoadError("no model chosen", "choose a model from the cached models", code="no_model")
            plan = None
            backend_id, model_id = str(plan_or_backend), self.resolve(model).model_id
        params = {"backend": backend_id, "model": model_id, "force": force}

        def body(ctx):
            p = plan or self.plan(backend_id, model_id, profile)
            return applying.run_apply(self, ctx, p, force=force, cancel_generation=cancel_generation)

        return self.runner.submit("apply", f"{backend_id} → {model_id}", body, params)

    def unload(self, model: str, *, progress: ProgressCallback | None = None) -> ReleaseReport:
        """Stop one deployment (by model id, handle or name) and measure what came back."""
        return self._wait(self.submit_unload(model), progress)

    def submit_unload(self, model: str):
        """Like :meth:`unload` but returns the running Operation at once (the dashboard polls it)."""
        dep = self.find_deployment(model)
        if dep is None:
            raise ModelNotFoundError(f"{model} is not loaded", "see the list of what runs", code="not_loaded",
                                     args={"model": model})
        return self.runner.submit("unload", dep.model_id, lambda ctx: maintenance.run_unload(self, ctx, dep),
                                  {"model": dep.model_id, "backend": dep.backend_id, "handle": dep.handle})

    def find_deployment(self, key: str) -> Deployment | None:
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

    def clear_memory(self, *, progress: ProgressCallback | None = None) -> ClearReport:
        """gc and every backend's caches; used bytes per device before and after."""
        return self._wait(self.submit_clear(), progress)

    def submit_clear(self):
        """Like :meth:`clear_memory` but returns the running Operation at once."""
        return self.runner.submit("clear_memory", "clear caches", lambda ctx: maintenance.run_clear(self, ctx), {})

    def emergency_clear(self, *, progress: ProgressCallback | None = None) -> EmergencyReport:
        """Stop every deployment of every backend, cancel generation and the running operation, clear caches.
        Every step is attempted even when an earlier one fails; each outcome is reported."""
        return self._wait(self.submit_emergency(), progress)

    def submit_emergency(self):
        running = self.runner.holder()
        cut = self.cancel_generation(None, "emergency_clear")
        return self.runner.submit("emergency_clear", "emergency clear",
                                  lambda ctx: maintenance.run_emergency(self, ctx, running, cut),
                                  {"cancelled": running.kind if running else None, "streams_cut": cut})

    def _wait(self, op, progress: ProgressCallback | None) -> Any:
        return self.runner.run_existing(op, progress)

    # ================================================================== log and status
    def _log_start(self, record: OperationRecord) -> None:
        try:
            record.memory_before = self.used_by_device()
        except Exception:  # noqa: BLE001 - never lose the operation for a probe glitch
            pass
        self._log.append_started(record)  # before acting: a kill -9 mid-way leaves a record

    def _write_log(self, record: OperationRecord) -> None:
        try:
            record.memory_after = self.used_by_device()
        except Exception:  # noqa: BLE001
            pass
        self._log.append(record)  # False when it could not be written: kept in log_write_errors()

    def log_write_errors(self) -> list[str]:
        """Operation-log writes that failed and have not been acknowledged (shown until a write succeeds)."""
        return self._log.write_errors()

    def acknowledge_log_errors(self) -> None:
        self._log.acknowledge()

    def used_by_device(self) -> dict[str, int | None]:
        return {d.key: d.used_bytes for d in self.probe.snapshot().devices}

# ---------------------------------------------------------------------------- the process-wide instance
_shared: MemoryController | None = None
_shared_lock = threading.Lock()


def shared_controller() -> MemoryController:
    """The one controller of this process, created from the environment on first use (the dashboard keeps
    it here rather than only in ``st.cache_resource``: "Clear cache" would orphan loaded models)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = MemoryController()
        return _shared


def reset_shared_controller() -> None:
    global _shared
    with _shared_lock:
        _shared = None
