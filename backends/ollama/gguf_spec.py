"""What the estimator knows about one Ollama model: GGUF metadata from the blob or from ``/api/show``.

Two sources, the blob first:

* the models folder (``OLLAMA_MODELS``, else ``~/.ollama/models``, else the Linux service's
  ``/usr/share/ollama/.ollama/models``): ``manifests/<host>/<namespace>/<model>/<tag>`` (Docker manifest
  v2 JSON) names the layers; the model layer (``application/vnd.ollama.image.model``) and projector
  layer (``application/vnd.ollama.image.projector``) are blobs ``blobs/sha256-<hex>``. A manifest is a
  regular file of at most 1 MiB; a blob is read with ``gguf``'s reader only when it is a regular file
  (not a link) of at most :data:`MAX_BLOB_BYTES` and its size matches the manifest;
* ``/api/show``'s ``model_info`` (the same GGUF keys, e.g. ``llama.block_count``) when the folder is
  not readable (Ollama on another machine, another user's files).

Nothing here loads a tensor: ``GGUFReader`` maps the file and reads the header and tensor table only.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memory_controller.errors import CorruptDataError
from memory_controller.safejson import loads_bounded

MODEL_MEDIA = "application/vnd.ollama.image.model"
PROJECTOR_MEDIA = "application/vnd.ollama.image.projector"
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_BLOB_BYTES = 1 << 40  # 1 TiB: nothing larger is a model
MAX_LAYERS = 100_000
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
_LIMIT = 1 << 31  # a count or length above this is not a model


@dataclass(frozen=True)
class GgufSpec:
    """The GGUF facts the KV / graph formulas need. ``head_count_kv`` per layer (0: a layer without KV
    cache, e.g. a recurrent layer of a hybrid model); ``swa_layers`` marks sliding-window layers."""

    architecture: str
    block_count: int
    context_length: int | None  # trained context
    embedding_length: int
    head_count: int
    head_count_kv: tuple[int, ...]
    key_length: int
    value_length: int
    vocab_size: int | None
    sliding_window: int | None = None
    swa_layers: tuple[bool, ...] = ()
    weights_bytes: int = 0  # the model blob's tensors
    projector_bytes: int = 0
    quantization: str | None = None
    source: str = "api_show"  # "gguf_blob" | "api_show"
    notes: tuple[str, ...] = field(default=())

    def is_swa(self, layer: int) -> bool:
        return bool(self.sliding_window) and layer < len(self.swa_layers) and self.swa_layers[layer]


# --------------------------------------------------------------------------- metadata -> spec
def _whole(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _LIMIT:
        return None
    return value


def _per_layer(value: Any, layers: int) -> tuple[int, ...] | None:
    if isinstance(value, (list, tuple)):
        items = [_whole(v) for v in value]
        if len(items) != layers or any(v is None for v in items):
            return None
        return tuple(int(v) for v in items)  # type: ignore[arg-type]
    n = _whole(value)
    return None if n is None else (n,) * layers


# llama.cpp's per-architecture sliding-window patterns when the file does not carry one:
# layer i slides unless (i + 1) % n == 0 (``hparams.set_swa_pattern(n)``).
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "gpt-oss": 2, "cohere2": 4, "llama4": 4}


def _swa_layers(meta: Mapping[str, Any], arch: str, layers: int) -> tuple[bool, ...]:
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, (list, tuple)) and len(pattern) == layers:
        return tuple(bool(v) for v in pattern)
    n = _whole(pattern) or _SWA_PATTERN.get(arch)
    if not n:
        return (True,) * layers  # a window and no pattern: every layer slides (Mistral v0.1 style)
    return tuple((i + 1) % n != 0 for i in range(layers))


def spec_from_metadata(meta: Mapping[str, Any], *, source: str, weights_bytes: int = 0,
                       projector_bytes: int = 0, quantization: str | None = None) -> GgufSpec:
    """Build a spec from GGUF key/values (a blob's fields or ``/api/show``'s ``model_info``).
    Raises CorruptDataError naming the key that is missing or wrong."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", arch):
        raise CorruptDataError("GGUF metadata: no general.architecture", "the model file is not a GGUF model")

    def need(key: str) -> int:
        v = _whole(meta.get(f"{arch}.{key}"))
        if not v:
            raise CorruptDataError(f"GGUF metadata: {arch}.{key} is missing or not a positive count",
                                   "the model's metadata is incomplete: memctl cannot size its KV cache")
        return v

    layers = need("block_count")
    embedding = need("embedding_length")
    head_count_raw = meta.get(f"{arch}.attention.head_count")
    heads_per_layer = _per_layer(head_count_raw, layers)
    if not heads_per_layer or not max(heads_per_layer):
        raise CorruptDataError(f"GGUF metadata: {arch}.attention.head_count is missing",
                               "the model's metadata is incomplete: memctl cannot size its KV cache")
    heads = max(heads_per_layer)
    kv_raw = meta.get(f"{arch}.attention.head_count_kv")
    kv = _per_layer(kv_raw, layers) if kv_raw is not None else heads_per_layer
    if kv is None:
        raise CorruptDataError(f"GGUF metadata: {arch}.attention.head_count_kv is not a count per layer",
                               "the model's metadata is malformed")
    key_len = _whole(meta.get(f"{arch}.attention.key_length")) or embedding // heads
    val_len = _whole(meta.get(f"{arch}.attention.value_length")) or key_len
    window = _whole(meta.get(f"{arch}.attention.sliding_window")) or None
    vocab = _whole(meta.get(f"{arch}.vocab_size"))
    if vocab is None:
        toks = meta.get("tokenizer.ggml.tokens")
        vocab = len(toks) if isinstance(toks, (list, tuple)) and toks else None
    return GgufSpec(
        architecture=arch, block_count=layers, context_length=_whole(meta.get(f"{arch}.context_length")),
        embedding_length=embedding, head_count=heads, head_count_kv=kv, key_length=key_len, value_length=val_len,
        vocab_size=vocab, sliding_window=window, swa_layers=_swa_layers(meta, arch, layers) if window else (),
        weights_bytes=max(0, int(weights_bytes)), projector_bytes=max(0, int(projector_bytes)),
        quantization=quantization, source=source)


