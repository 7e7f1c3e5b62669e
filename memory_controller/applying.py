"""The executor: runs a plan's steps (typed values, memory_controller/planning.py) one by one, with rollback.

Each step is recorded (duration, memory before/after on the plan's device) and reported as progress.
Clean-up after a failure acts only on what this very operation started (the handle its own start
returned), never on something found by name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import planning
from .backend import Backend, Claim, Deployment, DeploymentState, describe_memory
from .errors import (
    ContainerError,
    DockerUnavailableError,
    MemctlError,
    ModelLoadError,
    OperationBusyError,
    OperationCancelledError,
    OperationTimeoutError,
)
from .planning import (
    Check,
    Clear,
    FreeHolder,
    Plan,
    PlanStep,
    Start,
    Switch,
    Unload,
    Verify,
    not_fit_error,
    step_name,
)
from .types import CachedModel, Outcome, StepRecord, to_jsonable
from .units import fmt_bytes

if TYPE_CHECKING:
    from .catalog import Catalog
    from .fleet import Fleet
    from .holding import HolderCensus
    from .planner import Planner
    from .runner import OperationContext
    from .serving import ServingState
    from .settings import Settings


class _Recorder:
    """Times one step, records memory before/after on the plan's device, reports progress, runs the hook."""

    def __init__(self, probe: Any, ctx: OperationContext, name: str, device_key: str | None,
                 hook: Callable[[str], None] | None):
        self.probe, self.ctx, self.name, self.device_key, self.hook = probe, ctx, name, device_key, hook
        self.message, self.outcome, self._failed = "", Outcome.SUCCESS, False
        self.code, self.args = "", {}

    def _used(self) -> int | None:
        if self.device_key is None:
            return None
        dev = self.probe.snapshot().device(self.device_key)
        return dev.used_bytes if dev else None

    def say(self, code: str, text: str, **args: object) -> None:
        """The step's result as a code the UI translates, with the English text beside it."""
        self.code, self.args, self.message = code, dict(args), text

    def warn(self, message: str) -> None:
        self.outcome, self.message = Outcome.WARNING, message

    def fail(self, message: str) -> None:
        self.outcome, self.message, self._failed = Outcome.ERROR, message, True

    def __enter__(self) -> _Recorder:
        self.t0 = time.perf_counter()
        self.before = self._used()
        self.ctx.emit(self.name, f"{self.name}…", 0.0)
        if self.hook is not None:
            try:
                self.hook(self.name)
            except BaseException as exc:
                self.__exit__(type(exc), exc, None)
                raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not self._failed:
            self.outcome, self.message = Outcome.ERROR, str(exc)
        dur = time.perf_counter() - self.t0
        self.ctx.record.steps.append(StepRecord(self.name, self.outcome, dur, self.message, self.before, self._used(),
                                                self.code, self.args))
        self.ctx.emit(self.name, self.message or self.name, 1.0, dur)


@dataclass
class _Run:
    """One apply's own state: what it started (the only thing its clean-up touches)."""

    plan: Plan
    cached: CachedModel  # resolved before anything is touched
    force: bool
    cancel_generation: bool
    mine: list[Deployment] = field(default_factory=list)
    started: Deployment | None = None
    prepare_started: bool = False


def _raise_blocker(plan: Plan) -> None:
    b = plan.blockers[0]
    if b.code in ("backend.no_gpu", "backend.docker_unavailable", "backend.unavailable"):
        raise DockerUnavailableError(b.text, "use another backend, or start its engine / check the GPU driver",
                                     code=b.code, args=dict(b.args))
    raise ModelLoadError(b.text, "change the profile and apply again", code=b.code, args=dict(b.args))


