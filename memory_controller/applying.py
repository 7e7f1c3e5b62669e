"""Making a plan from the live state, and running it: the guide's six steps with rollback.

Each step is recorded (duration, memory before/after on the plan's device) and reported as progress.
Clean-up after a failure acts only on what this very operation started (the handle its own start
returned), never on something found by name.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from . import planning
from .backend import Claim, Deployment, DeploymentState, describe_memory
from .errors import (
    ContainerError,
    DockerUnavailableError,
    InsufficientMemoryError,
    MemctlError,
    ModelLoadError,
    OperationBusyError,
    OperationCancelledError,
    OperationTimeoutError,
)
from .planning import Plan
from .types import CachedModel, Message, Outcome, Precision, Profile, StepRecord, msg, to_jsonable
from .units import fmt_bytes

if TYPE_CHECKING:
    from .controller import MemoryController
    from .runner import OperationContext


# --------------------------------------------------------------------------- plan
def _default_profile(ctl: MemoryController, backend_id: str, cached: CachedModel, running: list[Deployment],
                     snap, purpose: str) -> tuple[Profile, tuple[Message, ...]]:
    mine = next((d for d in running if d.backend_id == backend_id and d.model_id == cached.model_id and d.profile), None)
    if mine is not None and mine.profile is not None:
        return mine.profile, ()
    after = planning.with_freed(snap, running)
    rec = ctl.recommend(cached.model_id, snapshot=after)
    backend = ctl.backend(backend_id)
    profile = rec.profile.with_(mode=backend_id)
    if profile.precision not in backend.capabilities.precisions:
        lower = [p for p in backend.capabilities.fit_ladder if p in backend.capabilities.precisions]
        profile = profile.with_(precision=lower[0] if lower else backend.capabilities.precisions[0])
    notes = tuple(rec.notes)
    if purpose == "ide":
        from . import estimate as est
        from .servesize import ide_profile

        profile = planning.normalise_profile(backend_id, profile, snap, backend.capabilities.devices)
        free = planning.target_device(after, profile).free_bytes or 0
        spec = est.read_model_spec(cached.path)
        sized = ide_profile(profile, model_max_context=spec.max_position_embeddings,
                            ladder=[p for p in backend.capabilities.fit_ladder if p in backend.capabilities.precisions],
                            max_context_for=lambda p: est.max_context_that_fits(cached, free, p, ctl.settings),
                            min_context=ctl.settings.ide_min_context)
        if sized is not None:
            profile, ide_notes = sized
            notes = ide_notes
    return profile, notes


class LiveState:
    """What plans read from the live system, read once: a batch of plans (a verdict per cached model)
    shares one snapshot, one list of deployments and one census of holders."""

    def __init__(self, ctl: MemoryController) -> None:
        self.ctl = ctl
        self.snap = ctl.devices()
        self.running = ctl.deployments()
        self._holders: tuple | None = None

    def holders(self) -> tuple:
        if self._holders is None:
            from . import holding

            self._holders = (holding.holders(self.ctl, self.snap), holding.ollama_models(self.ctl))
        return self._holders


def _backend_for(ctl: MemoryController, cached: CachedModel, backend_id: str) -> str:
    """A model a backend lists itself (``source`` is that backend's id) runs on that backend only; a
    checkpoint asked of a backend that serves only its own models goes to the first other one available."""
    ids = ctl.registry.ids()
    if cached.source in ids:
        return cached.source
    if backend_id in ids and hasattr(ctl.backend(backend_id), "resolve_model"):
        return next((b for b in ids if not hasattr(ctl.backend(b), "resolve_model") and ctl.availability(b).ok),
                    backend_id)
    return backend_id


def make_plan(ctl: MemoryController, backend_id: str, cached: CachedModel, profile: Profile | None,
              purpose: str, unload_ollama: bool = False, *, live: LiveState | None = None,
              with_suggestion: bool = True) -> Plan:
    from . import estimate as est
    from . import safefiles

    backend_id = _backend_for(ctl, cached, backend_id)
    backend = ctl.backend(backend_id)
    # every file of the model: a bounded regular file inside its cache folder, before anything reads one
    # (a model in a backend's own store, addressed by a URL, has no files here: its backend checks them)
    if "://" not in str(cached.path):
        safefiles.check_model_dir(cached.path, safefiles.roots_of(cached.path, cached.source,
                                                                  ctl.settings.resolved_hf_cache_dir))
    live = live or LiveState(ctl)
    snap, running = live.snap, live.running
    notes: tuple[Message, ...] = ()
    if profile is None:
        profile, notes = _default_profile(ctl, backend_id, cached, running, snap, purpose)
    profile = planning.normalise_profile(backend_id, profile, snap, backend.capabilities.devices)
    blockers: list[Message] = []
    avail = backend.availability(snap)
    if not avail.ok:
        blockers.append(avail.reason or msg("backend.unavailable", f"{backend_id} is unavailable", backend=backend_id))
    if profile.precision not in backend.capabilities.precisions:
        ok = ", ".join(p.value for p in backend.capabilities.precisions)
        blockers.append(msg("backend.precision_unsupported",
                            f"{backend_id} cannot serve {profile.precision.value}: choose one of {ok}",
                            backend=backend_id, precision=profile.precision.value, allowed=ok))
    for m in backend.check_model(cached, profile):
        if m.code != "model.no_chat_template" or purpose == "ide":
            blockers.append(m)
    estimate = est.estimate(cached, profile, ctl.settings)
    max_positions = est.read_model_spec(cached.path).max_position_embeddings
    if max_positions and profile.context_tokens > max_positions:
        blockers.append(msg("plan.context_over_model_max",
                            f"context {profile.context_tokens} exceeds the model's maximum {max_positions} tokens: "
                            f"choose {max_positions} or less", tokens=profile.context_tokens, max=max_positions))

    def claim_for(after) -> Claim:
        if blockers and any(b.code.startswith("backend.") for b in blockers):
            return Claim({planning.target_device(after, profile).key: estimate.total_bytes})
        return backend.claim(cached, profile, estimate, after)

    def suggest(free_after: int) -> tuple[int | None, Message | None]:
        if not with_suggestion:
            return None, None
        max_ctx = est.max_context_that_fits(cached, free_after, profile, ctl.settings)
        fitted = ctl._fit(cached, profile, free_after)
        if fitted is None:
            return max_ctx, msg("plan.suggest_smaller_model",
                                "does not fit at any context or quantisation on this device: choose a smaller model")
        p2, _ = fitted
        return max_ctx, msg("plan.suggest_profile",
                            f"would fit with {p2.precision.value}, context {p2.context_tokens} tokens",
                            precision=p2.precision.value, tokens=p2.context_tokens)

    plan = planning.make_plan(backend_id=backend_id, model=cached, profile=profile, snap=snap, running=running,
                              estimate=estimate, claim_for=claim_for, blockers=blockers, notes=notes,
                              purpose=purpose, suggest=suggest)
    if plan.already_active or not plan.device_key.startswith("gpu:"):
        return plan
    from .holders import fit_with_holders

    hs, ollama = live.holders()
    shortfall = plan.needed_bytes - (plan.free_bytes_after_unload or 0)
    fit = fit_with_holders(hs, plan.device_key, shortfall, ollama)
    return planning.with_holders(plan, fit, unload_ollama=unload_ollama)


def not_fit_error(plan: Plan, free_override: int | None = None) -> InsufficientMemoryError:
    free = free_override if free_override is not None else plan.free_bytes_after_unload
    p = plan.profile
    hint = (plan.suggestion.text + "; " if plan.suggestion else "") + \
        "or clear memory, pick a lighter model, or force it at your own risk"
    err = InsufficientMemoryError(
        f"{plan.model_id} needs {fmt_bytes(plan.needed_bytes)} on {plan.device_key} "
        f"({p.precision.value}, context {p.context_tokens}, batch {p.batch}), but only {fmt_bytes(free)} would be free",
        hint, needed_bytes=plan.needed_bytes, free_bytes=free)
    err.code = "insufficient_memory"
    err.args_ = {"model": plan.model_id, "needed_bytes": plan.needed_bytes, "free_bytes": free,
                 "device": plan.device_key, "suggestion": plan.suggestion.text if plan.suggestion else None}
    return err


# --------------------------------------------------------------------------- run
class _Step:
    """Times one step, records memory before/after on the plan's device, reports progress, runs the hook."""

    def __init__(self, ctl: MemoryController, ctx: OperationContext, name: str, device_key: str | None):
        self.ctl, self.ctx, self.name, self.device_key = ctl, ctx, name, device_key
        self.message, self.outcome, self._failed = "", Outcome.SUCCESS, False
        self.code, self.args = "", {}

    def _used(self) -> int | None:
        if self.device_key is None:
            return None
        dev = self.ctl.probe.snapshot().device(self.device_key)
        return dev.used_bytes if dev else None

    def say(self, code: str, text: str, **args: object) -> None:
        """The step's result as a code the UI translates, with the English text beside it."""
        self.code, self.args, self.message = code, dict(args), text

    def warn(self, message: str) -> None:
        self.outcome, self.message = Outcome.WARNING, message

    def fail(self, message: str) -> None:
        self.outcome, self.message, self._failed = Outcome.ERROR, message, True

    def __enter__(self) -> _Step:
        self.t0 = time.perf_counter()
        self.before = self._used()
        self.ctx.emit(self.name, f"{self.name}…", 0.0)
        if self.ctl.step_hook is not None:
            try:
                self.ctl.step_hook(self.name)
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


def _raise_blocker(plan: Plan) -> None:
    b = plan.blockers[0]
    if b.code in ("backend.no_gpu", "backend.docker_unavailable", "backend.unavailable"):
        raise DockerUnavailableError(b.text, "use another backend, or start Docker / check the GPU driver",
                                     code=b.code, args=dict(b.args))
    raise ModelLoadError(b.text, "change the profile and apply again", code=b.code, args=dict(b.args))


def stop_deployments(ctl: MemoryController, ctx: OperationContext, targets, *, cancel_generation: bool) -> list[str]:
    """Stop ``targets`` (waiting for, or cancelling, requests generating on them). Returns message parts."""
    handles = {(d.backend_id, d.handle) for d in targets}
    if handles and ctl.slots_on(handles):
        if cancel_generation:
            ctl.cancel_generation(handles, "switch")
        end = time.monotonic() + ctl.settings.step_timeout_s
        while ctl.slots_on(handles) and time.monotonic() < end:
            ctx.check_cancel()
            time.sleep(0.05)
        if ctl.slots_on(handles):
            raise OperationBusyError("requests are still generating on what would be stopped",
                                     "wait for them, or confirm cancelling them", code="busy.generating")
    parts = []
    for d in targets:
        backend = ctl.backend(d.backend_id)
        report = ctx.call(lambda _p, b=backend, h=d.handle: b.stop(h), what=f"stopping {d.model_id}",
                          deadline_s=ctl.settings.step_timeout_s + ctl.settings.vllm_stop_timeout_s * 4)
        if report.verdict is Outcome.ERROR:
            raise ContainerError(f"could not stop {d.model_id}: {report.message.text}",
                                 "use 🚨 emergency clear, or check it by hand", code="stop_failed")
        parts.append(f"{d.model_id}: freed {fmt_bytes(report.freed_bytes)}")
    return parts


def run_apply(ctl: MemoryController, ctx: OperationContext, plan: Plan, *, force: bool,
              cancel_generation: bool) -> object:
    record = ctx.record
    record.params.update({"profile": to_jsonable(plan.profile), "device": plan.device_key,
                          "needed_bytes": plan.needed_bytes, "backend": plan.backend_id})
    planning.check_still_holds(plan, ctl.probe.snapshot(), ctl.deployments())
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
    backend = ctl.backend(plan.backend_id)
    cached = ctl.resolve(plan.model_id)
    previous = [d for d in plan.to_stop if d.profile is not None and d.state is not DeploymentState.FAILED]
    mine: list[Deployment] = []  # what this operation started: the only thing its clean-up touches
    prepare_started = False
    by_kind = {s.kind: s for s in plan.steps}
    try:
        with _Step(ctl, ctx, "unload", plan.device_key) as st:
            parts = stop_deployments(ctl, ctx, by_kind["unload"].targets, cancel_generation=cancel_generation)
            if parts:
                st.say("step.unload", "; ".join(parts), models=", ".join(d.model_id for d in by_kind["unload"].targets))
            else:
                st.say("step.unload_nothing", "nothing was loaded")
        ctx.check_cancel()
        if "unload_ollama" in by_kind:
            with _Step(ctl, ctx, "unload_ollama", plan.device_key) as st:
                st.message = _unload_ollama(ctl, ctx, by_kind["unload_ollama"].names)
            ctx.check_cancel()
        with _Step(ctl, ctx, "clear", plan.device_key) as st:
            done = {}
            for b in ctl.registry.made().values():
                done.update(b.clear_caches())
            st.say("step.clear", ", ".join(k for k, v in done.items() if v) or "nothing to clear")
        ctx.check_cancel()
        with _Step(ctl, ctx, "check", plan.device_key) as st:
            snap = ctl.probe.snapshot()
            short = []
            for key, need in by_kind["check"].bytes_by_device.items():
                dev = snap.device(key)
                free = None if dev is None else dev.free_bytes
                st.message += f"{key}: needs {fmt_bytes(need)}, {fmt_bytes(free)} free; "
                if free is not None and need > free:
                    short.append((key, free))
            st.message = st.message.rstrip("; ")
            target = by_kind["check"].bytes_by_device
            need = target.get(plan.device_key, plan.needed_bytes)
            dev = snap.device(plan.device_key)
            st.code, st.args = "step.check", {"device": plan.device_key, "needed_bytes": need,
                                              "free_bytes": dev.free_bytes if dev else None}
            if short:
                if not force:
                    err = not_fit_error(plan, free_override=short[0][1])
                    st.fail(str(err))
                    raise err
                st.warn(st.message + " (forced)")
        ctx.check_cancel()
        with _Step(ctl, ctx, "switch", plan.device_key) as st:
            before = sorted({d.backend_id for d in plan.to_stop})
            st.say("step.switch", f"backend: {', '.join(before) or '—'} → {plan.backend_id}",
                   before=", ".join(before) or "—", after=plan.backend_id)
        prepare_started = True
        with _Step(ctl, ctx, "prepare", plan.device_key) as st:
            claim = plan.claim or Claim({plan.device_key: plan.needed_bytes})
            dep = ctx.call(lambda p: backend.start(cached, plan.profile, claim, progress=p, cancel=lambda: ctx.cancelled),
                           what=f"starting {plan.model_id}", deadline_s=_start_deadline(ctl, backend),
                           on_late_result=lambda d: backend.stop(d.handle))
            mine.append(dep)
            where = f" at {dep.endpoint}" if dep.endpoint else ""
            on = dep.device or plan.device_key
            if dep.mapped_bytes:  # a memory-mapped model: its resident weight-file pages and its private bytes
                st.say("step.prepare_mapped", f"{dep.model_id} ready on {on}{where}: "
                       f"{describe_memory(dep.memory_bytes, dep.mapped_bytes)}", model=dep.model_id, device=on,
                       bytes=dep.footprint_bytes, mapped_bytes=dep.mapped_bytes, endpoint=dep.endpoint or "")
            else:
                st.say("step.prepare", f"{dep.model_id} ready on {on}{where}, {fmt_bytes(dep.footprint_bytes)}",
                       model=dep.model_id, device=on, bytes=dep.footprint_bytes, endpoint=dep.endpoint or "")
            record.params["deployment"] = {"backend": dep.backend_id, "handle": dep.handle, "name": dep.name,
                                           "endpoint": dep.endpoint}
        ctx.check_cancel()
        with _Step(ctl, ctx, "verify", plan.device_key) as st:
            detail = ctx.call(lambda _p: backend.verify(dep), what="verify", deadline_s=ctl.settings.step_timeout_s)
            st.say("step.verify", detail, model=dep.model_id)
    except BaseException as exc:
        _rollback(ctl, ctx, plan, exc, mine, previous, prepare_started)
        if isinstance(exc, MemctlError) or not isinstance(exc, Exception):
            raise
        failed = record.steps[-2].name if len(record.steps) >= 2 else "apply"
        raise ModelLoadError(f"{plan.model_id}: step {failed!r} failed: {exc}",
                             "see the details; clear memory or try a smaller profile",
                             details=repr(exc), code="step_failed", args={"step": failed}) from exc
    return record


def _unload_ollama(ctl: MemoryController, ctx: OperationContext, names: tuple[str, ...]) -> str:
    from . import holding

    client = holding.ollama_client(ctl)
    if client is None:
        raise ModelLoadError("the Ollama client is not available", "unload the models in Ollama by hand",
                             code="ollama.unavailable")
    parts = []
    for name in names:
        rep = ctx.call(lambda _p, n=name: client.unload(n), what=f"unloading {name} from Ollama",
                       deadline_s=ctl.settings.step_timeout_s)
        parts.append(rep.message if isinstance(rep.message, str) else str(rep.message))
    return "; ".join(parts)


def _start_deadline(ctl: MemoryController, backend: object) -> float:
    """A backend that waits on an engine of its own may say how long a start takes (``start_timeout_s``);
    otherwise a start has ``operation_timeout_s``."""
    own = getattr(backend, "start_timeout_s", None)
    return float(own) if isinstance(own, (int, float)) and own > 0 else ctl.settings.operation_timeout_s


def _rollback(ctl: MemoryController, ctx: OperationContext, plan: Plan, exc: BaseException,
              mine: list[Deployment], previous: list[Deployment], prepare_started: bool) -> None:
    with _Step(ctl, ctx, "rollback", plan.device_key) as st:
        parts = []
        for dep in mine:
            try:
                rep = ctx.call(lambda _p, d=dep: ctl.backend(d.backend_id).stop(d.handle), what=f"removing {dep.model_id}",
                               deadline_s=ctl.settings.step_timeout_s + ctl.settings.vllm_stop_timeout_s * 4,
                               cancellable=False)
                parts.append(f"stopped {dep.model_id} (freed {fmt_bytes(rep.freed_bytes)})")
            except MemctlError as e:
                parts.append(f"could not stop {dep.model_id}: {e.message}")
        if prepare_started or mine:
            for b in ctl.registry.made().values():
                b.clear_caches()
        st.message = "; ".join(parts) or ("nothing new was left running" if prepare_started else "nothing new was loaded")
        cancelled = ctx.cancelled or isinstance(exc, OperationCancelledError)
        timed_out = isinstance(exc, OperationTimeoutError)  # the worker still holds the backend
        running_now = ctl.deployments()
        if not cancelled and not timed_out and previous and not running_now:
            restored = _restore(ctl, ctx, previous)
            st.message += f"; restored {restored}" if restored else "; the previous model was not restored"
        st.warn(st.message)


def _restore(ctl: MemoryController, ctx: OperationContext, previous: list[Deployment]) -> str | None:
    if not ctl.settings.restore_previous_on_failure:
        return None
    prev = previous[0]
    try:
        plan = make_plan(ctl, prev.backend_id, ctl.resolve(prev.model_id), prev.profile, "switch")
        if not plan.fits or plan.blockers or plan.claim is None:
            return None
        ctx.emit("restore", f"restoring {prev.model_id}")
        backend = ctl.backend(prev.backend_id)
        cached = ctl.resolve(prev.model_id)
        ctx.call(lambda p: backend.start(cached, plan.profile, plan.claim, progress=p), what=f"restoring {prev.model_id}",
                 deadline_s=_start_deadline(ctl, backend), on_late_result=lambda d: backend.stop(d.handle), cancellable=True)
        return prev.model_id
    except BaseException as e:  # noqa: BLE001 - restoring is best effort, reported in the log
        ctx.record.steps.append(StepRecord("restore", Outcome.WARNING, 0.0, f"could not restore {prev.model_id}: {e}"))
        return None


__all__ = ["make_plan", "run_apply", "not_fit_error", "stop_deployments", "Precision"]