# --------------------------------------------------------------------------- the GGUF blob
def _regular_size(path: Path, limit: int) -> int | None:
    """The size of ``path`` when it is a regular file (not a link) of at most ``limit`` bytes."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        return None
    return st.st_size


def _field_value(f: Any) -> Any:
    try:
        value = f.contents()
    except Exception:  # noqa: BLE001 - a field the reader cannot decode is skipped
        return None
    if isinstance(value, (list, tuple)) and len(value) > 1_000_000:
        return None
    return value


def read_gguf(path: str | os.PathLike[str], *, max_bytes: int = MAX_BLOB_BYTES) -> tuple[dict[str, Any], int, str | None]:
    """(metadata, tensor bytes, quantisation of most weight bytes) of a GGUF file. Raises CorruptDataError
    for a file that is not a regular GGUF file of bounded size."""
    import gguf  # the backend's own library, imported on first use

    p = Path(path)
    if _regular_size(p, max_bytes) is None:
        raise CorruptDataError(f"{p.name}: not a regular file of at most {max_bytes} bytes",
                               "point memctl at the Ollama models folder (OLLAMA_MODELS)")
    try:
        reader = gguf.GGUFReader(p, "r")
    except Exception as exc:  # noqa: BLE001 - the reader raises ValueError/struct errors on bad input
        raise CorruptDataError(f"{p.name}: not a GGUF file ({type(exc).__name__}: {str(exc)[:120]})",
                               "the blob is damaged: pull the model again (ollama pull)") from None
    meta: dict[str, Any] = {}
    for name, f in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name != "tokenizer.ggml.tokens":
            continue
        if name == "tokenizer.ggml.tokens":
            meta[name] = [None] * len(f.data)  # only the count matters
            continue
        meta[name] = _field_value(f)
    by_type: dict[str, int] = {}
    total = 0
    for t in reader.tensors:
        n = int(t.n_bytes)
        total += n
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + n
    quant = max(by_type, key=lambda k: by_type[k]) if by_type else None
    return meta, total, quant


# --------------------------------------------------------------------------- the models folder
def models_dirs(env: Mapping[str, str] | None = None) -> list[Path]:
    env = os.environ if env is None else env
    if env.get("OLLAMA_MODELS"):
        return [Path(env["OLLAMA_MODELS"]).expanduser()]
    return [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def manifest_path(root: Path, name: str) -> Path:
    """``manifests/<host>/<namespace>/<model>/<tag>`` for an Ollama name (``gpt-oss:20b``,
    ``library/llama3``, ``hf.co/org/repo:Q4_K_M``); the name is validated by the client first."""
    base, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "latest")
    parts = base.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", parts[0]]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    return root.joinpath("manifests", *parts, tag or "latest")


@dataclass(frozen=True)
class Layers:
    model: Path | None
    model_size: int
    projectors: tuple[tuple[Path, int], ...]


def read_manifest(root: Path, name: str) -> Layers | None:
    """The model and projector blobs a manifest names; None when the folder or manifest cannot be read."""
    path = manifest_path(root, name)
    if _regular_size(path, MAX_MANIFEST_BYTES) is None:
        return None
    try:
        with open(path, "rb") as fh:
            data = loads_bounded(fh.read(MAX_MANIFEST_BYTES + 1), what=f"manifest of {name}",
                                 max_bytes=MAX_MANIFEST_BYTES, expect=dict)
    except (OSError, CorruptDataError):
        return None
    layers = data.get("layers")
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        return None
    model, model_size, projectors = None, 0, []
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        m = _DIGEST.match(str(layer.get("digest", "")))
        size = layer.get("size")
        if m is None or isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_BLOB_BYTES:
            continue
        blob = root / "blobs" / f"sha256-{m.group(1)}"
        if layer.get("mediaType") == MODEL_MEDIA and model is None:
            model, model_size = blob, size
        elif layer.get("mediaType") == PROJECTOR_MEDIA:
            projectors.append((blob, size))
    return Layers(model, model_size, tuple(projectors))


def spec_from_folder(name: str, dirs: Sequence[Path]) -> GgufSpec | None:
    """The spec read from the model's GGUF blob in the first readable models folder; None when no folder
    holds a readable manifest and blob (then ``/api/show`` is used). A blob whose size differs from its
    manifest is not trusted (None)."""
    for root in dirs:
        layers = read_manifest(root, name)
        if layers is None or layers.model is None:
            continue
        if _regular_size(layers.model, MAX_BLOB_BYTES) != layers.model_size:
            continue
        try:
            meta, tensor_bytes, quant = read_gguf(layers.model)
            spec = spec_from_metadata(meta, source="gguf_blob", weights_bytes=tensor_bytes,
                                      projector_bytes=sum(s for _p, s in layers.projectors), quantization=quant)
        except CorruptDataError:
            continue
        return spec
    return None
