"""Catalog, estimates and recommendations of the controller (mixed into MemoryController): read-only.

The recommendation is the guide's table for the device, fitted to the chosen model: context lowered, then
precision stepped down the backend's fit ladder, until the estimate fits; and the band's context is a
floor — the largest context that fits, up to the model's maximum, with the rule that chose it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING

from . import planning
from .backend import Availability
from .errors import InvalidModelIdError, MemctlError, ModelNotFoundError
from .recommend import recommend
from .types import (
    CachedModel,
    CatalogResult,
    MemoryEstimate,
    Message,
    Profile,
    Recommendation,
    SystemSnapshot,
    msg,
)

if TYPE_CHECKING:
    from .controller import MemoryController

CATALOG_TTL_S = 10.0


def _backend_models(ctl: MemoryController) -> list[CachedModel]:
    """Models backends list themselves (their optional ``list_models()``): never raises."""
    out: list[CachedModel] = []
    for b in ctl.backends().values():
        lister = getattr(b, "list_models", None)
        if lister is not None:
            try:
                out.extend(lister())
            except MemctlError:
                continue
    return out


def _backend_model(ctl: MemoryController, model_id: str) -> CachedModel | None:
    if not isinstance(model_id, str) or len(model_id) > 400:
        return None
    for b in ctl.backends().values():
        resolver = getattr(b, "resolve_model", None)
        if resolver is not None:
            found = resolver(model_id)
            if found is not None:
                return found
    return None


class FittingMixin:
    def models(self: MemoryController, refresh: bool = False) -> CatalogResult:
        from . import catalog

        now = time.monotonic()
        cached = self._catalog
        if not refresh and cached is not None and now - cached[0] < CATALOG_TTL_S:
            return cached[1]
        result = catalog.scan_models(self.settings)
        own = _backend_models(self)
        if own:
            result = dataclasses.replace(result, models=result.models + tuple(own))
        self._catalog = (now, result)
        return result

    def resolve(self: MemoryController, model: str | CachedModel) -> CachedModel:
        if isinstance(model, CachedModel):
            return model
        from . import catalog

        cached = self._catalog
        try:
            mid = catalog.validate_model_id(model, self.settings)
            if cached is not None and time.monotonic() - cached[0] < CATALOG_TTL_S:
                for m in cached[1].models:
                    if m.model_id == mid and os.path.isdir(m.path):
                        return m
            return catalog.resolve_model(mid, self.settings)
        except (InvalidModelIdError, ModelNotFoundError):
            own = _backend_model(self, model)  # a model a backend lists itself (not a checkpoint folder)
            if own is None:
                raise
            return own

    def estimate(self: MemoryController, model: str | CachedModel, profile: Profile) -> MemoryEstimate:
        from . import estimate as est

        return est.estimate(self.resolve(model), profile, self.settings)

    def max_context(self: MemoryController, model: str | CachedModel, profile: Profile, free_bytes: int | None = None) -> int:
        """Largest context for ``model`` under ``profile`` that fits ``free_bytes`` (default: free now on the
        profile's device), never above the model's own maximum; 0 when even the weights don't fit."""
        from . import estimate as est

        cached = self.resolve(model)
        if free_bytes is None:
            free_bytes = planning.target_device(self.probe.snapshot(), profile).free_bytes or 0
        ctx = est.max_context_that_fits(cached, free_bytes, profile, self.settings)
        model_max = est.read_model_spec(cached.path).max_position_embeddings
        return min(ctx, model_max) if model_max else ctx

    def recommend(self: MemoryController, model: str | None = None, device_key: str | None = None,
                  snapshot: SystemSnapshot | None = None) -> Recommendation:
        """The guide's table for the device; with ``model``, fitted to that model (see planning.fit_profile)."""
        snap = snapshot or self.devices()
        vllm = self.availability("vllm", snap) if "vllm" in self.registry.ids() else Availability(False)
        fit = None
        if model is not None:
            cached = self.resolve(model)

            def fit(profile: Profile, free_bytes: int) -> tuple[Profile, tuple[Message, ...]] | None:
                return self._fit(cached, profile, free_bytes)

        return recommend(snap, bands=self.settings.bands, green_min_bytes=self.settings.green_min_bytes,
                         yellow_min_bytes=self.settings.yellow_min_bytes,
                         cpu_half_precision=self.settings.cpu_half_precision, docker_available=vllm.ok,
                         docker_reason=vllm.reason.text if vllm.reason else None, device_key=device_key, fit=fit)

    def model_in_view(self: MemoryController) -> str | None:
        """The model every view recommends for when none is named: the one that runs, else the first
        cached model (where the dashboard's selector starts). None when there is none."""
        try:
            running = [d.model_id for d in self.deployments()]
            models = self.models().models
        except MemctlError:
            return None
        ids = [m.model_id for m in models]
        active = [mid for mid in running if mid in ids]
        return active[0] if active else (ids[0] if ids else None)

    def recommend_in_view(self: MemoryController, device_key: str | None = None,
                          snapshot: SystemSnapshot | None = None) -> Recommendation:
        """:meth:`recommend` for :meth:`model_in_view` (the dashboard's fields, its card, the diagnostic page
        and ``memctl status`` say one profile); the table's alone when no model fits the question."""
        model = self.model_in_view()
        if model is not None:
            try:
                return self.recommend(model=model, device_key=device_key, snapshot=snapshot)
            except Exception:  # noqa: BLE001 - an unreadable model: the table's profile, the model's error elsewhere
                pass
        return self.recommend(device_key=device_key, snapshot=snapshot)

    def _ladder(self: MemoryController, backend_id: str) -> tuple:
        try:
            return self.backend(backend_id).capabilities.fit_ladder
        except MemctlError:
            return ()

    def _fit(self: MemoryController, cached: CachedModel, profile: Profile, free_bytes: int) -> tuple[Profile, tuple[Message, ...]] | None:
        from . import estimate as est

        model_max = est.read_model_spec(cached.path).max_position_embeddings
        band_ctx = profile.context_tokens  # the guide's table's value, before any change
        clamped = bool(model_max and profile.context_tokens > model_max)
        if clamped:
            profile = profile.with_(context_tokens=model_max)

        def max_context(p: Profile) -> int:
            return est.max_context_that_fits(cached, free_bytes, p, self.settings)

        fitted = planning.fit_profile(
            profile, free_bytes, ladder=self._ladder(profile.mode),
            total_bytes=lambda p: est.estimate(cached, p, self.settings).total_bytes,
            max_context=max_context, model_id=cached.model_id)
        if fitted is None:
            return None
        p, notes = fitted
        # The band's context is a floor, not a ceiling: offer the largest that fits, up to the model's maximum.
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

    def export(self: MemoryController, fmt: str, model: str | CachedModel, *, gpu_bytes: int | None = None,
               gpus: int = 1, context: int | None = None, batch: int | None = None,
               accelerator: str | None = None, max_replicas: int = 2):
        """A document for an engine a cluster runs (``export_formats()``), sized by the same estimator and fit
        for ``gpus`` GPUs of ``gpu_bytes`` each (default: this machine's largest GPU); see clusterfit.py."""
        from . import clusterfit

        return clusterfit.export(self, fmt, model, gpu_bytes=gpu_bytes, gpus=gpus, context=context, batch=batch,
                                 accelerator=accelerator, max_replicas=max_replicas)

    def export_formats(self: MemoryController) -> tuple[str, ...]:
        """The formats the configured backends write (e.g. Helm values, a RayService)."""
        from . import clusterfit

        return tuple(clusterfit.exporters(self))
