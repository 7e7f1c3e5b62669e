"""MemoryController: the thin facade the UI, the CLI, the server and scripts talk to. It composes the core's
services (services.py; ARCHITECTURE.md says who owns which state) and adds only wiring: no core module imports
it. State-changing calls are operations of the runner (one at a time, else OperationBusyError; an emergency
clear stops the running one). Generation never takes the operation slot. It never branches on a backend.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from . import clusterfit
from . import types as t
from .backend import Availability, Backend, Deployment, ReleaseReport
from .errors import ModelLoadError, ModelNotFoundError
from .holders import HolderSource
from .planning import Plan, target_device
from .recommend import level_for
from .reports import ClearReport, EmergencyReport
from .services import build
from .serving import Serving
from .settings import Settings, load_settings
from .status import status_data


class MemoryController:
    """``MemoryController()`` reads settings from the environment. ``nvml``: an NVML module (tests pass a fake);
    ``probe``/``backends``: ready-made ones; ``step_hook(step name)``: fault injection (raising fails that step)."""

    def __init__(self, settings: Settings | None = None, *, nvml: Any | None = None,
                 probe: Any | None = None, backends: dict[str, Backend] | None = None,
                 step_hook: Callable[[str], None] | None = None) -> None:
        s = self.settings = settings or load_settings()
        if probe is None:
            from .probe import DeviceProbe
            probe = DeviceProbe(nvml, nvml_module_name=s.nvml_module, host_memory_budget_bytes=s.host_memory_budget_bytes)
        sv = self.services = build(s, probe, backends)
        sv.executor.step_hook = step_hook
        self.probe, self.registry, self.runner = probe, sv.registry, sv.runner
        self.fleet, self.sizer, self.planner, self.census, self._log = sv.fleet, sv.sizer, sv.planner, sv.census, sv.log
        led = sv.ledger  # the one ledger of generation leases and the on-demand pause (serving.ServingState)
        self.serving = Serving(sv.catalog, sv.fleet, led, lambda b, m: self.plan(b, m, purpose="ide"),
                               lambda p, progress: self.apply(p, progress=progress),
                               lambda ctx, p: sv.executor.run(ctx, p, force=False, cancel_generation=False),
                               sv.runner.submit, self.recommend,
                               lambda: self.fleet.availabilities(self.probe.snapshot()), self.unload)
        self.backends, self.backend, self.deployments = self.fleet.backends, self.fleet.backend, self.fleet.deployments
        self.find_deployment, self.models, self.resolve = sv.fleet.find, sv.catalog.models, sv.catalog.resolve
        self.memory_history, self.seed_memory_history = sv.monitor.history, sv.monitor.seed
        self.used_by_device, self.devices = sv.monitor.used_by_device, sv.monitor.snapshot
        for name in ("ensure_deployment", "generating", "serving_backend_id", "supports_tools", "submit_load",
                     "unload_idle", "ready_deployment", "open_slot", "close_slot", "cancel_generation", "serving_pause"):
            setattr(self, name, getattr(self.serving, name))
        self.in_flight, self.slots_on, self.paused_for = led.in_flight, led.slots_on, led.paused
        self.resume_serving, self.subscribe_serving = led.resume, led.subscribe
        self.log_write_errors, self.acknowledge_log_errors = self._log.write_errors, self._log.acknowledge
        self.model_in_view = partial(sv.fleet.model_in_view, sv.catalog.models)  # what runs, else the first cached
        self.export_formats = lambda: tuple(clusterfit.exporters(sv.fleet))  # formats the backends write

    step_hook = property(lambda self: self.services.executor.step_hook,  # settable: fault injection
                         lambda self, hook: setattr(self.services.executor, "step_hook", hook))

    mode = property(lambda self: self.fleet.mode())  # the backend of the newest deployment; None when nothing runs

    log_warnings = property(lambda self: list(self._log.warnings))  # reading/writing the log; writes stay till one works

    def availability(self, backend_id: str, snapshot: t.SystemSnapshot | None = None) -> Availability:
        return self.fleet.availability(backend_id, snapshot or self.probe.snapshot())

    def level(self, device: t.DeviceSnapshot) -> t.Level:  # 🟢/🟡/🔴 by free memory
        return level_for(device.free_bytes, self.settings.green_min_bytes, self.settings.yellow_min_bytes)

    def history(self, limit: int | None = 50) -> list[t.OperationRecord]:  # newest first, from the log on disk
        return self._log.read(limit)

    def current_operation(self) -> dict | None:
        op = self.runner.holder()
        return op and {"op_id": op.op_id, "kind": op.kind, "description": op.title, "started_at": op.started_at,
                       "last_event": op.last_event}

    def estimate(self, model: str | t.CachedModel, profile: t.Profile) -> t.MemoryEstimate:
        return self.sizer.estimate(self.resolve(model), profile)

    def max_context(self, model: str | t.CachedModel, profile: t.Profile, free_bytes: int | None = None) -> int:  # 0: none
        free = free_bytes if free_bytes is not None else target_device(self.probe.snapshot(), profile).free_bytes
        return self.sizer.max_context(self.resolve(model), profile, free or 0)

    def recommend(self, model: str | None = None, device_key: str | None = None,
                  snapshot: t.SystemSnapshot | None = None) -> t.Recommendation:  # the guide's table, fitted to model
        snap = snapshot or self.devices()
        return self.sizer.recommend(snap, self.fleet.availabilities(snap),
                                    None if model is None else self.resolve(model), device_key)

    def recommend_in_view(self, device_key: str | None = None, snapshot: t.SystemSnapshot | None = None) -> t.Recommendation:
        """:meth:`recommend` for ``model_in_view()`` (one profile everywhere); the table's when it cannot be read."""
        try:
            return self.recommend(self.model_in_view(), device_key, snapshot)
        except Exception:  # noqa: BLE001
            return self.recommend(None, device_key, snapshot)

    def plan(self, backend_id: str, model: str | t.CachedModel, profile: t.Profile | None = None, *,
             purpose: str = "switch", free_holders: bool = False) -> Plan:
        """A dry run (Planner.plan); ``free_holders`` adds the opt-in step asking another holder to unload."""
        return self.planner.plan(str(backend_id), self.resolve(model), profile, purpose, free_holders=free_holders)

    def plans(self, backend_id: str, models: list[t.CachedModel] | tuple[t.CachedModel, ...],
              profile: t.Profile) -> dict[str, Plan | None]:
        return self.planner.plans(str(backend_id), models, profile)

    def holders(self, snapshot: t.SystemSnapshot | None = None) -> list:  # holders.MemoryHolder per GPU process
        return self.census.holders(snapshot)

    def holder_source(self, source_id: str) -> HolderSource | None:  # another holder a backend hands over, or None
        return self.census.source(source_id)

    def export(self, fmt: str, model: str | t.CachedModel, *, gpu_bytes: int | None = None, gpus: int = 1,
               context: int | None = None, batch: int | None = None, accelerator: str | None = None,
               max_replicas: int = 2):  # a document for a cluster engine (clusterfit.py)
        return clusterfit.export(self.fleet, self.probe.snapshot, fmt, self.resolve(model), gpu_bytes=gpu_bytes, gpus=gpus,
                                 context=context, batch=batch, accelerator=accelerator, max_replicas=max_replicas)

    def status(self) -> dict:  # devices, recommendation, backends' availability, what runs: JSON-ready
        snap = self.devices()
        return status_data(snap, self.recommend_in_view(snapshot=snap), self.fleet.availabilities(snap),
                           self.deployments(), self.holders(snap) if snap.gpus else [], self.level,
                           self.census.sources(), {"write_errors": self.log_write_errors(), "warnings": self.log_warnings},
                           self.model_in_view())

    def apply(self, plan_or_backend: Plan | str, model: str | t.CachedModel | None = None,
              profile: t.Profile | None = None, force: bool = False, progress: t.ProgressCallback | None = None,
              cancel_generation: bool = False) -> t.OperationRecord:
        """Run a plan's steps (Executor.run); ``apply(backend_id, model, profile)`` plans first."""
        op = self.submit_apply(plan_or_backend, model, profile, force=force, cancel_generation=cancel_generation)
        return self.runner.run_existing(op, progress)

    def submit_apply(self, plan_or_backend: Plan | str, model: str | t.CachedModel | None = None,
                     profile: t.Profile | None = None, *, force: bool = False, cancel_generation: bool = False):
        plan = plan_or_backend if isinstance(plan_or_backend, Plan) else None
        if plan is None and model is None:
            raise ModelLoadError("no model chosen", "choose a model from the cached models", code="no_model")
        backend_id = plan.backend_id if plan else str(plan_or_backend)
        model_id = plan.model_id if plan else self.resolve(model).model_id  # type: ignore[arg-type]

        self.services.ledger.resume()  # the user loads a model: on-demand loading is no longer paused

        def body(ctx):
            p = plan or self.plan(backend_id, model_id, profile)
            return self.services.executor.run(ctx, p, force=force, cancel_generation=cancel_generation)

        return self.runner.submit("apply", f"{backend_id} → {model_id}", body,
                                  {"backend": backend_id, "model": model_id, "force": force})

    def unload(self, model: str, *, progress: t.ProgressCallback | None = None) -> ReleaseReport:  # by id/handle/name
        return self.runner.run_existing(self.submit_unload(model), progress)

    def submit_unload(self, model: str):
        dep: Deployment | None = self.find_deployment(model)
        if dep is None:
            raise ModelNotFoundError(f"{model} is not loaded", "see the list of what runs", code="not_loaded",
                                     args={"model": model})
        return self.runner.submit("unload", dep.model_id, lambda ctx: self.services.maintenance.run_unload(ctx, dep),
                                  {"model": dep.model_id, "backend": dep.backend_id, "handle": dep.handle})

    def clear_memory(self, *, progress: t.ProgressCallback | None = None) -> ClearReport:  # gc, backends' caches
        return self.runner.run_existing(self.submit_clear(), progress)

    def submit_clear(self):
        return self.runner.submit("clear_memory", "clear caches", self.services.maintenance.run_clear, {})

    def emergency_clear(self, *, progress: t.ProgressCallback | None = None) -> EmergencyReport:  # stop all, clear
        return self.runner.run_existing(self.submit_emergency(), progress)

    def submit_emergency(self):
        running = self.runner.holder()
        cut = self.cancel_generation(None, "emergency_clear")
        return self.runner.submit("emergency_clear", "emergency clear",
                                  lambda ctx: self.services.maintenance.run_emergency(ctx, running, cut),
                                  {"cancelled": running.kind if running else None, "streams_cut": cut})


_shared: list[MemoryController] = []
_shared_lock = threading.Lock()


def shared_controller() -> MemoryController:
    """The one controller of this process (not only in ``st.cache_resource``: "Clear cache" would orphan models)."""
    with _shared_lock:
        _shared[:] = _shared or [MemoryController()]
        return _shared[0]


def reset_shared_controller() -> None:
    with _shared_lock:
        _shared.clear()
