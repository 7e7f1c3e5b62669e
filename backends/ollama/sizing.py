"""Bytes an Ollama model takes at a given ``num_ctx``: weights + KV cache + compute graph + reserve.

* Weights: the model blob's tensors (GGUF, already quantised) plus any projector blob.
* KV cache, per layer: ``kv_heads × ctx × (key_length × bytes(K) + value_length × bytes(V))`` — for a
  plain model exactly ``2 × layers × kv_heads × head_dim × num_ctx × parallel × bytes per element``.
  Bytes per element: f16 2, q8_0 34/32, q4_0 18/32 (``OLLAMA_KV_CACHE_TYPE``); V is quantised only with
  flash attention (``OLLAMA_FLASH_ATTENTION``), K always. ``ctx = num_ctx × parallel``
  (``OLLAMA_NUM_PARALLEL``); a sliding-window layer holds ``min(ctx, pad256(window × parallel + 512))``
  cells (llama.cpp's SWA cache); a layer with ``head_count_kv = 0`` (recurrent layer of a hybrid) none.
* Compute graph: Ollama's own default (``fs/ggml`` GraphSize): ``max(4·b·(1 + 4·embd + ctx·(1 + heads)),
  4·b·(embd + vocab))`` with ``b = min(num_ctx, 512)``.
* Reserve: 457 MiB per CUDA GPU (Ollama's minimum free memory per GPU); none on the CPU.

``/api/ps``'s ``size`` is weights + KV + graph (the reserve is not in it): :func:`reported_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gguf_spec import GgufSpec

MIB = 1024 * 1024
GPU_RESERVE_BYTES = 457 * MIB
NUM_BATCH = 512
MIN_CONTEXT = 2048  # below this an agent cannot work: "does not fit" rather than a useless window
CONTEXT_STEP = 1024

# bytes per element as (numerator, denominator): ggml's block sizes (q8_0: 32 int8 + fp16 scale = 34 bytes)
KV_TYPES: dict[str, tuple[int, int]] = {"f16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}


@dataclass(frozen=True)
class KvConfig:
    """The Ollama server's cache settings (its environment, not per request)."""

    cache_type: str = "f16"
    flash_attention: bool = False
    parallel: int = 1

    def __post_init__(self) -> None:
        if self.cache_type not in KV_TYPES:
            raise ValueError(f"KV cache type {self.cache_type!r} is not one of {', '.join(KV_TYPES)}")
        if self.parallel < 1:
            raise ValueError("parallel must be at least 1")

    @property
    def k_type(self) -> str:
        return self.cache_type

    @property
    def v_type(self) -> str:
        return self.cache_type if self.flash_attention else "f16"


def _pad(n: int, to: int = 256) -> int:
    return -(-n // to) * to


def layer_cells(spec: GgufSpec, layer: int, num_ctx: int, parallel: int) -> int:
    ctx = num_ctx * parallel
    if spec.is_swa(layer):
        return min(ctx, _pad(int(spec.sliding_window or 0) * parallel + NUM_BATCH))
    return ctx


def kv_bytes(spec: GgufSpec, num_ctx: int, kv: KvConfig = KvConfig()) -> int:
    """KV cache bytes at ``num_ctx`` (see the module docstring)."""
    kn, kd = KV_TYPES[kv.k_type]
    vn, vd = KV_TYPES[kv.v_type]
    total_k = total_v = 0  # elements
    for layer in range(spec.block_count):
        heads = spec.head_count_kv[layer]
        if not heads:
            continue
        cells = layer_cells(spec, layer, num_ctx, kv.parallel)
        total_k += heads * spec.key_length * cells
        total_v += heads * spec.value_length * cells
    return -(-total_k * kn // kd) + -(-total_v * vn // vd)


def graph_bytes(spec: GgufSpec, num_ctx: int, parallel: int = 1) -> int:
    ctx = num_ctx * parallel
    b = min(num_ctx, NUM_BATCH)
    vocab = spec.vocab_size or 0
    return max(4 * b * (1 + 4 * spec.embedding_length + ctx * (1 + spec.head_count)),
               4 * b * (spec.embedding_length + vocab))


@dataclass(frozen=True)
class Sizing:
    num_ctx: int
    weights_bytes: int  # model blob + projector
    kv_bytes: int
    graph_bytes: int
    reserve_bytes: int  # per-GPU reserve (0 on the CPU)
    calibration_bytes: int = 0  # measured minus estimated at the last load (see calibration.py)

    @property
    def reported_bytes(self) -> int:
        """What ``/api/ps`` should report as ``size`` (no reserve)."""
        return self.weights_bytes + self.kv_bytes + self.graph_bytes + self.calibration_bytes

    @property
    def total_bytes(self) -> int:
        return self.reported_bytes + self.reserve_bytes


def size(spec: GgufSpec, num_ctx: int, kv: KvConfig = KvConfig(), *, gpu: bool = True,
         calibration_bytes: int = 0) -> Sizing:
    return Sizing(num_ctx, spec.weights_bytes + spec.projector_bytes, kv_bytes(spec, num_ctx, kv),
                  graph_bytes(spec, num_ctx, kv.parallel), GPU_RESERVE_BYTES if gpu else 0, calibration_bytes)


def max_context(spec: GgufSpec, free_bytes: int, kv: KvConfig = KvConfig(), *, gpu: bool = True,
                calibration_bytes: int = 0, step: int = CONTEXT_STEP, floor: int = MIN_CONTEXT) -> int:
    """The largest ``num_ctx`` (a multiple of ``step``, at most the trained context) whose total fits
    ``free_bytes``; 0 when not even ``floor`` tokens fit."""
    top = spec.context_length or 131072
    top = max(floor, top // step * step) if top >= floor else top

    def fits(n: int) -> bool:
        return size(spec, n, kv, gpu=gpu, calibration_bytes=calibration_bytes).total_bytes <= free_bytes

    low = min(floor, top)
    if not fits(low):
        return 0
    if fits(top):
        return top
    lo, hi = low, top  # fits(lo), not fits(hi)
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def quantised_kv_advice(spec: GgufSpec, free_bytes: int, kv: KvConfig, want: int, *, gpu: bool = True,
                        calibration_bytes: int = 0) -> tuple[str, int] | None:
    """The first quantised KV type (q8_0, then q4_0; with flash attention) whose largest context reaches
    ``want`` tokens: (type, context). None when none does or it already does."""
    for t in ("q8_0", "q4_0"):
        (n, d), (cn, cd) = KV_TYPES[t], KV_TYPES[kv.cache_type]
        if n * cd >= cn * d:  # not smaller than what the server uses now
            continue
        other = KvConfig(t, True, kv.parallel)
        n = max_context(spec, free_bytes, other, gpu=gpu, calibration_bytes=calibration_bytes)
        if n >= want:
            return t, n
    return None


def tag_suffix(num_ctx: int) -> str:
    """``32k`` for 32768, ``1536`` for 1536: the visible part of a derived tag."""
    return f"{num_ctx // 1024}k" if num_ctx % 1024 == 0 else str(num_ctx)
