"""``ControllerAPI``: the one surface every entry point (dashboard, diagnostic page, CLI) calls.

Two implementations: :class:`InProcessController` (this process's controller) and the owner's
client (``server.client.RemoteController``, over the control API). The control routes are checked
against :data:`ROUTED_CALLS` (``tests/test_controller_api.py`` fails when the Protocol, the routes
and the client drift apart). ``server.connect.controller_for(settings)`` picks the implementation.

State-changing calls come in two forms: ``submit_*`` returns an operation id at once (the dashboard
then polls :meth:`ControllerAPI.operation` / :meth:`ControllerAPI.operations`, which give
:class:`OperationView` values, the same in both implementations), and the blocking ``apply``,
``unload``, ``clear_memory``, ``emergency_clear`` (the CLI and scripts).

This module imports no controller: the in-process adapter takes the facade as it is given.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from .backend import Availability, Capabilities, Deployment, ReleaseReport
    from .clusterfit import ExportResult
    from .holders import HolderSource, MemoryHolder
    from .planning import Plan
    from .reports import ClearReport, EmergencyReport
    from .runner import Operation
    from .settings import Settings
    from .types import (
        CachedModel,
        CatalogResult,
        DeviceSnapshot,
        Level,
        OperationRecord,
        Profile,
        ProgressCallback,
        ProgressEvent,
        Recommendation,
        SystemSnapshot,
    )

MemorySample = tuple[float, dict[str, tuple[int | None, int | None]]]

# Members every implementation answers in its own process (not routed): its settings, the memory level
# of a device by those settings, another holder's client (it is its own server), closing the connection.
LOCAL_CALLS = frozenset({"settings", "level", "holder_source", "close"})


@dataclass(frozen=True)
class OperationView:
    """One operation as every process sees it: what it is, its progress, and how it ended.

    ``result`` is the operation's value (``OperationRecord`` for an apply, ``ReleaseReport``,
    ``ClearReport``, ``EmergencyReport``); ``error`` the ``MemctlError`` it ended with.
    """

    op_id: str
    kind: str
    title: str
    params: dict[str, Any]
    started_at: float
    record: OperationRecord
    running: bool
    ended_at: float | None = None
    events: tuple[ProgressEvent, ...] = ()
    result: Any = None
    error: BaseException | None = field(default=None, compare=False)

    @property
    def elapsed_s(self) -> float:
        return (self.ended_at or time.time()) - self.started_at

    @property
    def last_event(self) -> ProgressEvent | None:
        return self.events[-1] if self.events else None


def operation_view(op: Operation) -> OperationView:
    """A runner Operation as an immutable view (taken at one moment)."""
    running = op.running
    return OperationView(op_id=op.op_id, kind=op.kind, title=op.title, params=dict(op.params),
                         started_at=op.started_at, record=op.record, running=running, ended_at=op.ended_at,
                         events=tuple(op.events()), result=None if running else op.result,
                         error=None if running else op.error)


@runtime_checkable
class ControllerAPI(Protocol):
    """What the UI and the CLI may call on a controller, wherever it runs."""

    settings: Settings

    # ------------------------------------------------------------------ read calls
    def devices(self) -> SystemSnapshot: ...
    def memory_history(self) -> list[MemorySample]: ...
    def models(self, refresh: bool = False) -> CatalogResult: ...
    def resolve(self, model: str | CachedModel) -> CachedModel: ...
    def deployments(self, fresh: bool = False) -> list[Deployment]: ...
    def backend_ids(self) -> list[str]: ...
    def availability(self, backend_id: str, snapshot: SystemSnapshot | None = None) -> Availability: ...
    def capabilities(self, backend_id: str) -> Capabilities: ...
    def recommend(self, model: str | CachedModel | None = None, device_key: str | None = None,
                  snapshot: SystemSnapshot | None = None) -> Recommendation: ...
    def recommend_in_view(self, device_key: str | None = None,
                          snapshot: SystemSnapshot | None = None) -> Recommendation: ...
    def max_context(self, model: str | CachedModel, profile: Profile, free_bytes: int | None = None) -> int: ...
    def plan(self, backend_id: str, model: str | CachedModel, profile: Profile | None = None, *,
             purpose: str = "switch", free_holders: bool = False) -> Plan: ...
    def plans(self, backend_id: str, models: Sequence[str | CachedModel],
              profile: Profile) -> dict[str, Plan | None]: ...
    def export_formats(self) -> tuple[str, ...]: ...
    def export(self, fmt: str, model: str | CachedModel, *, gpu_bytes: int | None = None, gpus: int = 1,
               context: int | None = None, batch: int | None = None, accelerator: str | None = None,
               max_replicas: int = 2) -> ExportResult: ...
    def holders(self, snapshot: SystemSnapshot | None = None) -> list[MemoryHolder]: ...
    def history(self, limit: int = 50) -> list[OperationRecord]: ...
    def log_write_errors(self) -> list[str]: ...
    def log_warnings(self) -> list[str]: ...
    def acknowledge_log_errors(self) -> None: ...
    def status(self) -> dict: ...
    def serving_backend_id(self) -> str: ...
    def in_flight(self) -> dict[str, int]: ...
    def serve_status(self) -> dict[str, dict]: ...
    def serving_pause(self) -> dict | None: ...
    def resume_serving(self) -> bool: ...
    def current_operation(self) -> dict | None: ...

    # ------------------------------------------------------------------ operations
    def submit_apply(self, plan_or_backend: Plan | str, model: str | CachedModel | None = None,
                     profile: Profile | None = None, *, force: bool = False,
                     cancel_generation: bool = False) -> str: ...
    def submit_unload(self, model: str) -> str: ...
    def submit_clear(self) -> str: ...
    def submit_emergency(self) -> str: ...
    def operation(self, op_id: str) -> OperationView | None: ...
    def operations(self, limit: int = 5) -> list[OperationView]: ...
    def apply(self, plan_or_backend: Plan | str, model: str | CachedModel | None = None,
              profile: Profile | None = None, force: bool = False, progress: ProgressCallback | None = None,
              cancel_generation: bool = False) -> OperationRecord: ...
    def unload(self, model: str, *, progress: ProgressCallback | None = None) -> ReleaseReport: ...
    def clear_memory(self, *, progress: ProgressCallback | None = None) -> ClearReport: ...
    def emergency_clear(self, *, progress: ProgressCallback | None = None) -> EmergencyReport: ...

    # ------------------------------------------------------------------ answered in this process
    def level(self, device: DeviceSnapshot) -> Level: ...
    def holder_source(self, source_id: str) -> HolderSource | None: ...
    def close(self) -> None: ...


def api_calls() -> list[str]:
    """Every call of the Protocol (methods only), in declaration order."""
    return [name for name, value in vars(ControllerAPI).items()
            if callable(value) and not name.startswith("_")]


ROUTED_CALLS: tuple[str, ...] = tuple(n for n in api_calls() if n not in LOCAL_CALLS)


class InProcessController:
    """:class:`ControllerAPI` over this process's ``MemoryController`` (``ctl``): same answers, operation
    ids instead of runner objects. ``ctl`` stays reachable as ``.local`` for the server it may run."""

    def __init__(self, ctl: Any) -> None:
        self.local = ctl
        self.settings = ctl.settings

    def __repr__(self) -> str:
        return f"InProcessController({self.local!r})"

    # ------------------------------------------------------------------ read calls
    def devices(self) -> SystemSnapshot:
        return self.local.devices()

    def memory_history(self) -> list[MemorySample]:
        return self.local.memory_history()

    def models(self, refresh: bool = False) -> CatalogResult:
        return self.local.models(refresh=refresh)

    def resolve(self, model: str | CachedModel) -> CachedModel:
        return self.local.resolve(model)

    def deployments(self, fresh: bool = False) -> list[Deployment]:
        return self.local.deployments(fresh=fresh)

    def backend_ids(self) -> list[str]:
        return list(self.local.backends())

    def availability(self, backend_id: str, snapshot: SystemSnapshot | None = None) -> Availability:
        return self.local.availability(backend_id, snapshot)

    def capabilities(self, backend_id: str) -> Capabilities:
        return self.local.backend(backend_id).capabilities

    def recommend(self, model: str | CachedModel | None = None, device_key: str | None = None,
                  snapshot: SystemSnapshot | None = None) -> Recommendation:
        return self.local.recommend(model=model, device_key=device_key, snapshot=snapshot)

    def recommend_in_view(self, device_key: str | None = None,
                          snapshot: SystemSnapshot | None = None) -> Recommendation:
        return self.local.recommend_in_view(device_key=device_key, snapshot=snapshot)

    def max_context(self, model: str | CachedModel, profile: Profile, free_bytes: int | None = None) -> int:
        return self.local.max_context(model, profile, free_bytes=free_bytes)

    def plan(self, backend_id: str, model: str | CachedModel, profile: Profile | None = None, *,
             purpose: str = "switch", free_holders: bool = False) -> Plan:
        return self.local.plan(backend_id, model, profile, purpose=purpose, free_holders=free_holders)

    def plans(self, backend_id: str, models: Sequence[str | CachedModel],
              profile: Profile) -> dict[str, Plan | None]:
        resolved = [self.local.resolve(m) for m in models]
        return self.local.plans(backend_id, resolved, profile)

    def export_formats(self) -> tuple[str, ...]:
        return tuple(self.local.export_formats())

    def export(self, fmt: str, model: str | CachedModel, *, gpu_bytes: int | None = None, gpus: int = 1,
               context: int | None = None, batch: int | None = None, accelerator: str | None = None,
               max_replicas: int = 2) -> ExportResult:
        return self.local.export(fmt, model, gpu_bytes=gpu_bytes, gpus=gpus, context=context, batch=batch,
                                 accelerator=accelerator, max_replicas=max_replicas)

    def holders(self, snapshot: SystemSnapshot | None = None) -> list[MemoryHolder]:
        return self.local.holders(snapshot)

    def history(self, limit: int = 50) -> list[OperationRecord]:
        return self.local.history(limit)

    def log_write_errors(self) -> list[str]:
        return list(self.local.log_write_errors())

    def log_warnings(self) -> list[str]:
        return list(self.local.log_warnings)

    def acknowledge_log_errors(self) -> None:
        self.local.acknowledge_log_errors()

    def status(self) -> dict:
        return self.local.status()

    def serving_backend_id(self) -> str:
        return self.local.serving_backend_id()

    def in_flight(self) -> dict[str, int]:
        return dict(self.local.in_flight())

    def serve_status(self) -> dict[str, dict]:
        return {}  # this process serves nothing by itself; the owner's server answers its own

    def serving_pause(self) -> dict | None:
        """The on-demand pause (after an emergency clear or an unload), or None."""
        return self.local.serving_pause()

    def resume_serving(self) -> bool:
        """Lift the on-demand pause; True when there was one."""
        return bool(self.local.resume_serving())

    def current_operation(self) -> dict | None:
        return self.local.current_operation()

    # ------------------------------------------------------------------ operations
    def submit_apply(self, plan_or_backend: Plan | str, model: str | CachedModel | None = None,
                     profile: Profile | None = None, *, force: bool = False,
                     cancel_generation: bool = False) -> str:
        return self.local.submit_apply(plan_or_backend, model, profile, force=force,
                                       cancel_generation=cancel_generation).op_id

    def submit_unload(self, model: str) -> str:
        return self.local.submit_unload(model).op_id

    def submit_clear(self) -> str:
        return self.local.submit_clear().op_id

    def submit_emergency(self) -> str:
        return self.local.submit_emergency().op_id

    def operation(self, op_id: str) -> OperationView | None:
        op = self.local.runner.get(op_id)
        return None if op is None else operation_view(op)

    def operations(self, limit: int = 5) -> list[OperationView]:
        runner = self.local.runner
        return [operation_view(op) for op in (*runner.running(), *runner.finished(max(0, limit)))]

    def apply(self, plan_or_backend: Plan | str, model: str | CachedModel | None = None,
              profile: Profile | None = None, force: bool = False, progress: ProgressCallback | None = None,
              cancel_generation: bool = False) -> OperationRecord:
        return self.local.apply(plan_or_backend, model, profile, force=force, progress=progress,
                                cancel_generation=cancel_generation)

    def unload(self, model: str, *, progress: ProgressCallback | None = None) -> ReleaseReport:
        return self.local.unload(model, progress=progress)

    def clear_memory(self, *, progress: ProgressCallback | None = None) -> ClearReport:
        return self.local.clear_memory(progress=progress)

    def emergency_clear(self, *, progress: ProgressCallback | None = None) -> EmergencyReport:
        return self.local.emergency_clear(progress=progress)

    # ------------------------------------------------------------------ answered in this process
    def level(self, device: DeviceSnapshot) -> Level:
        return self.local.level(device)

    def holder_source(self, source_id: str) -> HolderSource | None:
        return self.local.holder_source(source_id)

    def close(self) -> None:
        """Nothing to close: the controller lives as long as this process."""
