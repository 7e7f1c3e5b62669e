"""Sizing a model for GPUs of a given size, and exporting that size to engines other machines run.

When one workstation is not enough, a team serves the same model on a cluster engine (a Helm chart,
a Ray cluster). The questions are the workstation's: which context fits, how many sequences, how much
of each GPU to claim. :func:`fit_on_gpus` answers them with the same estimator and the same IDE
preference as the workstation (``servesize.ide_profile``: the largest context that fits, up to the
model's maximum; a context of at least ``ide_min_context`` is preferred, here over more sequences
at once), for ``gpus`` GPUs of ``gpu_bytes`` each, of which an engine may use ``usable_fraction``.

The documents themselves are an engine's own format: a backend that can write them offers
``export_formats`` and ``export(fmt, model, request)`` (the :class:`Exporter` protocol) and is found
through the registry (:func:`export`), so the core names no engine. Pure apart from reading the
model's config and safetensors headers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from . import estimate as est
from .errors import InsufficientMemoryError, MemctlError, SettingsError
from .planning import MIN_CONTEXT_TOKENS
from .recommend import band_for
from .servesize import ide_profile
from .types import CachedModel, MemoryEstimate, Message, Precision, Profile, msg
from .units import GIB, fmt_bytes

if TYPE_CHECKING:  # pragma: no cover
    from .fleet import Fleet
    from .settings import Settings

MAX_GPUS = 64
_GPU_STEPS = (2, 4, 8, 16, 32, 64)  # tensor-parallel sizes a suggestion tries, in order


class DoesNotFitError(InsufficientMemoryError):
    """The model does not fit the given GPUs at any context (or at the context asked for)."""

    code = "export.does_not_fit"

    def __init__(self, message: str, hint: str | None = None, *, needed_bytes: int | None = None,
                 free_bytes: int | None = None, args: dict | None = None) -> None:
        super().__init__(message, hint, needed_bytes=needed_bytes, free_bytes=free_bytes)
        self.args_ = dict(args or {})


class BadExportRequestError(SettingsError):
    """A request that can never be served as asked (GPU count that does not divide the heads, context
    above the model's maximum, no GPU size known); exit code 2 on the command line."""

    code = "export.bad_request"


@dataclass(frozen=True)
class GpuFit:
    """What a model is served with on ``gpus`` GPUs of ``gpu_bytes`` each."""

    model_id: str
    profile: Profile  # precision, context (the engine's max model length), batch (sequences at once)
    gpus: int
    gpu_bytes: int  # memory of one GPU
    usable_bytes: int  # of one GPU, what the engine may hold (gpu_bytes x usable_fraction)
    estimate: MemoryEstimate  # the whole model over all its GPUs
    per_gpu_bytes: int  # ceil(estimate.total_bytes / gpus)
    model_max_context: int | None
    notes: tuple[Message, ...] = ()

    @property
    def context_tokens(self) -> int:
        return self.profile.context_tokens


@dataclass(frozen=True)
class ExportRequest:
    """What to size for: GPU memory (bytes, per GPU), GPU count, optionally a context and a batch;
    ``accelerator`` and ``gpu_name`` name the GPU for engines that schedule by type."""

    gpu_bytes: int
    gpus: int = 1
    context: int | None = None
    batch: int | None = None
    accelerator: str | None = None
    gpu_name: str | None = None
    max_replicas: int = 2


@dataclass(frozen=True)
class ExportResult:
    """One document in an engine's format: its text (what is written to the file), the same as data,
    and the numbers it carries."""

    fmt: str
    file_name: str
    text: str
    document: Mapping[str, Any]
    fit: GpuFit
    gpu_util: float  # the fraction of each GPU the engine claims
    notes: tuple[Message, ...] = field(default=())


@runtime_checkable
class Exporter(Protocol):
    """A backend that writes documents for engines other machines run."""

    export_formats: tuple[str, ...]

    def export(self, fmt: str, model: CachedModel, request: ExportRequest) -> ExportResult: ...


def model_precision(model: CachedModel) -> Precision:
    """The precision a model is served in as stored: fp16 for a float16 checkpoint, else bf16."""
    stored = (est.read_model_spec(model.path).stored_dtype or "").lower()
    return Precision.FP16 if stored in ("float16", "half", "fp16") else Precision.BF16


def _batches(settings: Settings, usable_bytes: int, batch: int | None) -> list[int]:
    """The sequences-at-once to try: the one asked for, else the recommendation table's batch for this
    much memory (the workstation's band), halved down to 1."""
    if batch is not None:
        return [batch]
    top = max(1, band_for(usable_bytes, settings.bands).batch)
    out = []
    while top >= 1:
        out.append(top)
        top //= 2
    return out


def _profile(mode: str, precision: Precision, batch: int, gpus: int, context: int = 0) -> Profile:
    return Profile(mode=mode, precision=precision, context_tokens=context, batch=batch, device="cuda",  # type: ignore[arg-type]
                   gpu_ids=tuple(range(gpus)))


def _check_gpus(model: CachedModel, gpus: int, heads: int | None) -> None:
    if not 1 <= gpus <= MAX_GPUS:
        raise BadExportRequestError(f"{gpus} GPUs: from 1 to {MAX_GPUS} are supported",
                                    "give --gpus between 1 and 64", args={"gpus": gpus})
    if heads and heads % gpus:
        ok = ", ".join(str(n) for n in range(1, min(heads, MAX_GPUS) + 1) if heads % n == 0)
        raise BadExportRequestError(
            f"{model.model_id} has {heads} attention heads: tensor parallelism over {gpus} GPUs must divide "
            f"them", f"use a GPU count that divides {heads}: {ok}", args={"gpus": gpus, "heads": heads})


def _largest_fit(model: CachedModel, settings: Settings, *, mode: str, precision: Precision, gpus: int,
                 usable_bytes: int, batch: int, context: int | None) -> int:
    """The largest context (context given: that one, or 0) that fits ``gpus`` x ``usable_bytes``."""
    pool = usable_bytes * gpus
    p = _profile(mode, precision, batch, gpus)
    if context is not None:
        return context if est.estimate(model, p.with_(context_tokens=context), settings).total_bytes <= pool else 0
    return est.max_context_that_fits(model, pool, p, settings)


def fit_on_gpus(model: CachedModel, settings: Settings, *, mode: str, gpu_bytes: int, gpus: int = 1,
                usable_fraction: float, context: int | None = None, batch: int | None = None,
                precision: Precision | None = None) -> GpuFit:
    """Size ``model`` for ``gpus`` GPUs of ``gpu_bytes`` each, an engine holding at most ``usable_fraction``
    of each (the estimate's total is split evenly over the GPUs: tensor parallelism).

    Without ``context``: the largest context that fits, up to the model's maximum; the recommendation
    table's batch for this memory is halved (to 1) until that context reaches ``settings.ide_min_context``
    (a smaller batch is preferred to a context an IDE assistant cannot use). With ``context``: the largest
    such batch that fits it. Raises :class:`DoesNotFitError` with the numbers (and the GPU count that would
    fit, in ``args["gpus_that_fit"]``) when nothing fits, :class:`BadExportRequestError` for a request
    that can never be served (a GPU count that does not divide the attention heads, a context above the
    model's maximum).
    """
    if gpu_bytes is None or gpu_bytes <= 0:
        raise BadExportRequestError(f"GPU memory must be a positive size, got {gpu_bytes!r} bytes",
                                    "give the GPU's memory in GiB (--gpu-memory 24 for an L4, 80 for an H100)")
    if not 0 < usable_fraction <= 1:
        raise SettingsError(f"usable fraction {usable_fraction!r} must be in (0, 1]",
                            "fix the engine's utilisation settings")
    for name, value in (("context", context), ("batch", batch)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise BadExportRequestError(f"{name} must be a whole number of at least 1, got {value!r}",
                                        f"give --{'max-num-seqs' if name == 'batch' else name} 1 or more",
                                        args={name: str(value)[:40]})
    spec = est.read_model_spec(model.path)
    _check_gpus(model, gpus, spec.num_attention_heads)
    model_max = spec.max_position_embeddings
    if context is not None and model_max and context > model_max:
        raise BadExportRequestError(
            f"context {context:,} tokens exceeds the model's maximum of {model_max:,} (max_position_embeddings "
            f"of {model.model_id})", f"choose --context {model_max} or less",
            args={"context": context, "max_positions": model_max})
    precision = precision or model_precision(model)
    usable = int(gpu_bytes * usable_fraction)
    min_context = settings.ide_min_context
    batches = _batches(settings, usable, batch)
    chosen: tuple[Profile, tuple[Message, ...]] | None = None
    best: tuple[Profile, tuple[Message, ...]] | None = None
    for b in batches:
        base = _profile(mode, precision, b, gpus)
        if context is not None:
            if _largest_fit(model, settings, mode=mode, precision=precision, gpus=gpus, usable_bytes=usable,
                            batch=b, context=context):
                chosen = (base.with_(context_tokens=context), ())
                break
            continue
        sized = ide_profile(base, model_max_context=model_max, ladder=(), min_context=min_context,
                            max_context_for=lambda p: est.max_context_that_fits(model, usable * gpus, p, settings))
        if sized is None or sized[0].context_tokens < MIN_CONTEXT_TOKENS:
            continue
        target = min(min_context, model_max) if model_max else min_context
        if sized[0].context_tokens >= target:
            chosen = sized
            break
        if best is None or sized[0].context_tokens > best[0].context_tokens:
            best = sized
    chosen = chosen or best
    if chosen is None:
        raise _does_not_fit(model, settings, mode=mode, precision=precision, gpu_bytes=gpu_bytes, gpus=gpus,
                            usable_fraction=usable_fraction, context=context, heads=spec.num_attention_heads)
    profile, notes = chosen
    if batch is None and profile.batch < batches[0]:
        notes = (msg("export.batch_lowered",
                     f"{profile.batch} sequence(s) at once instead of the table's {batches[0]}, so that a context "
                     f"of {profile.context_tokens} tokens fits",
                     batch=profile.batch, table_batch=batches[0], context_tokens=profile.context_tokens), *notes)
    estimate = est.estimate(model, profile, settings)
    return GpuFit(model_id=model.model_id, profile=profile, gpus=gpus, gpu_bytes=gpu_bytes, usable_bytes=usable,
                  estimate=estimate, per_gpu_bytes=math.ceil(estimate.total_bytes / gpus),
                  model_max_context=model_max, notes=tuple(notes))


def _does_not_fit(model: CachedModel, settings: Settings, *, mode: str, precision: Precision, gpu_bytes: int,
                  gpus: int, usable_fraction: float, context: int | None, heads: int | None) -> DoesNotFitError:
    usable = int(gpu_bytes * usable_fraction)
    ctx = context or MIN_CONTEXT_TOKENS
    e = est.estimate(model, _profile(mode, precision, 1, gpus, ctx), settings)
    per_gpu = math.ceil(e.total_bytes / gpus)
    more = None
    for n in _GPU_STEPS:
        if n <= gpus or (heads and heads % n):
            continue
        fits = _largest_fit(model, settings, mode=mode, precision=precision, gpus=n, usable_bytes=usable, batch=1,
                            context=context)
        if fits >= (context or MIN_CONTEXT_TOKENS):
            more = n
            break
    what = f"a context of {context:,} tokens" if context else "any context"
    text = (f"{model.model_id} ({precision.value}) does not fit {gpus} × {fmt_bytes(gpu_bytes)} GPU"
            f"{'s' if gpus > 1 else ''} at {what}: with {ctx:,} tokens and 1 sequence it needs "
            f"{fmt_bytes(per_gpu)} per GPU ({est.describe(e)}), and an engine may hold {fmt_bytes(usable)} of each "
            f"({usable_fraction:.2f} of {fmt_bytes(gpu_bytes)})")
    if more is not None:
        hint = f"spread it over {more} GPUs with tensor parallelism: --gpus {more}"
    elif context:
        hint = "ask for a smaller --context, or a larger GPU (--gpu-memory)"
    else:
        hint = "choose a larger GPU (--gpu-memory), a quantised checkpoint or a smaller model"
    return DoesNotFitError(text, hint, needed_bytes=per_gpu, free_bytes=usable,
                           args={"gpus": gpus, "gpu_bytes": gpu_bytes, "needed_bytes": per_gpu,
                                 "usable_bytes": usable, "gpus_that_fit": more, "model": model.model_id,
                                 "context": context})


# --------------------------------------------------------------------------- finding the exporter
def exporters(fleet: Fleet) -> dict[str, Exporter]:
    """``{format: backend}`` for every configured backend that writes documents (built on first use; a
    backend that cannot be built offers nothing)."""
    out: dict[str, Exporter] = {}
    for bid in fleet.registry.ids():
        try:
            backend = fleet.backend(bid)
        except MemctlError:
            continue
        if isinstance(backend, Exporter):
            for fmt in backend.export_formats:
                out.setdefault(fmt, backend)
    return out


def default_gpu(snapshot: Any) -> tuple[int, str | None] | None:
    """(total bytes, name) of this machine's largest GPU whose memory is known, or None."""
    known = [g for g in snapshot.gpus if g.total_bytes]
    if not known:
        return None
    g = max(known, key=lambda d: d.total_bytes or 0)
    return int(g.total_bytes or 0), g.name


def export(fleet: Fleet, snapshot: Callable[[], Any], fmt: str, cached: CachedModel, *, gpu_bytes: int | None = None,
           gpus: int = 1, context: int | None = None, batch: int | None = None, accelerator: str | None = None,
           max_replicas: int = 2) -> ExportResult:
    """The document ``fmt`` for ``model`` sized for ``gpus`` GPUs of ``gpu_bytes`` each (default: the
    memory of this machine's largest GPU). Raises BadExportRequestError for an unknown format or no GPU
    size, DoesNotFitError when nothing fits, and the catalog's errors for a bad model id."""
    found = exporters(fleet)
    if fmt not in found:
        known = ", ".join(sorted(found)) or "none (no backend that writes them is configured)"
        raise BadExportRequestError(f"unknown export format {fmt!r}; known: {known}",
                                    "choose one of the known formats", args={"format": fmt})
    if cached.source in fleet.registry.ids():  # a backend's own store (Ollama's GGUF files), not a checkpoint
        raise BadExportRequestError(
            f"{cached.model_id} is a model of the {cached.source} backend's own store, not a checkpoint a cluster "
            "engine loads", "export a Hugging Face model (memctl models lists them)",
            args={"model": cached.model_id})
    gpu_name = None
    if gpu_bytes is None:
        local = default_gpu(snapshot())
        if local is None:
            raise BadExportRequestError("no GPU with known memory on this machine to size for",
                                        "give the cluster GPU's memory: --gpu-memory 24 (an L4), 80 (an H100)")
        gpu_bytes, gpu_name = local
    if not 1 <= max_replicas <= 1000:
        raise BadExportRequestError(f"{max_replicas} replicas: from 1 to 1000 are supported",
                                    "give --max-replicas between 1 and 1000")
    request = ExportRequest(gpu_bytes=int(gpu_bytes), gpus=gpus, context=context, batch=batch,
                            accelerator=accelerator, gpu_name=gpu_name, max_replicas=max_replicas)
    return found[fmt].export(fmt, cached, request)


def gib(n_bytes: int) -> str:
    """``24`` or ``79.6`` — GiB for a comment or a file name."""
    v = n_bytes / GIB
    return f"{v:.0f}" if abs(v - round(v)) < 0.05 else f"{v:.1f}"
