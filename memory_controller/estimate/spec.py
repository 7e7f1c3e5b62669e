"""Reading a model directory into a :class:`ModelSpec`: ``config.json``, the shard index and the
safetensors headers, all untrusted and all validated.

Every JSON from disk goes through :func:`~memory_controller.safejson.loads_bounded` (depth and size
limits, no NaN/Infinity); safetensors headers are checked entry by entry (known dtype, whole
non-negative dimensions, offsets that match the shape and lie inside the file). A file that fails a
check raises :class:`CorruptModelFileError`: never a ``RecursionError``, never negative parameters.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memory_controller.errors import CorruptDataError, ModelLoadError
from memory_controller.safejson import MAX_BYTES, loads_bounded
from memory_controller.units import MIB

# safetensors dtype -> bits per element
SAFETENSORS_BITS: dict[str, int] = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
    "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4"})
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_MAX_HEADER_BYTES = 100 * MIB  # the safetensors format caps the header at 100 MB too
_MAX_RANK = 16  # dimensions of one tensor
_MAX_DIM = 1 << 48  # one dimension; a real one is far smaller
_MAX_CONFIG_INT = 1 << 40  # a layer count, head count or position limit above this is not a model
_REDOWNLOAD = "the file is corrupt: delete this model from the cache and download it again"


class CorruptModelFileError(CorruptDataError, ModelLoadError):
    """A model file (config, index, safetensors header) is malformed: corrupt data that stops a load."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it (validated: known dtype, dims >= 0)."""

    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_bytes(self) -> int:
        return (self.numel * SAFETENSORS_BITS[self.dtype] + 7) // 8

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


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


# --------------------------------------------------------------------------- cache

_cache_lock = threading.Lock()
_spec_cache: dict[str, tuple[tuple, ModelSpec]] = {}


def _listing(path: Path) -> list[tuple[str, os.stat_result | None]]:
    out = []
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except (FileNotFoundError, NotADirectoryError):
        raise ModelLoadError(f"model directory {path} does not exist", "pick a model from `memctl models`") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read the model directory {path} ({exc.strerror or exc})",
                             "check the folder exists and is readable") from None
    for entry in entries:
        if entry.name == "config.json" or entry.name.endswith(WEIGHT_FILE_SUFFIXES) or entry.name.endswith(
            ".index.json"
        ):
            try:
                out.append((entry.name, entry.stat()))  # follows the HF cache's symlinks to the blobs
            except OSError:
                out.append((entry.name, None))  # broken symlink or a loop: reported by _read_spec
    return sorted(out, key=lambda x: x[0])


def read_model_spec(path: str | os.PathLike[str]) -> ModelSpec:
    """Describe the model in directory ``path`` from ``config.json`` and the weight headers.

    Cached by path and the (mtime, size) of config and weight files, so a re-estimate is free.
    Raises :class:`ModelLoadError` when the directory, the config or the weights are missing,
    unreadable or truncated, and :class:`CorruptModelFileError` (a ``ModelLoadError`` and a
    ``CorruptDataError``) when a file is malformed: nested too deep, over a size limit, a header with
    negative or non-whole dimensions, an unknown dtype or offsets outside the file.
    """
    p = Path(path).expanduser()
    listing = _listing(p)  # one listing + a stat per model file: the cache check costs no more
    signature = tuple((n, None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino)) for n, st in listing)
    key = str(p)
    with _cache_lock:
        hit = _spec_cache.get(key)
    if hit is not None and hit[0] == signature:
        return hit[1]
    spec = _read_spec(p, listing)
    with _cache_lock:
        if len(_spec_cache) > 20_000:
            _spec_cache.clear()
        _spec_cache[key] = (signature, spec)
    return spec


def clear_spec_cache() -> None:
    """Forget every cached :class:`ModelSpec` (tests and benchmarks time cold reads with it)."""
    with _cache_lock:
        _spec_cache.clear()


