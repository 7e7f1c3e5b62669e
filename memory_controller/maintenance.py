"""Bodies of the maintenance operations: unload one deployment, clear caches, emergency clear."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .backend import Backend, Deployment, ReleaseReport
from .errors import MemctlError
from .holders import after_emergency, remaining_by_device
from .reports import ClearReport, EmergencyReport
from .runner import Operation, call_with_deadline
from .types import Message, Outcome, StepRecord, msg
from .units import fmt_bytes

if TYPE_CHECKING:
    from .fleet import Fleet
    from .holders import HolderSource
    from .holding import HolderCensus
    from .runner import OperationContext
    from .serving import ServingState
    from .settings import Settings


class Maintenance:
    """Unload one deployment, clear caches, the emergency clear. ``used_by_device()``: used bytes per device.
    The emergency clear also asks each other holder whose ``unloads_in_emergency`` is set to unload everything."""

    def __init__(self, settings: Settings, probe: Any, fleet: Fleet, census: HolderCensus, ledger: ServingState,
                 stop_deadline: Callable[[Backend], float], used_by_device: Callable[[], dict[str, int | None]]) -> None:
        self.settings, self.probe, self.fleet, self.census, self.ledger = settings, probe, fleet, census, ledger
        self.stop_deadline, self.used_by_device = stop_deadline, used_by_device

    def run_unload(self, ctx: OperationContext, dep: Deployment) -> ReleaseReport:
        self.ledger.cancel({(dep.backend_id, dep.handle)}, "unload", frozenset({dep.model_id}))
        t0 = time.perf_counter()
        backend = self.fleet.backend(dep.backend_id)
        report: ReleaseReport = ctx.call(lambda _p: backend.stop(dep.handle), what=f"unloading {dep.model_id}",
                                         deadline_s=self.stop_deadline(backend))
        ctx.record.steps.append(StepRecord("unload", report.verdict, time.perf_counter() - t0, report.message.text,
                                           code=report.message.code, args=_scalars(report.message.args)))
        ctx.record.params["release"] = {"expected_bytes": report.expected_bytes, "freed_bytes": report.freed_bytes,
                                        "measure": report.measure}
        return report

    def clear_caches(self) -> dict[str, object]:
        gc.unfreeze()  # the user's clear sweeps everything, objects a backend froze too (see gc.freeze)
        done: dict[str, object] = {"gc_collect": gc.collect() >= 0}
        done.update(self.fleet.clear_caches())
        return done

    def run_clear(self, ctx: OperationContext) -> ClearReport:
        before = self.used_by_device()
        t0 = time.perf_counter()
        actions = ctx.call(lambda _p: self.clear_caches(), what="clear", deadline_s=self.settings.step_timeout_s)
        report = ClearReport(before=before, after=self.used_by_device(), actions=actions)
        freed = {k: v for k, v in report.freed.items() if v}
        ctx.record.steps.append(StepRecord(
            "clear", Outcome.SUCCESS, time.perf_counter() - t0,
            ", ".join(f"{k}: {fmt_bytes(v)}" for k, v in freed.items()) or "no change in used memory"))
        return report

    def run_emergency(self, ctx: OperationContext, running: Operation | None,
                      streams_cut: int = 0) -> EmergencyReport:
        """Every step is attempted even when an earlier one fails; each has its own deadline. Each step
        says what it did as a code with its arguments (the models it unloaded by name, the operation and
        the response streams it cut, another holder's models or that it did not answer), never a bare "done"."""
        steps = ctx.record.steps

        def attempt(name: str, fn: Callable[[], Message], deadline_s: float) -> None:
            t0 = time.perf_counter()
            ctx.emit(name, f"{name}…", 0.0)
            try:
                said = call_with_deadline(lambda _p: fn(), what=name, deadline_s=deadline_s)
                steps.append(StepRecord(name, Outcome.SUCCESS, time.perf_counter() - t0, said.text, code=said.code,
                                        args=_scalars(said.args)))
            except BaseException as exc:  # noqa: BLE001 - the next step must run anyway
                steps.append(StepRecord(name, Outcome.ERROR, time.perf_counter() - t0, str(exc),
                                        code=f"err.{getattr(exc, 'code', 'error')}",
                                        args=_scalars(getattr(exc, "args_", {}))))
            ctx.emit(name, steps[-1].message, 1.0, steps[-1].duration_s)

        def wait_running() -> Message:
            if running is None:
                if streams_cut:
                    return msg("emergency.cut_streams",
                               f"no operation was running; {streams_cut} response stream(s) cut", streams=streams_cut)
                return msg("emergency.nothing_running", "no operation and no response stream was running")
            running.cancel.set()
            if not running.wait(30):
                raise MemctlError(f"{running.kind} is still finishing", "its result is discarded when it returns")
            return msg("emergency.op_stopped", f"{running.kind} stopped; {streams_cut} response stream(s) cut",
                       op=running.kind, streams=streams_cut)

        attempt("cancel", wait_running, 35)
        snap = self.probe.snapshot()
        for bid, backend in self.fleet.backends().items():
            def stop_all(b=backend, bid=bid) -> Message:
                avail = b.availability(snap)
                if not avail.ok:
                    reason = avail.reason.text if avail.reason else "unavailable"
                    if b.capabilities.needs_gpu and not snap.has_gpu:
                        return msg("emergency.no_gpu_backend", f"no GPU: nothing of {bid} can run ({reason})",
                                   backend=bid)
                    if avail.reason is not None and avail.reason.code == "backend.not_running":
                        # its server is down: no model of it is loaded
                        return msg("emergency.backend_not_running", f"nothing of {bid} runs ({reason})", backend=bid)
                    raise MemctlError(f"{bid} cannot be reached ({reason}): what it may run was not stopped",
                                      "check it by hand", code="emergency.backend_unreachable",
                                      args={"backend": bid, "reason": reason})
                reports, names, failed = [], [], []
                for d in b.list_managed():  # straight from an outside engine: nothing missed
                    try:
                        r = b.stop(d.handle)
                        reports.append(f"{d.model_id}: freed {fmt_bytes(r.freed_bytes)}")
                        names.append(f"{d.model_id} ({fmt_bytes(r.freed_bytes)})")
                    except MemctlError as exc:
                        failed.append(f"{d.model_id}: {exc.message}")
                if failed:
                    raise MemctlError("; ".join(failed), "check it by hand")
                if not reports:
                    return msg("emergency.nothing_loaded", "nothing was running")
                return msg("emergency.stopped", "; ".join(reports), models=", ".join(names))

            attempt(f"stop_{bid}", stop_all, self.stop_deadline(backend) + 30)
        for source in self.census.sources():
            if source.unloads_in_emergency:
                attempt(f"unload_{source.source}", lambda src=source: self._unload_holder(src), 60)

        def clear() -> Message:
            done = ", ".join(k for k, v in self.clear_caches().items() if v)
            return msg("emergency.cleared", done or "caches cleared", what=done)

        attempt("clear", clear, self.settings.step_timeout_s)
        errors = [s for s in steps if s.outcome is Outcome.ERROR]
        remaining, verdict = [], None
        try:
            after = self.probe.snapshot()
            if after.gpus:
                remaining = remaining_by_device(after, self.census.holders(after))
                still, verdict = after_emergency(remaining)
                if still is Outcome.WARNING:
                    errors.append(StepRecord("still_held", Outcome.WARNING, 0.0, verdict.text, code=verdict.code,
                                             args=_scalars(verdict.args)))
                    steps.append(errors[-1])
        except Exception:  # noqa: BLE001 - naming holders is best effort; the steps above are the report
            pass
        ctx.record.outcome = Outcome.WARNING if errors else Outcome.SUCCESS
        ctx.record.error = "; ".join(f"{s.name}: {s.message}" for s in errors) or None
        return EmergencyReport(steps=list(steps), outcome=ctx.record.outcome,
                               cancelled_operation=running.kind if running else None, remaining=remaining,
                               verdict=verdict)


    @staticmethod
    def _unload_holder(source: HolderSource) -> Message:
        """The emergency clear's line for another holder that asks for it: the models it unloaded by name,
        that none was loaded, or that it did not answer (so nothing was asked)."""
        sid, label, url = source.source, source.label, source.base_url
        loaded = source.loaded(max_age_s=0)
        if loaded is None:
            return msg(f"emergency.{sid}_silent", f"{label} did not answer at {url}: none of its models was unloaded",
                       url=url)
        if not loaded:
            return msg(f"emergency.{sid}_empty", f"{label} at {url} had no model loaded", url=url)
        summary = source.emergency_unload(10.0)
        return msg(f"emergency.{sid}_unloaded", summary, models=", ".join(m.name for m in loaded))


def _scalars(args: object) -> dict[str, object]:
    """Message arguments a log line can carry (strings, numbers, booleans)."""
    if not isinstance(args, dict):
        return {}
    return {k: v for k, v in args.items() if isinstance(k, str) and isinstance(v, (str, int, float, bool))}
