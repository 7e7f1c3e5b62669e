"""The sizer: estimates, the fit ladder, recommendations and IDE-aware sizing, as plain functions of values.

It owns no state and does no I/O beyond reading a model's own files (headers, config) through
:mod:`memory_controller.estimate`. The recommendation is the guide's table for the device, fitted to the
chosen model: context lowered, then precision stepped down the backend's fit ladder, until the estimate
fits; and the band's context is a floor — the largest context that fits, up to the model's maximum, with
the rule that chose it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from . import estimate as est
from . import planning
from .backend import Availability, Capabilities, Deployment
from .recommend import recommend
from .types import CachedModel, MemoryEstimate, Message, Profile, Recommendation, SystemSnapshot, msg

if TYPE_CHECKING:
    from .settings import Settings

Fitted = tuple[Profile, tuple[Message, ...]]


class Sizer:
    """``capabilities(backend_id)`` gives a backend's capabilities (None when it cannot be built)."""

    def __init__(self, settings: Settings, capabilities: Callable[[str], Capabilities | None]) -> None:
        self.settings = settings
        self._capabilities = capabilities

    def ladder(self, backend_id: str) -> tuple:
        caps = self._capabilities(backend_id)
        return caps.fit_ladder if caps is not None else ()

    def estimate(self, cached: CachedModel, profile: Profile) -> MemoryEstimate:
        return est.estimate(cached, profile, self.settings)

    def model_max_context(self, cached: CachedModel) -> int | None:
        return est.read_model_spec(cached.path).max_position_embeddings

    def context_that_fits(self, cached: CachedModel, profile: Profile, free_bytes: int) -> int:
        return est.max_context_that_fits(cached, free_bytes, profile, self.settings)

    def max_context(self, cached: CachedModel, profile: Profile, free_bytes: int) -> int:
        """Largest context under ``profile`` that fits ``free_bytes``, never above the model's own maximum."""
        ctx = self.context_that_fits(cached, profile, free_bytes)
        model_max = self.model_max_context(cached)
        return min(ctx, model_max) if model_max else ctx

    def fit(self, cached: CachedModel, profile: Profile, free_bytes: int) -> Fitted | None:
        """``profile`` lowered until ``cached`` fits ``free_bytes`` (planning.fit_profile), then its context
        grown to the largest that fits (the band's context is a floor); None when nothing fits."""
        model_max = self.model_max_context(cached)
        band_ctx = profile.context_tokens  # the guide's table's value, before any change
        clamped = bool(model_max and profile.context_tokens > model_max)
        if clamped:
            profile = profile.with_(context_tokens=model_max)

        def max_context(p: Profile) -> int:
            return self.context_that_fits(cached, p, free_bytes)

        fitted = planning.fit_profile(
            profile, free_bytes, ladder=self.ladder(profile.mode),
            total_bytes=lambda p: self.estimate(cached, p).total_bytes,
            max_context=max_context, model_id=cached.model_id)
        if fitted is None:
            return None
        p, notes = fitted
        # Said as what it is: a raise from the table's value, and what bounded it (issue 20.5).
        grown = min(max_context(p), model_max or p.context_tokens)
        if grown > p.context_tokens:
            if grown == model_max:
                note = msg("rec.context_raised_model_max",
                           f"context raised from the table's {band_ctx} to {grown} tokens: memory allows more, "
                           f"the model's own maximum ({model_max}) is the bound",
                           rule="model_max", tokens=grown, band_ctx=band_ctx, model_max=model_max)
            else:
                note = msg("rec.context_raised_memory",
                           f"context raised from the table's {band_ctx} to {grown} tokens: the largest that fits "
                           "in free memory", rule="memory", tokens=grown, band_ctx=band_ctx)
            return p.with_(context_tokens=grown), (*notes, note)
        if clamped:
            notes = (*notes, msg("rec.context_capped",
                                 f"context lowered from the table's {band_ctx} to {p.context_tokens} tokens: "
                                 "the model's own maximum", rule="model_max", tokens=p.context_tokens,
                                 band_ctx=band_ctx, model_max=model_max))
        return p, notes

    def recommend(self, snap: SystemSnapshot, availability: Mapping[str, Availability],
                  cached: CachedModel | None = None, device_key: str | None = None) -> Recommendation:
        """The guide's table for the device (bands whose backend is unavailable fall back); with ``cached``,
        fitted to that model."""
        fit = None
        if cached is not None:
            def fit(profile: Profile, free_bytes: int) -> Fitted | None:
                return self.fit(cached, profile, free_bytes)

        s = self.settings
        return recommend(snap, bands=s.bands, green_min_bytes=s.green_min_bytes, yellow_min_bytes=s.yellow_min_bytes,
                         cpu_half_precision=s.cpu_half_precision, availability=availability,
                         cpu_backends=self._cpu_backends(availability), device_key=device_key, fit=fit)

    def _cpu_backends(self, ids: Sequence[str] | Mapping[str, object]) -> frozenset[str]:
        out = set()
        for bid in ids:
            caps = self._capabilities(bid)
            if caps is not None and "cpu" in caps.devices:
                out.add(bid)
        return frozenset(out)

    def default_profile(self, backend_id: str, cached: CachedModel, running: Sequence[Deployment],
                        snap: SystemSnapshot, purpose: str, availability: Mapping[str, Availability]
                        ) -> tuple[Profile, tuple[Message, ...]]:
        """The profile a plan uses when none is given: the running one when this model runs on this backend,
        else the recommendation for the memory free after the unload, as this backend can run it
        (``purpose="ide"``: IDE-aware sizing, memory_controller/servesize.py)."""
        mine = next((d for d in running if d.backend_id == backend_id and d.model_id == cached.model_id
                     and d.profile), None)
        if mine is not None and mine.profile is not None:
            return mine.profile, ()
        caps = self._capabilities(backend_id)
        after = planning.with_freed(snap, running)
        rec = self.recommend(after, availability, cached)
        profile = rec.profile.with_(mode=backend_id)
        ladder = [p for p in caps.fit_ladder if p in caps.precisions] if caps else []
        if caps is not None and profile.precision not in caps.precisions:
            profile = profile.with_(precision=ladder[0] if ladder else caps.precisions[0])
        notes = tuple(rec.notes)
        if purpose == "ide" and caps is not None:
            from .servesize import ide_profile

            profile = planning.normalise_profile(backend_id, profile, snap, caps.devices)
            free = planning.target_device(after, profile).free_bytes or 0
            sized = ide_profile(profile, model_max_context=self.model_max_context(cached), ladder=ladder,
                                max_context_for=lambda p: self.context_that_fits(cached, p, free),
                                min_context=self.settings.ide_min_context)
            if sized is not None:
                profile, notes = sized
        return profile, notes
