"""Reading a model directory into a :class:`ModelSpec`: ``config.json``, the shard index and the
safetensors headers (all through :mod:`.files`: bounded and validated), cached by path and the
signature of the files."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memory_controller.errors import ModelLoadError

from .files import (
    REDOWNLOAD_HINT,
    CorruptModelFileError,
    TensorInfo,
    printable,
    read_json_file,
    read_safetensors_header,
)

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_MAX_CONFIG_INT = 1 << 40  # a layer count, head count or position limit above this is not a model


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
    intermediate_size: int | None = None  # the MLP width (prefill working memory grows with it)

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


# --------------------------------------------------------------------------- the spec


def _first_int(cfg: dict[str, Any], *keys: str) -> int | None:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, float):
            if not v.is_integer() or not 0 < v <= _MAX_CONFIG_INT:
                raise CorruptModelFileError(f"config.json: {k} = {v:g} is not a plausible value (a whole number of "
                                            f"at most {_MAX_CONFIG_INT} expected)", REDOWNLOAD_HINT)
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            if v > _MAX_CONFIG_INT:
                raise CorruptModelFileError(f"config.json: {k} = {v} is not a plausible value", REDOWNLOAD_HINT)
            return v
    return None


def _shards(p: Path, names: dict[str, os.stat_result | None], st_files: list[str]) -> list[str]:
    index_name = "model.safetensors.index.json"
    if index_name not in names or not st_files:
        return st_files
    index = read_json_file(p / index_name)
    weight_map = index.get("weight_map") or {}
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptModelFileError(f"{p / index_name}: weight_map is not a map of tensor -> file", REDOWNLOAD_HINT)
    wanted = sorted(set(weight_map.values()))
    missing = [w for w in wanted if w not in names]  # names are this folder's entries: no path tricks
    if missing:
        raise ModelLoadError(f"{p}: shard(s) {', '.join(w[:100] for w in missing[:5])} listed in {index_name} "
                             "are missing", "the download is incomplete: download the model again")
    return wanted


def _read_spec(p: Path, listing: list[tuple[str, os.stat_result | None]]) -> ModelSpec:
    names = {n: st for n, st in listing}
    if "config.json" not in names:
        raise ModelLoadError(f"{p} has no config.json", "this is not a Hugging Face model directory")
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
            code="model.no_weights",
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
    architecture = printable(archs[0][:200]) if isinstance(archs, list) and archs and isinstance(archs[0], str) \
        else None
    tie = cfg.get("tie_word_embeddings", arch_cfg.get("tie_word_embeddings", True))
    stored = cfg.get("dtype") or cfg.get("torch_dtype") or arch_cfg.get("dtype") or arch_cfg.get("torch_dtype")
    qc = cfg.get("quantization_config")
    prequant = None
    if isinstance(qc, dict):
        prequant = printable(str(qc.get("quant_method") or "unknown")[:40])
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
        intermediate_size=_first_int(arch_cfg, "intermediate_size", "ffn_dim", "n_inner"),
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