# --------------------------------------------------------------------------- bounded reads


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """At most ``max_bytes`` of a regular file (never blocks on a FIFO or reads a device).

    Raises OSError when unreadable, ValueError when not a regular file or over the limit.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > max_bytes:
            raise ValueError(f"{st.st_size} bytes is over the {max_bytes}-byte limit")
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(max_bytes + 1)
    finally:
        os.close(fd)


def read_json_file(path: Path, *, max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """A JSON object from disk, bounded; raises ModelLoadError / CorruptModelFileError naming the file."""
    try:
        raw = read_regular_file(path, max_bytes)
    except OSError as exc:
        raise ModelLoadError(
            f"{path} is unreadable ({exc.strerror or exc})",
            "the download is incomplete or corrupt: download the model again",
        ) from None
    except ValueError as exc:
        raise CorruptModelFileError(f"{path} is unreadable ({exc})", _REDOWNLOAD) from None
    try:
        return loads_bounded(raw, what=str(path), max_bytes=max_bytes, expect=dict)
    except CorruptDataError as exc:
        raise CorruptModelFileError(exc.message, "the download is incomplete or corrupt: download the model again",
                                    details=exc.details) from None


def _whole(value: Any, *, low: int, high: int) -> int | None:
    """``value`` when it is an int (not a bool) within [low, high], else None."""
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    return None


def _tensor(path: Path, name: str, info: Any) -> tuple[TensorInfo, int]:
    """One validated header entry and where its data ends; raises CorruptModelFileError."""

    def bad(why: str) -> CorruptModelFileError:
        return CorruptModelFileError(f"weights file {path.name} in {path.parent}: tensor {name[:200]!r} {why}",
                                     _REDOWNLOAD)

    if not isinstance(info, dict):
        raise bad("is not described by a JSON object")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_BITS:
        raise bad(f"has unknown dtype {str(dtype)[:40]!r}")
    shape = info.get("shape")
    if not isinstance(shape, list) or len(shape) > _MAX_RANK:
        raise bad(f"has an invalid shape (a list of at most {_MAX_RANK} whole numbers expected)")
    dims = [_whole(d, low=0, high=_MAX_DIM) for d in shape]
    if any(d is None for d in dims):
        raise bad(f"has a negative, fractional or absurd dimension in its shape {str(shape)[:80]}")
    offsets = info.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise bad("has invalid data offsets (two whole numbers expected)")
    start, end = (_whole(x, low=0, high=1 << 62) for x in offsets)
    if start is None or end is None or end < start:
        raise bad(f"has invalid data offsets {str(offsets)[:80]}")
    t = TensorInfo(name, dtype, tuple(d for d in dims if d is not None))
    if end - start != t.stored_bytes:
        raise bad("offsets do not match its shape")
    return t, end


def read_safetensors_header(path: Path) -> tuple[TensorInfo, ...]:
    """Tensors described by one safetensors file's header; reads the header bytes only.

    Raises :class:`ModelLoadError` when the file is shorter than its header says (truncated
    download) and :class:`CorruptModelFileError` when the header is malformed.
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
            raw = fh.read(header_len)
    except (OSError, ValueError) as exc:
        raise CorruptModelFileError(
            f"weights file {path.name} in {path.parent} is truncated or corrupt ({exc})",
            "the download is incomplete: delete this model from the cache and download it again",
        ) from None
    try:
        header = loads_bounded(raw, what=f"safetensors header of {path.name} in {path.parent}",
                               max_bytes=_MAX_HEADER_BYTES, expect=dict)
    except CorruptDataError as exc:
        raise CorruptModelFileError(f"weights file is corrupt: {exc.message}", _REDOWNLOAD) from None
    data_bytes = size - 8 - header_len
    tensors = []
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        t, end = _tensor(path, name, info)
        data_end = max(data_end, end)
        tensors.append(t)
    if data_end > data_bytes:
        raise ModelLoadError(
            f"weights file {path.name} in {path.parent} is truncated: the header needs "
            f"{8 + header_len + data_end} bytes, the file has {size}",
            "the download is incomplete: delete this model from the cache and download it again",
        )
    return tuple(tensors)


# --------------------------------------------------------------------------- the spec


def _first_int(cfg: dict[str, Any], *keys: str) -> int | None:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            if v > _MAX_CONFIG_INT:
                raise CorruptModelFileError(f"config.json: {k} = {v} is not a plausible value", _REDOWNLOAD)
            return v
    return None


def _shards(p: Path, names: dict[str, os.stat_result | None], st_files: list[str]) -> list[str]:
    index_name = "model.safetensors.index.json"
    if index_name not in names or not st_files:
        return st_files
    index = read_json_file(p / index_name)
    weight_map = index.get("weight_map") or {}
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptModelFileError(f"{p / index_name}: weight_map is not a map of tensor -> file", _REDOWNLOAD)
    wanted = sorted(set(weight_map.values()))
    missing = [w for w in wanted if w not in names]  # names are this folder's entries: no path tricks
    if missing:
        raise ModelLoadError(f"{p}: shard(s) {', '.join(w[:100] for w in missing[:5])} listed in {index_name} "
                             "are missing", "the download is incomplete: download the model again")
    return wanted


def _read_spec(p: Path, listing: list[tuple[str, os.stat_result | None]]) -> ModelSpec:
    names = {n: st for n, st in listing}
    if "config.json" not in names:
        raise ModelLoadError(f"{p} has no config.json", "this is not a Transformers model directory")
    if names["config.json"] is None:
        raise ModelLoadError(f"config.json in {p} is a broken link (missing blob)", "download the model again")
    cfg = read_json_file(p / "config.json")
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
    arch_cfg = cfg if _first_int(cfg, "num_hidden_layers", "n_layer", "num_layers") or not text_cfg else text_cfg

    notes: list[str] = []
    broken = [n for n, st in listing if st is None]
    if broken:
        raise ModelLoadError(f"{p}: weight file(s) {', '.join(broken)} are broken links (missing blobs)",
                             "the download is incomplete: download the model again")

    st_files = _shards(p, names, [n for n in names if n.endswith(".safetensors")])
    other_files = [n for n in names if n.endswith(WEIGHT_FILE_SUFFIXES) and not n.endswith(".safetensors")]

    tensors: list[TensorInfo] = []
    weight_files: tuple[tuple[str, int], ...]
    if st_files:
        source = "safetensors_headers"
        weight_files = tuple((n, names[n].st_size) for n in sorted(st_files))  # type: ignore[union-attr]
        for n in sorted(st_files):
            tensors.extend(read_safetensors_header(p / n))
    elif other_files:
        source = "weight_files"
        weight_files = tuple((n, names[n].st_size) for n in sorted(other_files))  # type: ignore[union-attr]
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
        prequant = str(qc.get("quant_method") or "unknown")[:40]
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
        tie_word_embeddings=tie if isinstance(tie, bool) else tie is not None,
        max_position_embeddings=_first_int(arch_cfg, "max_position_embeddings", "n_positions", "seq_length"),
        stored_dtype=stored if isinstance(stored, str) else None,
        has_rope=has_rope,
        prequantized=prequant,
        source=source,
        tensors=tuple(tensors),
        weight_files=weight_files,
        notes=tuple(notes),
    )