class Executor:
    """Interprets plans. ``step_hook`` (settable) is called with each step's name as it starts (fault
    injection in tests and the diagnostic page); an exception it raises fails that step."""

    def __init__(self, settings: Settings, probe: Any, fleet: Fleet, catalog: Catalog, planner: Planner,
                 census: HolderCensus, ledger: ServingState) -> None:
        self.settings, self.probe, self.fleet, self.catalog = settings, probe, fleet, catalog
        self.planner, self.census, self.ledger = planner, census, ledger
        self.step_hook: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ deadlines
    def start_deadline(self, backend: Backend) -> float:
        """A backend that waits on an engine of its own says how long a start takes; else operation_timeout_s."""
        own = backend.start_timeout_s
        return float(own) if isinstance(own, (int, float)) and own > 0 else self.settings.operation_timeout_s

    def stop_deadline(self, backend: Backend) -> float:
        return self.settings.step_timeout_s + backend.stop_timeout_s * 4

    # ------------------------------------------------------------------ the plan
    def run(self, ctx: OperationContext, plan: Plan, *, force: bool, cancel_generation: bool) -> object:
        record = ctx.record
        record.params.update({"profile": to_jsonable(plan.profile), "device": plan.device_key,
                              "needed_bytes": plan.needed_bytes, "backend": plan.backend_id})
        planning.check_still_holds(plan, self.probe.snapshot(), self.fleet.deployments())
        if plan.already_active:
            text = f"{plan.model_id} is already active with this profile: nothing to do"
            record.steps.append(StepRecord("noop", Outcome.SUCCESS, 0.0, text, code="step.noop",
                                           args={"model": plan.model_id}))
            ctx.emit("noop", text)
            return record
        if plan.blockers:
            _raise_blocker(plan)
        if not plan.fits and not force:
            raise not_fit_error(plan)
        run = _Run(plan, self.catalog.resolve(plan.model_id), force, cancel_generation)
        previous = [d for d in plan.to_stop if d.profile is not None and d.state is not DeploymentState.FAILED]
        try:
            for step in plan.steps:
                if isinstance(step, Start):
                    run.prepare_started = True
                with _Recorder(self.probe, ctx, step_name(step), plan.device_key, self.step_hook) as st:
                    self._step(step, st, ctx, run)
                if not isinstance(step, (Switch, Verify)):
                    ctx.check_cancel()
        except BaseException as exc:
            self._rollback(ctx, plan, exc, run.mine, previous, run.prepare_started)
            if isinstance(exc, MemctlError) or not isinstance(exc, Exception):
                raise
            failed = record.steps[-2].name if len(record.steps) >= 2 else "apply"
            raise ModelLoadError(f"{plan.model_id}: step {failed!r} failed: {exc}",
                                 "see the details; clear memory or try a smaller profile",
                                 details=repr(exc), code="step_failed", args={"step": failed}) from exc
        return record

    def _step(self, step: PlanStep, st: _Recorder, ctx: OperationContext, run: _Run) -> None:
        plan = run.plan
        match step:
            case Unload(targets=targets):
                parts = self.stop_deployments(ctx, targets, cancel_generation=run.cancel_generation)
                if parts:
                    st.say("step.unload", "; ".join(parts), models=", ".join(d.model_id for d in targets))
                else:
                    st.say("step.unload_nothing", "nothing was loaded")
            case FreeHolder():
                st.message = self._free_holder(ctx, step)
            case Clear():
                done = self.fleet.clear_caches()
                st.say("step.clear", ", ".join(k for k, v in done.items() if v) or "nothing to clear")
            case Check(bytes_by_device=needed):
                self._check(st, plan, needed, run.force)
            case Switch():
                before = sorted({d.backend_id for d in plan.to_stop})
                st.say("step.switch", f"backend: {', '.join(before) or '—'} → {plan.backend_id}",
                       before=", ".join(before) or "—", after=plan.backend_id)
            case Start():
                dep = self._start(ctx, plan, run.cached, step.claim)
                run.mine.append(dep)
                run.started = dep
                where = f" at {dep.endpoint}" if dep.endpoint else ""
                on = dep.device or plan.device_key
                if dep.mapped_bytes:  # a memory-mapped model: its resident weight-file pages and its private bytes
                    st.say("step.prepare_mapped", f"{dep.model_id} ready on {on}{where}: "
                           f"{describe_memory(dep.memory_bytes, dep.mapped_bytes)}", model=dep.model_id, device=on,
                           bytes=dep.footprint_bytes, mapped_bytes=dep.mapped_bytes, endpoint=dep.endpoint or "")
                else:
                    st.say("step.prepare", f"{dep.model_id} ready on {on}{where}, {fmt_bytes(dep.footprint_bytes)}",
                           model=dep.model_id, device=on, bytes=dep.footprint_bytes, endpoint=dep.endpoint or "")
                ctx.record.params["deployment"] = {"backend": dep.backend_id, "handle": dep.handle, "name": dep.name,
                                                   "endpoint": dep.endpoint}
            case Verify():
                dep = run.started
                if dep is None:
                    raise ModelLoadError("nothing was started to verify", "apply the plan again", code="step_failed")
                backend = self.fleet.backend(dep.backend_id)
                detail = ctx.call(lambda _p: backend.verify(dep), what="verify",
                                  deadline_s=self.settings.step_timeout_s)
                st.say("step.verify", detail, model=dep.model_id)

    def _check(self, st: _Recorder, plan: Plan, needed: Any, force: bool) -> None:
        snap = self.probe.snapshot()
        short = []
        for key, need in needed.items():
            dev = snap.device(key)
            free = None if dev is None else dev.free_bytes
            st.message += f"{key}: needs {fmt_bytes(need)}, {fmt_bytes(free)} free; "
            if free is not None and need > free:
                short.append((key, free))
        st.message = st.message.rstrip("; ")
        need = needed.get(plan.device_key, plan.needed_bytes)
        dev = snap.device(plan.device_key)
        st.code, st.args = "step.check", {"device": plan.device_key, "needed_bytes": need,
                                          "free_bytes": dev.free_bytes if dev else None}
        if short:
            if not force:
                err = not_fit_error(plan, free_override=short[0][1])
                st.fail(str(err))
                raise err
            st.warn(st.message + " (forced)")

    def _start(self, ctx: OperationContext, plan: Plan, cached: CachedModel, claim: Claim | None) -> Deployment:
        backend = self.fleet.backend(plan.backend_id)
        claim = claim or plan.claim or Claim({plan.device_key: plan.needed_bytes})
        return ctx.call(lambda p: backend.start(cached, plan.profile, claim, progress=p, cancel=lambda: ctx.cancelled),
                        what=f"starting {plan.model_id}", deadline_s=self.start_deadline(backend),
                        on_late_result=lambda d: backend.stop(d.handle))

    def _free_holder(self, ctx: OperationContext, step: FreeHolder) -> str:
        client = self.census.source(step.source)
        if client is None:
            raise ModelLoadError(f"the {step.source} client is not available",
                                 f"unload the models in {step.source} by hand", code=f"{step.source}.unavailable")
        parts = []
        for name in step.names:
            rep = ctx.call(lambda _p, n=name: client.unload(n), what=f"unloading {name} from {step.source}",
                           deadline_s=self.settings.step_timeout_s)
            parts.append(str(rep.message))  # a failed unload leaves the memory taken: the check after it refuses
        return "; ".join(parts)

    # ------------------------------------------------------------------ stopping
    def stop_deployments(self, ctx: OperationContext, targets: tuple[Deployment, ...] | list[Deployment], *,
                         cancel_generation: bool) -> list[str]:
        """Stop ``targets`` (waiting for, or cancelling, requests generating on them). Returns message parts."""
        handles = {(d.backend_id, d.handle) for d in targets}
        if handles and self.ledger.on(handles):
            if cancel_generation:
                self.ledger.cancel(handles, "switch")
            end = time.monotonic() + self.settings.step_timeout_s
            while self.ledger.on(handles) and time.monotonic() < end:
                ctx.check_cancel()
                time.sleep(0.05)
            if self.ledger.on(handles):
                raise OperationBusyError("requests are still generating on what would be stopped",
                                         "wait for them, or confirm cancelling them", code="busy.generating")
        parts = []
        for d in targets:
            backend = self.fleet.backend(d.backend_id)
            report = ctx.call(lambda _p, b=backend, h=d.handle: b.stop(h), what=f"stopping {d.model_id}",
                              deadline_s=self.stop_deadline(backend))
            if report.verdict is Outcome.ERROR:
                raise ContainerError(f"could not stop {d.model_id}: {report.message.text}",
                                     "use 🚨 emergency clear, or check it by hand", code="stop_failed")
            parts.append(f"{d.model_id}: freed {fmt_bytes(report.freed_bytes)}")
        return parts

    # ------------------------------------------------------------------ failure
    def _rollback(self, ctx: OperationContext, plan: Plan, exc: BaseException, mine: list[Deployment],
                  previous: list[Deployment], prepare_started: bool) -> None:
        with _Recorder(self.probe, ctx, "rollback", plan.device_key, self.step_hook) as st:
            parts = []
            for dep in mine:
                backend = self.fleet.backend(dep.backend_id)
                try:
                    rep = ctx.call(lambda _p, b=backend, d=dep: b.stop(d.handle), what=f"removing {dep.model_id}",
                                   deadline_s=self.stop_deadline(backend), cancellable=False)
                    parts.append(f"stopped {dep.model_id} (freed {fmt_bytes(rep.freed_bytes)})")
                except MemctlError as e:
                    parts.append(f"could not stop {dep.model_id}: {e.message}")
            if prepare_started or mine:
                self.fleet.clear_caches()
            st.message = "; ".join(parts) or ("nothing new was left running" if prepare_started
                                              else "nothing new was loaded")
            cancelled = ctx.cancelled or isinstance(exc, OperationCancelledError)
            timed_out = isinstance(exc, OperationTimeoutError)  # the worker still holds the backend
            if not cancelled and not timed_out and previous and not self.fleet.deployments():
                restored = self._restore(ctx, previous)
                st.message += f"; restored {restored}" if restored else "; the previous model was not restored"
            st.warn(st.message)

    def _restore(self, ctx: OperationContext, previous: list[Deployment]) -> str | None:
        if not self.settings.restore_previous_on_failure:
            return None
        prev = previous[0]
        try:
            cached = self.catalog.resolve(prev.model_id)
            plan = self.planner.plan(prev.backend_id, cached, prev.profile, "switch")
            if not plan.fits or plan.blockers or plan.claim is None:
                return None
            ctx.emit("restore", f"restoring {prev.model_id}")
            backend = self.fleet.backend(prev.backend_id)
            ctx.call(lambda p: backend.start(cached, plan.profile, plan.claim, progress=p),
                     what=f"restoring {prev.model_id}", deadline_s=self.start_deadline(backend),
                     on_late_result=lambda d: backend.stop(d.handle), cancellable=True)
            return prev.model_id
        except BaseException as e:  # noqa: BLE001 - restoring is best effort, reported in the log
            ctx.record.steps.append(StepRecord("restore", Outcome.WARNING, 0.0, f"could not restore {prev.model_id}: {e}"))
            return None


__all__ = ["Executor", "not_fit_error"]
