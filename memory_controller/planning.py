"""Planning: what a switch will do, as data, before anything is touched.

``make_plan`` is pure: it takes the snapshot, what runs, the model, the chosen backend and its
claim, and returns a :class:`Plan` whose ``steps`` are exactly what ``apply(plan)`` executes
(huggingface_hub's plan-then-execute). ``check_still_holds`` is what apply runs first: when what
runs or free memory changed so that the plan no longer holds, it raises :class:`StalePlanError`
and nothing is touched.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .backend import Claim, Deployment, DeploymentState
from .errors import InsufficientMemoryError, StalePlanError
from .types import (
    CachedModel,
    DeviceSnapshot,
    MemoryEstimate,
    Message,
    Precision,
    Profile,
    SystemSnapshot,
    msg,
)
from .units import fmt_bytes

APPLY_STEPS = ("unload", "clear", "check", "switch", "prepare", "verify")
MIN_CONTEXT_TOKENS = 256


# --------------------------------------------------------------------------- steps: typed values
class _Step:
    """Each step carries its ``kind`` as a field (the JSON of a plan names it) and refuses another."""

    KIND = ""

    def __post_init__(self) -> None:
        if getattr(self, "kind", None) != self.KIND:
            raise ValueError(f"a {type(self).__name__} step has kind {self.KIND!r}, not {getattr(self, 'kind', None)!r}")


@dataclass(frozen=True)
class Unload(_Step):
    """Stop ``targets`` (waiting for, or cancelling, requests generating on them)."""

    KIND = "unload"
    targets: tuple[Deployment, ...] = ()
    kind: Literal["unload"] = "unload"


@dataclass(frozen=True)
class FreeHolder(_Step):
    """Ask another holder of GPU memory (``source``: a holder source's id) to unload ``names`` (opt-in)."""

    KIND = "free_holder"
    source: str = ""
    names: tuple[str, ...] = ()
    kind: Literal["free_holder"] = "free_holder"

    @property
    def name(self) -> str:
        return f"unload_{self.source}"


@dataclass(frozen=True)
class Clear(_Step):
    """Allocator and gc caches of every backend built so far."""

    KIND = "clear"
    kind: Literal["clear"] = "clear"


@dataclass(frozen=True)
class Check(_Step):
    """Free memory measured again against what is needed per device."""

    KIND = "check"
    bytes_by_device: Mapping[str, int] = dataclasses.field(default_factory=dict)
    kind: Literal["check"] = "check"


@dataclass(frozen=True)
class Switch(_Step):
    """The serving backend changes from what ran (recorded)."""

    KIND = "switch"
    backend_id: str = ""
    model_id: str = ""
    kind: Literal["switch"] = "switch"


@dataclass(frozen=True)
class Start(_Step):
    """Start the model on the plan's backend with ``claim`` (the step the guide calls "prepare")."""

    KIND = "prepare"
    claim: Claim | None = None
    backend_id: str = ""
    model_id: str = ""
    kind: Literal["prepare"] = "prepare"


@dataclass(frozen=True)
class Verify(_Step):
    """A quick check that what started answers."""

    KIND = "verify"
    backend_id: str = ""
    model_id: str = ""
    kind: Literal["verify"] = "verify"


PlanStep = Unload | FreeHolder | Clear | Check | Switch | Start | Verify


def step_name(step: PlanStep) -> str:
    """The step's name in records, progress and the UI ("unload", ..., "unload_<holder source>")."""
    return step.name if isinstance(step, FreeHolder) else step.kind


@dataclass(frozen=True)
class Plan:
    """A dry run: shown to the user, then executed exactly by ``apply(plan)``."""

    backend_id: str
    model_id: str
    profile: Profile
    device_key: str  # where most of the claim lands
    steps: tuple[PlanStep, ...]
    to_stop: tuple[Deployment, ...]
    expected_freed_bytes: int  # on device_key
    needed_bytes: int  # on device_key
    free_bytes_now: int | None
    free_bytes_after_unload: int | None
    fits: bool
    already_active: bool
    estimate: MemoryEstimate | None
    claim: Claim | None = None
    suggestion: Message | None = None
    max_context_that_fits: int | None = None
    blockers: tuple[Message, ...] = ()
    notes: tuple[Message, ...] = ()
    purpose: str = "switch"  # "switch" | "ide"
    basis: frozenset[tuple[str, str]] = frozenset()  # (backend id, handle) of what ran when planned
    made_at: float = 0.0
    holder_offer: Message | None = None  # "also unload from <holder>: …" — fits only with it (opt-in)
    extra_free_bytes: Mapping[str, int] = dataclasses.field(default_factory=dict)  # freed by opt-in steps

    @property
    def step_names(self) -> tuple[str, ...]:
        return tuple(step_name(s) for s in self.steps)

    @property
    def runnable(self) -> bool:
        return not self.blockers and (self.fits or self.already_active)


# --------------------------------------------------------------------------- devices and memory
def target_device(snap: SystemSnapshot, profile: Profile) -> DeviceSnapshot:
    """The device a profile lands on: the host on the CPU, else the named GPU or the one with most free."""
    if profile.device == "cpu" or not snap.gpus:
        return snap.host
    if profile.gpu_ids:
        dev = snap.device(f"gpu:{profile.gpu_ids[0]}")
        if dev is not None:
            return dev
    return snap.most_free_gpu() or snap.host


def freed_by(deployments: Sequence[Deployment], device_key: str) -> int:
    return sum(int(d.memory_bytes.get(device_key, 0)) for d in deployments)


def with_freed(snap: SystemSnapshot, stopping: Sequence[Deployment]) -> SystemSnapshot:
    """``snap`` as it will look once ``stopping`` is gone: what they hold counts as free."""

    def adjust(dev: DeviceSnapshot) -> DeviceSnapshot:
        extra = freed_by(stopping, dev.key)
        if not extra or dev.free_bytes is None:
            return dev
        used = None if dev.used_bytes is None else max(0, dev.used_bytes - extra)
        return dataclasses.replace(dev, free_bytes=dev.free_bytes + extra, used_bytes=used)

    return dataclasses.replace(snap, gpus=tuple(adjust(g) for g in snap.gpus), host=adjust(snap.host))


def normalise_profile(backend_id: str, profile: Profile, snap: SystemSnapshot, devices: Sequence[str]) -> Profile:
    """The profile as the backend can run it here: its id as the mode, a device it supports."""
    changes: dict = {}
    if profile.mode != backend_id:
        changes["mode"] = backend_id
    if profile.device not in devices and devices:
        changes["device"] = devices[0]
    if profile.device == "cuda" and not snap.has_gpu and "cpu" in devices:
        changes["device"] = "cpu"
    if changes.get("device", profile.device) == "cpu":
        changes["gpu_ids"] = None
    return profile.with_(**changes) if changes else profile


# --------------------------------------------------------------------------- fitting
def bits(p: Precision) -> int:
    return {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "nf4": 4, "fp4": 4}[p.value]


def fit_profile(profile: Profile, free_bytes: int, *, ladder: Sequence[Precision],
                total_bytes: Callable[[Profile], int], max_context: Callable[[Profile], int],
                model_id: str) -> tuple[Profile, tuple[Message, ...]] | None:
    """Lower context, then quantise down ``ladder``, until the estimate fits ``free_bytes``."""
    if total_bytes(profile) <= free_bytes:
        return profile, ()
    precisions = [profile.precision] + [p for p in ladder if p is not profile.precision and bits(p) < bits(profile.precision)]
    for precision in precisions:
        candidate = profile.with_(precision=precision, double_quant=precision.is_4bit)
        ctx = max_context(candidate)
        if ctx >= min(MIN_CONTEXT_TOKENS, profile.context_tokens):
            ctx = min(ctx, profile.context_tokens)
            notes: list[Message] = []
            if precision is not profile.precision:
                notes.append(msg("fit.precision", f"{profile.precision.value} does not fit: {precision.value} instead",
                                 was=profile.precision.value, now=precision.value))
            if ctx < profile.context_tokens:
                notes.append(msg("fit.context", f"context lowered to {ctx} tokens to fit {model_id}",
                                 tokens=ctx, model=model_id))
            return candidate.with_(context_tokens=ctx), tuple(notes)
    return None


# --------------------------------------------------------------------------- the plan
def make_plan(*, backend_id: str, model: CachedModel, profile: Profile, snap: SystemSnapshot,
              running: Sequence[Deployment], estimate: MemoryEstimate, claim_for: Callable[[SystemSnapshot], Claim],
              blockers: Sequence[Message], notes: Sequence[Message], purpose: str,
              suggest: Callable[[int], tuple[int | None, Message | None]]) -> Plan:
    """Build the plan. ``claim_for(snapshot_after_unload)`` asks the backend what it will hold;
    ``suggest(free_after)`` gives (largest context, a suggestion) when it does not fit."""
    # a failed deployment (its container died, or was started under other settings) is never "already active":
    # the plan stops it and starts the model afresh
    already = any(d.backend_id == backend_id and d.model_id == model.model_id and d.profile == profile
                  and d.state is not DeploymentState.FAILED for d in running)
    to_stop = () if already else tuple(running)
    after = with_freed(snap, to_stop)
    claim = claim_for(after)
    all_blockers = tuple(blockers) + tuple(claim.blockers)
    claimed = dict(claim.bytes_by_device) or {target_device(snap, profile).key: estimate.total_bytes}
    device_key = max(claimed, key=lambda k: claimed[k])
    target = snap.device(device_key) or target_device(snap, profile)
    free_now = target.free_bytes
    freed_here = freed_by(to_stop, device_key)
    free_after = None if free_now is None else free_now + freed_here
    fits = True
    for key, need in claimed.items():
        dev = after.device(key)
        if dev is None or dev.free_bytes is None or need > dev.free_bytes:
            fits = False
    suggestion, max_ctx = None, None
    if not fits and free_after is not None:
        max_ctx, suggestion = suggest(free_after)
    steps: tuple[PlanStep, ...] = ()
    if not already:
        steps = (
            Unload(to_stop),
            Clear(),
            Check(claimed),
            Switch(backend_id, model.model_id),
            Start(claim, backend_id, model.model_id),
            Verify(backend_id, model.model_id),
        )
    return Plan(
        backend_id=backend_id, model_id=model.model_id, profile=profile, device_key=device_key, steps=steps,
        to_stop=to_stop, expected_freed_bytes=freed_here, needed_bytes=claimed[device_key],
        free_bytes_now=free_now, free_bytes_after_unload=free_after, fits=fits, already_active=already,
        estimate=estimate, claim=claim, suggestion=suggestion, max_context_that_fits=max_ctx,
        blockers=all_blockers, notes=tuple(notes) + tuple(claim.notes), purpose=purpose,
        basis=frozenset((d.backend_id, d.handle) for d in running), made_at=time.time(),
    )


def check_still_holds(plan: Plan, snap: SystemSnapshot, running: Sequence[Deployment]) -> None:
    """Raise StalePlanError (touching nothing) when the plan no longer holds."""
    now = frozenset((d.backend_id, d.handle) for d in running)
    if now != plan.basis:
        gone = sorted(h for _b, h in plan.basis - now)
        new = sorted(h for _b, h in now - plan.basis)
        what = "; ".join(p for p in (f"stopped since: {', '.join(gone)}" if gone else "",
                                     f"started since: {', '.join(new)}" if new else "") if p)
        raise StalePlanError(
            f"what runs changed since the plan was made ({what}); nothing was touched",
            "look at the new plan and apply it", code="stale_plan.deployments", args={"gone": gone, "new": new})
    if plan.already_active or not plan.fits or plan.claim is None:
        return
    after = with_freed(snap, plan.to_stop)
    for key, need in plan.claim.bytes_by_device.items():
        dev = after.device(key)
        free = None if dev is None or dev.free_bytes is None else dev.free_bytes + plan.extra_free_bytes.get(key, 0)
        if free is not None and need > free:
            raise StalePlanError(
                f"free memory on {key} changed since the plan was made: {fmt_bytes(need)} needed, "
                f"{fmt_bytes(free)} would be free now; nothing was touched",
                "look at the new plan (something else took memory), clear memory or choose a lighter profile",
                code="stale_plan.memory", args={"device": key, "needed_bytes": need, "free_bytes": free})


def with_holders(plan: Plan, fit: Any, *, free_holders: bool) -> Plan:
    """The plan with what other holders mean for it (holders.fit_with_holders): notes always; a blocker
    naming a foreign process it would need stopped; the offer to ask another holder, and with ``free_holders`` the
    opt-in step itself (before the check) and the memory it frees."""
    changes: dict[str, Any] = {"notes": plan.notes + tuple(fit.notes), "blockers": plan.blockers + tuple(fit.blockers)}
    if fit.fits_if_freed and not plan.fits:
        changes["holder_offer"] = fit.step
        if free_holders:
            steps = list(plan.steps)
            steps.insert(1, FreeHolder(fit.source, tuple(fit.models)))
            changes.update(steps=tuple(steps), fits=True, extra_free_bytes={plan.device_key: fit.freed_bytes},
                           free_bytes_after_unload=(plan.free_bytes_after_unload or 0) + fit.freed_bytes)
    return dataclasses.replace(plan, **changes)


def not_fit_error(plan: Plan, free_override: int | None = None) -> InsufficientMemoryError:
    """The refusal of a plan that does not fit: needed and free bytes, and the suggestion."""
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


_PLAN_ADAPTER: Any = None


def plan_from_jsonable(data: Any) -> Plan:
    """A plan back from its JSON (``to_jsonable(plan)``, e.g. sent to the owner process), every field checked
    by its type (pydantic); raises ``ValueError`` (pydantic's ValidationError) naming what is wrong."""
    global _PLAN_ADAPTER
    if _PLAN_ADAPTER is None:
        from pydantic import TypeAdapter

        _PLAN_ADAPTER = TypeAdapter(Plan)
    return _PLAN_ADAPTER.validate_python(data)
