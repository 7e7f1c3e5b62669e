"""Model-aware memory estimator: pure, reads ``config.json`` and safetensors *headers* only.

Nothing here imports torch or reads a weight. A safetensors file starts with an 8-byte little-endian
header length followed by a JSON header (tensor name -> dtype, shape, data offsets), so a model of a
few hundred tensors is described in a few milliseconds whatever its size.

Byte rules (checked against real loads in ``tests/test_estimate.py``):

* fp32 / fp16 / bf16: every floating tensor is held in the chosen dtype; integer tensors as stored.
* bitsandbytes (int8, nf4, fp4): only Linear weights (2-D ``*.weight`` tensors that are not the input
  embeddings nor the output head) are quantised; embeddings, norms, biases and ``lm_head`` stay in
  16-bit (the compute dtype). Quantisation state is counted too: int8 keeps one fp32 scale per output
  row (``SCB``); 4-bit keeps one fp32 ``absmax`` per block of 64 weights plus a 16-entry code table,
  or with double quantisation one uint8 ``absmax`` per block, one fp32 per 256 blocks, a 256-entry
  code table and an offset.
* Tied input/output embeddings are counted once.
* Rotary embeddings add two small fp32 buffers (``inv_freq``) that are not in the weight files.

KV cache bytes = 2 x layers x kv_heads x head_dim x context x sequences x bytes per element (FACTS.md),
honouring grouped-query attention (``num_key_value_heads``) and an explicit ``head_dim``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MemctlError, ModelLoadError
from .types import CachedModel, MemoryEstimate, Precision, Profile
from .units import MIB, fmt_bytes

if TYPE_CHECKING:  # settings import pydantic; only the type is needed here
    from .settings import Settings

# safetensors dtype -> bits per element
_SAFETENSORS_BITS: dict[str, int] = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
    "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8,
}
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4"})
# config "dtype"/"torch_dtype" -> bytes per element (for the no-safetensors fallback)
_CONFIG_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_MAX_HEADER_BYTES = 100 * MIB  # the safetensors format caps the header at 100 MB too

BNB_4BIT_BLOCKSIZE = 64  # bitsandbytes Params4bit default
BNB_DQ_BLOCKSIZE = 256  # nested (double) quantisation block of absmax values
_BNB_4BIT_CODE_BYTES = 16 * 4  # fp32 lookup table per quantised layer
_BNB_DQ_CODE_BYTES = 256 * 4

_EMBED_MARKERS = ("embed", "wte.", "wpe.", "word_embeddings", "position_embeddings", "shared.")
_OUTPUT_HEAD_NAMES = ("lm_head.weight", "output.weight", "embed_out.weight")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it."""

    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_bytes(self) -> int:
        return (self.numel * _SAFETENSORS_BITS[self.dtype] + 7) // 8

    @property
    def is_float(self) -> bool:
        return self.dtype in _FLOAT_DTYPES


@dataclass(frozen=True)
class ModelSpec:
    """What the estimator knows about a model directory (from config + weight headers)."""

    path: str
    architecture: str | None
    model_type: str | None
    num_layers: int | None
    num_attention_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    hidden_size: int | None
    vocab_size: int | None
    tie_word_embeddings: bool
    max_position_embeddings: int | None
    stored_dtype: str | None  # config's dtype ("bfloat16"...) if it says
    has_rope: bool
    prequantized: str | None  # config.quantization_config.quant_method, if the checkpoint is quantised
    source: str  # "safetensors_headers" | "weight_files"
    tensors: tuple[TensorInfo, ...]
    weight_files: tuple[tuple[str, int], ...]  # (file name, size in bytes)
    notes: tuple[str, ...] = field(default=())

    @property
    def weight_file_bytes(self) -> int:
        return sum(size for _name, size in self.weight_files)

    @property
    def kv_bytes_per_token_element(self) -> int | None:
        """2 x layers x kv_heads x head_dim: elements of KV cache per token per sequence."""
        if not (self.num_layers and self.num_kv_heads and self.head_dim):
            return None
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


# --------------------------------------------------------------------------- reading

_cache_lock = threading.Lock()
_spec_cache: dict[str, tuple[tuple, ModelSpec]] = {}


def _listing(path: Path) -> list[tuple[str, os.stat_result]]:
    out = []
    for entry in os.scandir(path):
        if entry.name == "config.json" or entry.name.endswith(_WEIGHT_FILE_SUFFIXES) or entry.name.endswith(
            ".index.json"
        ):
            try:
                out.append((entry.name, entry.stat()))  # follows the HF cache's symlinks to the blobs
            except OSError:
                out.append((entry.name, None))  # broken symlink: reported by _read_spec
    return sorted(out, key=lambda x: x[0])


