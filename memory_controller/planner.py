"""The planner: the live state read once (a value), and plans made from it.

It owns the batch-verdict cache (a verdict beside each cached model on every dashboard rerun); the plan
itself is built by the pure :func:`memory_controller.planning.make_plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import planning
from .backend import Claim, Deployment
from .cache import TTLCache
from .errors import MemctlError
from .holders import fit_with_holders
from .planning import Plan
from .types import CachedModel, Message, Profile, SystemSnapshot, msg

if TYPE_CHECKING:
    from .fleet import Fleet
    from .holding import HolderCensus
    from .sizing import Sizer

PLANS_TTL_S = 5.0


@dataclass
class LiveState:
    """What plans read from the live system, read once: a batch of plans shares one snapshot, one list of
    deployments and one census of holders (read on first need)."""

    snap: SystemSnapshot
    running: list[Deployment]
    census: HolderCensus | None = None
    _holders: tuple | None = field(default=None, repr=False)

    def holders(self) -> tuple:
        if self._holders is None:
            if self.census is None:
                self._holders = ([], [])
            else:
                others = self.census.others()
                self._holders = (self.census.holders(self.snap, others), others)
        return self._holders


class Planner:
    """``snapshot()`` reads the devices (and feeds the memory history)."""

    def __init__(self, sizer: Sizer, fleet: Fleet, census: HolderCensus,
                 snapshot: Callable[[], SystemSnapshot]) -> None:
        self.sizer, self.fleet, self.census, self._snapshot = sizer, fleet, census, snapshot
        self._verdicts: TTLCache[dict[str, Plan | None]] = TTLCache(PLANS_TTL_S)

    def live(self) -> LiveState:
        return LiveState(self._snapshot(), self.fleet.deployments(), self.census)

    def plan(self, backend_id: str, cached: CachedModel, profile: Profile | None, purpose: str = "switch", *,
             free_holders: bool = False, live: LiveState | None = None, with_suggestion: bool = True) -> Plan:
        """A plan for ``cached`` on ``backend_id`` against ``live`` (default: read now). Without ``profile``:
        the sizer's default profile. ``free_holders`` adds the opt-in step that asks another holder to unload."""
        from . import safefiles

        backend_id = self._backend_for(cached, backend_id)
        backend = self.fleet.backend(backend_id)
        caps = backend.capabilities
        # every file of a checkpoint: a bounded regular file inside its cache folder, before anything reads one
        # (a model of a backend's own store is an address, not a folder: that backend reads it)
        if cached.source not in self.fleet.registry.ids():
            safefiles.check_model_dir(cached.path, safefiles.roots_of(cached.path, cached.source,
                                                                      self.sizer.settings.resolved_hf_cache_dir))
        live = live or self.live()
        snap, running = live.snap, live.running
        notes: tuple[Message, ...] = ()
        if profile is None:
            profile, notes = self.sizer.default_profile(backend_id, cached, running, snap, purpose,
                                                        self.fleet.availabilities(snap))
        profile = planning.normalise_profile(backend_id, profile, snap, caps.devices)
        blockers: list[Message] = []
        avail = backend.availability(snap)
        if not avail.ok:
            blockers.append(avail.reason or msg("backend.unavailable", f"{backend_id} is unavailable",
                                                backend=backend_id))
        if profile.precision not in caps.precisions:
            ok = ", ".join(p.value for p in caps.precisions)
            blockers.append(msg("backend.precision_unsupported",
                                f"{backend_id} cannot serve {profile.precision.value}: choose one of {ok}",
                                backend=backend_id, precision=profile.precision.value, allowed=ok))
        for m in backend.check_model(cached, profile):
            if m.code != "model.no_chat_template" or purpose == "ide":
                blockers.append(m)
        estimate = self.sizer.estimate(cached, profile)
        max_positions = self.sizer.model_max_context(cached)
        if max_positions and profile.context_tokens > max_positions:
            blockers.append(msg("plan.context_over_model_max",
                                f"context {profile.context_tokens} exceeds the model's maximum {max_positions} "
                                f"tokens: choose {max_positions} or less", tokens=profile.context_tokens,
                                max=max_positions))

        def claim_for(after: SystemSnapshot) -> Claim:
            if blockers and any(b.code.startswith("backend.") for b in blockers):
                return Claim({planning.target_device(after, profile).key: estimate.total_bytes})
            return backend.claim(cached, profile, estimate, after)

        def suggest(free_after: int) -> tuple[int | None, Message | None]:
            if not with_suggestion:
                return None, None
            max_ctx = self.sizer.context_that_fits(cached, profile, free_after)
            fitted = self.sizer.fit(cached, profile, free_after)
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
        hs, others = live.holders()
        shortfall = plan.needed_bytes - (plan.free_bytes_after_unload or 0)
        return planning.with_holders(plan, fit_with_holders(hs, plan.device_key, shortfall, others),
                                     free_holders=free_holders)

    def _backend_for(self, cached: CachedModel, backend_id: str) -> str:
        """A model a backend lists itself (``source`` is that backend's id) runs on that backend only; a
        checkpoint asked of a backend that serves only its own models goes to the first other one available."""
        ids = self.fleet.registry.ids()
        if cached.source in ids:
            return cached.source
        if backend_id in ids and self.fleet.backend(backend_id).capabilities.own_models_only:
            snap = self._snapshot()
            return next((b for b in ids if not self.fleet.backend(b).capabilities.own_models_only
                         and self.fleet.availability(b, snap).ok), backend_id)
        return backend_id

    def plans(self, backend_id: str, models: Sequence[CachedModel], profile: Profile) -> dict[str, Plan | None]:
        """One plan per model for the same profile against one live state; no suggestion is computed. A model
        whose plan fails maps to None. The verdicts change only when what runs or free memory (in 64 MiB
        steps) changes: a rerun with nothing changed reuses them for ``PLANS_TTL_S`` seconds."""
        live = self.live()
        target = planning.target_device(live.snap, profile)
        key = (backend_id, profile, tuple(m.model_id for m in models),
               frozenset((d.backend_id, d.handle) for d in live.running), (target.key, (target.free_bytes or 0) >> 26))
        cached = self._verdicts.get(key)
        if cached is not None:
            return dict(cached)
        out: dict[str, Plan | None] = {}
        for m in models:
            try:
                out[m.model_id] = self.plan(backend_id, m, profile, live=live, with_suggestion=False)
            except MemctlError:
                out[m.model_id] = None
        self._verdicts.put(out, key)
        return dict(out)
