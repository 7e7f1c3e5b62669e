"""Pure recommendation: free memory (and thresholds from config) → status level and profile.

Band edges belong to the upper band: with the default table exactly 8 GiB free is the first band,
8 GiB − 1 byte the second; exactly 4 GiB is 🟢, 4 GiB − 1 byte is 🟡; exactly 2 GiB is 🟡.
No I/O here: everything comes in as values.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from .types import (
    DeviceKind,
    DeviceSnapshot,
    Level,
    Message,
    Precision,
    Profile,
    ProfileBand,
    Recommendation,
    SystemSnapshot,
    msg,
)
from .units import fmt_bytes

if TYPE_CHECKING:
    from .backend import Availability

# A model-aware adjuster: given a profile, return one that fits the model (maybe with a lower
# context or a quantised precision) plus notes, or None when nothing fits.
FitCheck = Callable[[Profile, int], tuple[Profile, tuple[Message, ...]] | None]


def level_for(free_bytes: int | None, green_min_bytes: int, yellow_min_bytes: int) -> Level:
    """🟢 when free >= green_min, 🟡 when yellow_min <= free < green_min, 🔴 below (or unknown)."""
    if free_bytes is None:
        return Level.RED
    if free_bytes >= green_min_bytes:
        return Level.GREEN
    if free_bytes >= yellow_min_bytes:
        return Level.YELLOW
    return Level.RED


def band_for(free_bytes: int, bands: Sequence[ProfileBand], *,
             usable: Callable[[ProfileBand], bool] | None = None) -> ProfileBand:
    """The first band (largest threshold first) whose ``min_free_bytes <= free_bytes`` among the ``usable``
    ones; when none of those is low enough, the lowest usable band; when no band is usable, the lowest band
    (the most modest profile: the plan then says what blocks it)."""
    ordered = sorted(bands, key=lambda b: b.min_free_bytes, reverse=True)
    if not ordered:
        raise ValueError("the recommendation table is empty")
    candidates = [b for b in ordered if usable is None or usable(b)]
    if not candidates:
        return ordered[-1]
    for band in candidates:
        if free_bytes >= band.min_free_bytes:
            return band
    return candidates[-1]


def pick_device(snapshot: SystemSnapshot, device_key: str | None = None) -> DeviceSnapshot:
    """The device asked for, else the readable GPU with the most free memory, else the host."""
    if device_key:
        dev = snapshot.device(device_key)
        if dev is not None:
            return dev
    return snapshot.most_free_gpu() or snapshot.host


def recommend(
    snapshot: SystemSnapshot,
    *,
    bands: Sequence[ProfileBand],
    green_min_bytes: int,
    yellow_min_bytes: int,
    cpu_half_precision: str = "bf16",
    availability: Mapping[str, Availability] | None = None,
    cpu_backends: Collection[str] | None = None,
    device_key: str | None = None,
    fit: FitCheck | None = None,
) -> Recommendation:
    """Recommend a profile for ``device_key`` (default: the GPU with the most free memory, else host).

    On a GPU the guide's table applies. A band whose backend is unavailable (``availability``: backend id ->
    Availability; a backend it does not name counts as unavailable, None: all are available) falls back to
    the best band whose backend is. On the host (no GPU) only bands of ``cpu_backends`` apply (None: every
    backend runs on the CPU), on the CPU, with fp16 mapped to ``cpu_half_precision``. ``fit`` (the
    model-aware seam) may lower the profile further for a chosen model.

    ``notes`` explain each adjustment as :class:`Message` codes (a translated UI renders them; ``text`` is
    the English for the CLI and JSON).
    """
    dev = pick_device(snapshot, device_key)
    free = dev.free_bytes if dev.free_bytes is not None else 0
    level = level_for(dev.free_bytes, green_min_bytes, yellow_min_bytes)
    notes: list[Message] = []
    on_host = dev.kind is DeviceKind.HOST

    def why_not(backend_id: str) -> str | None:
        """None when ``backend_id`` can serve on this device, else why not (one sentence)."""
        if on_host and cpu_backends is not None and backend_id not in cpu_backends:
            return (f"{backend_id} needs a GPU: no NVIDIA GPU available"
                    + (f": {snapshot.nvml_hint}" if snapshot.nvml_hint else ""))
        if availability is None:
            return None
        a = availability.get(backend_id)
        if a is None:
            return f"{backend_id} is not configured"
        if not a.ok:
            return f"{backend_id} is unavailable: {a.reason.text if a.reason else 'it did not answer'}"
        return None

    blocked = {b.mode: why_not(b.mode) for b in bands}
    preferred_reason = next((r for r in blocked.values() if r is not None), None)
    band = band_for(free, bands, usable=lambda b: blocked[b.mode] is None)
    natural = band_for(free, bands)
    if natural.name != band.name:
        notes.append(msg("rec.backend_unavailable_fallback",
                         f"the table says {natural.name}, but {natural.mode} is unavailable: {band.name} instead",
                         table=natural.name, used=band.name, backend=natural.mode, used_backend=band.mode))

    precision = band.precision
    device = "cuda"
    gpu_ids: tuple[int, ...] | None = (dev.index,) if dev.index is not None else None
    if on_host:
        device = "cpu"
        gpu_ids = None
        if precision is Precision.FP16:
            precision = Precision(cpu_half_precision)
            if precision is not Precision.FP16:
                notes.append(msg("rec.cpu_half_precision", f"fp16 is slow on the CPU: {precision.value} instead",
                                 precision=precision.value))

    profile = Profile(
        mode=band.mode,
        precision=precision,
        context_tokens=band.context_tokens,
        batch=band.batch,
        device=device,
        gpu_ids=gpu_ids,
    )
    where = "host memory" if dev.kind is DeviceKind.HOST else f"{dev.name} ({dev.key})"
    reason = f"{fmt_bytes(dev.free_bytes)} free on {where} → {band.name}"

    if fit is not None:
        fitted = fit(profile, free)
        if fitted is None:
            notes.append(msg("rec.model_does_not_fit", "the chosen model does not fit in any profile on this device"))
            level = Level.RED
        else:
            fitted_profile, fit_notes = fitted
            notes.extend(fit_notes)
            profile = fitted_profile

    return Recommendation(
        device_key=dev.key,
        free_bytes=dev.free_bytes,
        level=level,
        band=band.name,
        profile=profile,
        preferred_available=preferred_reason is None,
        preferred_reason=preferred_reason,
        reason=reason,
        notes=tuple(notes),
    )
