"""Bytes the loaded weights hold per precision, and the KV cache formula (pure arithmetic)."""

from __future__ import annotations

import threading

from memory_controller.errors import MemctlError
from memory_controller.types import Precision

from .files import TensorInfo
from .spec import ModelSpec

# config "dtype"/"torch_dtype" -> bytes per element (for the no-safetensors fallback)
_CONFIG_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}

BNB_4BIT_BLOCKSIZE = 64  # bitsandbytes Params4bit default
BNB_DQ_BLOCKSIZE = 256  # nested (double) quantisation block of absmax values
_BNB_4BIT_CODE_BYTES = 16 * 4  # fp32 lookup table per quantised layer
_BNB_DQ_CODE_BYTES = 256 * 4

_EMBED_MARKERS = ("embed", "wte.", "wpe.", "word_embeddings", "position_embeddings", "shared.")
_OUTPUT_HEAD_NAMES = ("lm_head.weight", "output.weight", "embed_out.weight")


def dense_bytes_per_element(precision: Precision) -> int:
    """Bytes per element of tensors that stay dense: 4 for fp32, else 2 (quantised models compute in 16-bit)."""
    return 4 if precision is Precision.FP32 else 2


def _is_output_head(name: str) -> bool:
    return name in _OUTPUT_HEAD_NAMES or name.endswith(".lm_head.weight")


def _is_embedding(name: str) -> bool:
    return any(m in name for m in _EMBED_MARKERS)


def _is_quantisable_linear(t: TensorInfo) -> bool:
    return (
        t.is_float
        and len(t.shape) == 2
        and t.name.endswith(".weight")
        and not _is_output_head(t.name)
        and not _is_embedding(t.name)
    )


def _quantised_linear_bytes(t: TensorInfo, precision: Precision, double_quant: bool) -> int:
    n = t.numel
    if precision is Precision.INT8:
        return n + 4 * t.shape[0]  # int8 weights + fp32 scale per output row (SCB)
    packed = (n + 1) // 2
    blocks = -(-n // BNB_4BIT_BLOCKSIZE)
    if not double_quant:
        return packed + 4 * blocks + _BNB_4BIT_CODE_BYTES
    blocks2 = -(-blocks // BNB_DQ_BLOCKSIZE)
    return packed + blocks + 4 * blocks2 + _BNB_DQ_CODE_BYTES + _BNB_4BIT_CODE_BYTES + 4  # + fp32 offset


# (id(spec), precision, double_quant) -> (spec, result): read_model_spec hands out the same spec object
# while a model's files are unchanged, so a dashboard rerun that estimates every model walks no tensors.
_memo: dict[tuple[int, Precision, bool], tuple[ModelSpec, tuple[int, int, tuple[str, ...]]]] = {}
_memo_lock = threading.Lock()


def weights_bytes(spec: ModelSpec, precision: Precision, double_quant: bool = False) -> tuple[int, int, tuple[str, ...]]:
    """Bytes the loaded weights hold (parameters + buffers + quantisation state).

    Returns ``(bytes, parameters, notes)``. Only 4-bit precisions use ``double_quant``. Memoised per
    spec object (pure: the same spec always gives the same answer).
    """
    key = (id(spec), precision, bool(double_quant))
    with _memo_lock:
        hit = _memo.get(key)
    if hit is not None and hit[0] is spec:
        return hit[1]
    result = _weights_bytes(spec, precision, double_quant)
    with _memo_lock:
        if len(_memo) > 20_000:
            _memo.clear()
        _memo[key] = (spec, result)
    return result


def _weights_bytes(spec: ModelSpec, precision: Precision, double_quant: bool) -> tuple[int, int, tuple[str, ...]]:
    dense = dense_bytes_per_element(precision)
    notes: list[str] = []
    if spec.source != "safetensors_headers":
        return (*_weights_from_files(spec, precision, double_quant), tuple(notes))
    tensors = list(spec.tensors)
    names = {t.name for t in tensors}
    if spec.tie_word_embeddings:
        # A tied head is one tensor in memory; some checkpoints still store both copies.
        has_embed = any(_is_embedding(n) and not _is_output_head(n) for n in names)
        if has_embed:
            tensors = [t for t in tensors if not _is_output_head(t.name)]
    total = 0
    params = 0
    for t in tensors:
        params += t.numel
        if spec.prequantized:
            total += t.stored_bytes
        elif precision.is_quantized and _is_quantisable_linear(t):
            total += _quantised_linear_bytes(t, precision, double_quant and precision.is_4bit)
        elif t.is_float:
            total += t.numel * dense
        else:
            total += t.stored_bytes
    if spec.has_rope and spec.head_dim:
        total += 2 * (spec.head_dim // 2) * 4  # inv_freq + original_inv_freq buffers, fp32
    return total, params, tuple(notes)


def _weights_from_files(spec: ModelSpec, precision: Precision, double_quant: bool) -> tuple[int, int]:
    """Fallback without headers: parameters from file sizes and the config's stored dtype."""
    stored_bpe = _CONFIG_DTYPE_BYTES.get((spec.stored_dtype or "float32").lower(), 4)
    params = spec.weight_file_bytes // stored_bpe
    dense = dense_bytes_per_element(precision)
    if not precision.is_quantized:
        return params * dense, params
    embed = 0
    if spec.vocab_size and spec.hidden_size:
        embed = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
    linear = max(params - embed, 0)
    if precision is Precision.INT8:
        per = 1.0 + (4.0 / spec.hidden_size if spec.hidden_size else 0.0)
    elif double_quant:
        per = 0.5 + 1.0 / BNB_4BIT_BLOCKSIZE + 4.0 / (BNB_4BIT_BLOCKSIZE * BNB_DQ_BLOCKSIZE)
    else:
        per = 0.5 + 4.0 / BNB_4BIT_BLOCKSIZE
    return int(embed * dense + linear * per), params


def kv_cache_bytes(spec: ModelSpec, context_tokens: int, sequences: int, bytes_per_element: int) -> int:
    """KV cache bytes: 2 x layers x kv_heads x head_dim x context x sequences x bytes per element.

    Returns 0 when the config does not say layers/heads (the spec carries a note then).
    Raises :class:`MemctlError` for negative context or sequences.
    """
    if context_tokens < 0 or sequences < 0 or bytes_per_element <= 0:
        raise MemctlError(
            f"invalid KV cache request: context {context_tokens}, sequences {sequences}, "
            f"{bytes_per_element} bytes per element",
            "context and sequences must be >= 0, bytes per element > 0",
        )
    per = spec.kv_bytes_per_token_element
    if per is None:
        return 0
    return per * context_tokens * sequences * bytes_per_element