def read_model_spec(path: str | os.PathLike[str]) -> ModelSpec:
    """Describe the model in directory ``path`` from ``config.json`` and the weight headers.

    Cached by path and the (mtime, size) of config and weight files, so a re-estimate is free.
    Raises :class:`ModelLoadError` when the directory, the config or the weights are missing,
    unreadable or truncated (a safetensors header that points past the end of its file).
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelLoadError(f"model directory {p} does not exist", "pick a model from `memctl models`")
    listing = _listing(p)
    signature = tuple((n, None if st is None else (st.st_mtime_ns, st.st_size)) for n, st in listing)
    key = str(p.resolve())
    with _cache_lock:
        hit = _spec_cache.get(key)
    if hit is not None and hit[0] == signature:
        return hit[1]
    spec = _read_spec(p, listing)
    with _cache_lock:
        _spec_cache[key] = (signature, spec)
    return spec


def clear_spec_cache() -> None:
    """Forget every cached :class:`ModelSpec` (tests and benchmarks time cold reads with it)."""
    with _cache_lock:
        _spec_cache.clear()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{path} is unreadable or not valid JSON ({exc})",
            "the download is incomplete or corrupt: download the model again",
        ) from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object", "download the model again")
    return data


def _first_int(cfg: dict[str, Any], *keys: str) -> int | None:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def read_safetensors_header(path: Path) -> tuple[TensorInfo, ...]:
    """Tensors described by one safetensors file's header; reads the header bytes only.

    Raises :class:`ModelLoadError` when the file is shorter than its header says (truncated
    download) or the header is not a valid safetensors header.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"weights file {path.name} in {path.parent} is truncated or corrupt ({exc})",
            "the download is incomplete: delete this model from the cache and download it again",
        ) from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"weights file {path} has an invalid header", "download the model again")
    tensors = []
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(
                f"weights file {path} has an invalid entry for tensor {name!r}", "download the model again"
            ) from None
        if dtype not in _SAFETENSORS_BITS:
            raise ModelLoadError(f"weights file {path}: tensor {name!r} has unknown dtype {dtype}",
                                 "update memctl or use a model in a standard dtype")
        t = TensorInfo(name, dtype, shape)
        if end - start != t.stored_bytes or start < 0:
            raise ModelLoadError(f"weights file {path}: tensor {name!r} offsets do not match its shape",
                                 "the file is corrupt: download the model again")
        data_end = max(data_end, end)
        tensors.append(t)
    if 8 + header_len + data_end > size:
        raise ModelLoadError(
            f"weights file {path.name} in {path.parent} is truncated: the header needs "
            f"{8 + header_len + data_end} bytes, the file has {size}",
            "the download is incomplete: delete this model from the cache and download it again",
        )
    return tuple(tensors)


