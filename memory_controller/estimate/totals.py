"""The full estimate (weights + KV + activations + CUDA context), the largest context that fits,
and the one-line description the CLI and the log print."""

from __future__ import annotations

from typing import TYPE_CHECKING

from memory_controller.errors import MemctlError
from memory_controller.types import CachedModel, MemoryEstimate, Precision, Profile
from memory_controller.units import MIB, fmt_bytes

from .spec import ModelSpec, read_model_spec
from .weights import dense_bytes_per_element, kv_cache_bytes, weights_bytes

if TYPE_CHECKING:  # settings import pydantic; only the type is needed here
    from memory_controller.settings import Settings


def _check_profile(profile: Profile) -> None:
    if profile.context_tokens < 0 or profile.batch < 1:
        raise MemctlError(
            f"invalid profile: context {profile.context_tokens} tokens, batch {profile.batch}",
            "context must be >= 0 and batch >= 1",
        )
    if profile.device not in ("cuda", "cpu"):
        raise MemctlError(f"invalid profile device {profile.device!r}", "use 'cuda' or 'cpu'")


def _gpu_count(profile: Profile) -> int:
    return max(1, len(profile.gpu_ids)) if profile.gpu_ids else 1


def prefill_bytes(spec: ModelSpec, context_tokens: int, batch: int, precision: Precision) -> int:
    """Working memory of a prefill over the whole context, one layer at a time: the MLP's gate, up and
    activated tensors (3 x intermediate) plus hidden states, residual and attention in/out (4 x hidden) per
    token, in the compute dtype (fp32 for fp32, else 16-bit), plus the last token's logits in fp32."""
    if not spec.hidden_size:
        return 0
    width = 3 * (spec.intermediate_size or 4 * spec.hidden_size) + 4 * spec.hidden_size
    act = 4 if precision is Precision.FP32 else 2
    return batch * context_tokens * width * act + batch * (spec.vocab_size or 0) * 4


def _totals(weights: int, kv: int, profile: Profile, settings: Settings, prefill: int = 0) -> tuple[int, int, int]:
    """(activation, cuda_context, total) for given weights, KV and prefill bytes: activations are the
    larger of the configured allowance and the prefill's working memory."""
    activation = max(
        int((weights + kv) * settings.activation_overhead_fraction),
        settings.activation_overhead_min_mib * MIB,
        prefill,
    )
    cuda = settings.cuda_context_reserve_bytes * _gpu_count(profile) if profile.device == "cuda" else 0
    return activation, cuda, weights + kv + activation + cuda


def estimate(model: CachedModel, profile: Profile, settings: Settings) -> MemoryEstimate:
    """Bytes ``model`` needs under ``profile``: weights, KV cache, activations, CUDA context, total.

    The CUDA context reserve (``settings.cuda_context_reserve_bytes`` per GPU in ``profile.gpu_ids``,
    one when unset) is added only when ``profile.device == "cuda"``. Activations are
    ``max(fraction x (weights + KV), min MiB, prefill working memory)`` (see :func:`prefill_bytes`).
    Raises :class:`ModelLoadError` (missing/corrupt files; ``CorruptModelFileError`` for malformed
    ones) or :class:`MemctlError` (invalid profile).
    """
    _check_profile(profile)
    spec = read_model_spec(model.path)
    notes = list(spec.notes)
    if profile.double_quant and not profile.precision.is_4bit:
        notes.append(f"double quantisation applies to 4-bit only; ignored for {profile.precision.value}")
    weights, params, wnotes = weights_bytes(spec, profile.precision, profile.double_quant)
    notes.extend(wnotes)
    kv = kv_cache_bytes(spec, profile.context_tokens, profile.batch, dense_bytes_per_element(profile.precision))
    prefill = prefill_bytes(spec, profile.context_tokens, profile.batch, profile.precision)
    activation, cuda, total = _totals(weights, kv, profile, settings, prefill)
    if spec.max_position_embeddings and profile.context_tokens > spec.max_position_embeddings:
        notes.append(
            f"context {profile.context_tokens} exceeds the model's maximum {spec.max_position_embeddings} tokens"
        )
    return MemoryEstimate(
        model_id=model.model_id,
        profile=profile,
        weights_bytes=weights,
        kv_cache_bytes=kv,
        activation_bytes=activation,
        cuda_context_bytes=cuda,
        total_bytes=total,
        parameters=params,
        source=spec.source,
        notes=tuple(notes),
    )


def max_context_that_fits(model: CachedModel, free_bytes: int, profile: Profile, settings: Settings) -> int:
    """Largest context (tokens) whose estimate under ``profile`` fits in ``free_bytes``.

    Capped at the model's ``max_position_embeddings`` (2**20 when the config does not say).
    Returns 0 when even the weights (with a one-token context) do not fit.
    """
    _check_profile(profile.with_(context_tokens=0))
    spec = read_model_spec(model.path)
    weights, _params, _notes = weights_bytes(spec, profile.precision, profile.double_quant)
    bpe = dense_bytes_per_element(profile.precision)

    def total(ctx: int) -> int:
        kv = kv_cache_bytes(spec, ctx, profile.batch, bpe)
        return _totals(weights, kv, profile, settings, prefill_bytes(spec, ctx, profile.batch, profile.precision))[2]

    cap = spec.max_position_embeddings or 1 << 20
    if total(1) > free_bytes:
        return 0
    if total(cap) <= free_bytes:
        return cap
    lo, hi = 1, cap  # total(lo) fits, total(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if total(mid) <= free_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def describe(est: MemoryEstimate) -> str:
    """One line for logs and the CLI: ``weights 1.2 GiB + KV 256 MiB + ... = total``."""
    return (
        f"weights {fmt_bytes(est.weights_bytes)} + KV {fmt_bytes(est.kv_cache_bytes)} + activations "
        f"{fmt_bytes(est.activation_bytes)} + CUDA context {fmt_bytes(est.cuda_context_bytes)} = "
        f"{fmt_bytes(est.total_bytes)}"
    )
