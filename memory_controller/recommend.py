"""Pure recommendation: free memory (and thresholds from config) → status level and profile.

Band edges belong to the upper band: with the default table exactly 8 GiB free is ``vllm_full``,
8 GiB − 1 byte is ``vllm_limited``; exactly 4 GiB is 🟢, 4 GiB − 1 byte is 🟡; exactly 2 GiB is 🟡.
No I/O here: everything comes in as values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .types import (
    DeviceKind,
    DeviceSnapshot,
    Level,
    Message,
    Mode,
    Precision,
    Profile,
    ProfileBand,
    Recommendation,
    SystemSnapshot,
    msg,
)
from .units import fmt_bytes

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


def band_for(free_bytes: int, bands: Sequence[ProfileBand], *, transformers_only: bool = False) -> ProfileBand:
    """The first band (largest threshold first) whose ``min_free_bytes <= free_bytes``."""
    ordered = sorted(bands, key=lambda b: b.min_free_bytes, reverse=True)
    for band in ordered:
        if transformers_only and band.mode is not Mode.TRANSFORMERS:
            continue
        if free_bytes >= band.min_free_bytes:
            return band
    candidates = [b for b in ordered if not transformers_only or b.mode is Mode.TRANSFORMERS]
    if not candidates:
        raise ValueError("the recommendation table has no Transformers band")
    return candidates[-1]


def pick_device(snapshot: SystemSnapshot, device_key: str | None = None) -> DeviceSnapshot:
    """The device asked for, else the readable GPU with the most free memory, else the host."""
    if device_key:
        dev = snapshot.device(device_key)
        if dev is not None:
            return dev
    readable = [g for g in snapshot.gpus if g.free_bytes is not None]
    if readable:
        return max(readable, key=lambda g: g.free_bytes or 0)
    return snapshot.host


def recommend(
    snapshot: SystemSnapshot,
    *,
    bands: Sequence[ProfileBand],
    green_min_bytes: int,
    yellow_min_bytes: int,
    cpu_half_precision: str = "bf16",
    docker_available: bool = True,
    docker_reason: str | None = None,
    device_key: str | None = None,
    fit: FitCheck | None = None,
) -> Recommendation:
    """Recommend a profile for ``device_key`` (default: the GPU with the most free memory, else host).

    On a GPU the guide's table applies. When vLLM is unavailable (no Docker) a vLLM band falls
    back to the best Transformers band. On the host (no GPU) only Transformers bands apply, on
    the CPU, with fp16 mapped to ``cpu_half_precision``. ``fit`` (the model-aware seam) may lower
    the profile further for a chosen model.

    ``notes`` explain each adjustment as :class:`Message` codes (a translated UI renders them; ``text`` is
    the English for the CLI and JSON).
    """
    dev = pick_device(snapshot, device_key)
    free = dev.free_bytes if dev.free_bytes is not None else 0
    level = level_for(dev.free_bytes, green_min_bytes, yellow_min_bytes)
    notes: list[Message] = []

    if dev.kind is DeviceKind.HOST:
        vllm_ok = False
        vllm_reason = "no NVIDIA GPU available" + (f": {snapshot.nvml_hint}" if snapshot.nvml_hint else "")
    elif not docker_available:
        vllm_ok = False
        vllm_reason = f"Docker is not available: {docker_reason or 'the engine did not answer'}"
    else:
        vllm_ok, vllm_reason = True, None

    band = band_for(free, bands, transformers_only=not vllm_ok)
    natural = band_for(free, bands)
    if natural.name != band.name:
        notes.append(msg("rec.vllm_unavailable_fallback",
                         f"the table says {natural.name}, but vLLM is unavailable: {band.name} instead",
                         table=natural.name, used=band.name))

    precision = band.precision
    device = "cuda"
    gpu_ids: tuple[int, ...] | None = (dev.index,) if dev.index is not None else None
    if dev.kind is DeviceKind.HOST:
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
        vllm_available=vllm_ok,
        vllm_reason=vllm_reason,
        reason=reason,
        notes=tuple(notes),
    )