def _read_spec(p: Path, listing: list[tuple[str, os.stat_result | None]]) -> ModelSpec:
    names = {n: st for n, st in listing}
    if "config.json" not in names:
        raise ModelLoadError(f"{p} has no config.json", "this is not a Transformers model directory")
    if names["config.json"] is None:
        raise ModelLoadError(f"config.json in {p} is a broken link (missing blob)", "download the model again")
    cfg = _read_json(p / "config.json")
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
    arch_cfg = cfg if _first_int(cfg, "num_hidden_layers", "n_layer", "num_layers") or not text_cfg else text_cfg

    notes: list[str] = []
    broken = [n for n, st in listing if st is None]
    if broken:
        raise ModelLoadError(f"{p}: weight file(s) {', '.join(broken)} are broken links (missing blobs)",
                             "the download is incomplete: download the model again")

    st_files = [n for n in names if n.endswith(".safetensors")]
    index_name = "model.safetensors.index.json"
    if index_name in names and st_files:
        index = _read_json(p / index_name)
        wanted = sorted(set((index.get("weight_map") or {}).values()))
        missing = [w for w in wanted if w not in names]
        if missing:
            raise ModelLoadError(f"{p}: shard(s) {', '.join(missing)} listed in {index_name} are missing",
                                 "the download is incomplete: download the model again")
        st_files = wanted
    other_files = [n for n in names if n.endswith(_WEIGHT_FILE_SUFFIXES) and not n.endswith(".safetensors")]

    tensors: list[TensorInfo] = []
    if st_files:
        source = "safetensors_headers"
        weight_files = tuple((n, names[n].st_size) for n in sorted(st_files))
        for n in sorted(st_files):
            tensors.extend(read_safetensors_header(p / n))
    elif other_files:
        source = "weight_files"
        weight_files = tuple((n, names[n].st_size) for n in sorted(other_files))
        notes.append(
            "no safetensors weights: estimated from weight-file sizes "
            f"({', '.join(n for n, _ in weight_files)}), less exact"
        )
    else:
        raise ModelLoadError(
            f"{p} has a config but no weight files (*.safetensors, *.bin)",
            "the download is incomplete: download the model again",
        )

    heads = _first_int(arch_cfg, "num_attention_heads", "n_head", "num_heads")
    hidden = _first_int(arch_cfg, "hidden_size", "n_embd", "d_model")
    kv_heads = _first_int(arch_cfg, "num_key_value_heads", "n_head_kv", "num_kv_heads", "multi_query_group_num")
    if kv_heads is None and arch_cfg.get("multi_query") is True:
        kv_heads = 1
    if kv_heads is None:
        kv_heads = heads
    head_dim = _first_int(arch_cfg, "head_dim")
    if head_dim is None and hidden and heads:
        head_dim = hidden // heads
    layers = _first_int(arch_cfg, "num_hidden_layers", "n_layer", "num_layers")
    if not (layers and kv_heads and head_dim):
        notes.append("config lacks layers/heads: KV cache cannot be estimated and is counted as 0")
    archs = cfg.get("architectures")
    architecture = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    tie = cfg.get("tie_word_embeddings", arch_cfg.get("tie_word_embeddings", True))
    stored = cfg.get("dtype") or cfg.get("torch_dtype") or arch_cfg.get("dtype") or arch_cfg.get("torch_dtype")
    qc = cfg.get("quantization_config")
    prequant = None
    if isinstance(qc, dict):
        prequant = str(qc.get("quant_method") or "unknown")
        notes.append(f"checkpoint is already quantised ({prequant}): weights counted as stored")
    has_rope = any(k in arch_cfg for k in ("rope_theta", "rope_parameters", "rope_scaling"))
    return ModelSpec(
        path=str(p),
        architecture=architecture,
        model_type=cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else None,
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=_first_int(arch_cfg, "vocab_size"),
        tie_word_embeddings=bool(tie),
        max_position_embeddings=_first_int(arch_cfg, "max_position_embeddings", "n_positions", "seq_length"),
        stored_dtype=stored if isinstance(stored, str) else None,
        has_rope=has_rope,
        prequantized=prequant,
        source=source,
        tensors=tuple(tensors),
        weight_files=weight_files,
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------- arithmetic


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


def weights_bytes(spec: ModelSpec, precision: Precision, double_quant: bool = False) -> tuple[int, int, tuple[str, ...]]:
    """Bytes the loaded weights hold (parameters + buffers + quantisation state).

    Returns ``(bytes, parameters, notes)``. Only 4-bit precisions use ``double_quant``.
    """
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


def _totals(weights: int, kv: int, profile: Profile, settings: Settings) -> tuple[int, int, int]:
    """(activation, cuda_context, total) for given weights and KV bytes."""
    activation = max(
        int((weights + kv) * settings.activation_overhead_fraction),
        settings.activation_overhead_min_mib * MIB,
    )
    cuda = settings.cuda_context_reserve_bytes * _gpu_count(profile) if profile.device == "cuda" else 0
    return activation, cuda, weights + kv + activation + cuda


def estimate(model: CachedModel, profile: Profile, settings: Settings) -> MemoryEstimate:
    """Bytes ``model`` needs under ``profile``: weights, KV cache, activations, CUDA context, total.

    The CUDA context reserve (``settings.cuda_context_reserve_bytes`` per GPU in ``profile.gpu_ids``,
    one when unset) is added only when ``profile.device == "cuda"``. Activations are
    ``max(fraction x (weights + KV), min MiB)`` from settings.
    Raises :class:`ModelLoadError` (missing/corrupt files) or :class:`MemctlError` (invalid profile).
    """
    _check_profile(profile)
    spec = read_model_spec(model.path)
    notes = list(spec.notes)
    if profile.double_quant and not profile.precision.is_4bit:
        notes.append(f"double quantisation applies to 4-bit only; ignored for {profile.precision.value}")
    weights, params, wnotes = weights_bytes(spec, profile.precision, profile.double_quant)
    notes.extend(wnotes)
    kv = kv_cache_bytes(spec, profile.context_tokens, profile.batch, dense_bytes_per_element(profile.precision))
    activation, cuda, total = _totals(weights, kv, profile, settings)
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
        return _totals(weights, kv_cache_bytes(spec, ctx, profile.batch, bpe), profile, settings)[2]

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
