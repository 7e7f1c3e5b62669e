"""Model-aware memory estimator: pure, reads ``config.json`` and safetensors *headers* only.

Nothing here imports torch or reads a weight. A safetensors file starts with an 8-byte little-endian
header length followed by a JSON header (tensor name -> dtype, shape, data offsets), so a model of a
few hundred tensors is described in a few milliseconds whatever its size.

The package is split by responsibility:

* :mod:`.files` — model files as untrusted data: bounded reads, JSON with depth and size limits,
  validated safetensors headers; a malformed file raises :class:`CorruptModelFileError` (both a
  ``CorruptDataError`` and a ``ModelLoadError``).
* :mod:`.spec` — reading a model directory into a :class:`ModelSpec` (config, index, headers;
  cached by path and file signatures).
* :mod:`.weights` — bytes the loaded weights hold per precision, and the KV cache formula.
* :mod:`.totals` — the full estimate (activations, CUDA context), the largest context that fits,
  and the one-line description.

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

import os
import threading
from typing import Any

from memory_controller.types import CachedModel, MemoryEstimate, Profile

from . import spec as _spec
from . import totals as _totals
from .files import CorruptModelFileError, TensorInfo, read_safetensors_header
from .spec import ModelSpec, clear_spec_cache
from .totals import describe, prefill_bytes
from .weights import dense_bytes_per_element, kv_cache_bytes, weights_bytes

# Models that are not checkpoint folders (a backend's own store, e.g. GGUF files behind a server) are
# sized by the backend that lists them: it registers a sizer for the path prefix its CachedModels carry
# (``register_sizer("scheme://host/", sizer)``); a sizer has ``estimate``, ``max_context_that_fits``
# and ``read_model_spec`` with the signatures below.
_SIZERS: dict[str, Any] = {}
_SIZERS_LOCK = threading.Lock()


def register_sizer(prefix: str, sizer: Any) -> None:
    with _SIZERS_LOCK:
        _SIZERS[prefix] = sizer


def _sizer_for(path: str | os.PathLike[str]) -> Any | None:
    p = str(path)
    if "://" not in p:
        return None
    with _SIZERS_LOCK:
        return next((s for pre, s in _SIZERS.items() if p.startswith(pre)), None)


def estimate(model: CachedModel, profile: Profile, settings: Any) -> MemoryEstimate:
    sizer = _sizer_for(model.path)
    return sizer.estimate(model, profile, settings) if sizer else _totals.estimate(model, profile, settings)


def max_context_that_fits(model: CachedModel, free_bytes: int, profile: Profile, settings: Any) -> int:
    sizer = _sizer_for(model.path)
    if sizer:
        return sizer.max_context_that_fits(model, free_bytes, profile, settings)
    return _totals.max_context_that_fits(model, free_bytes, profile, settings)


def read_model_spec(path: str | os.PathLike[str]) -> ModelSpec:
    sizer = _sizer_for(path)
    return sizer.read_model_spec(str(path)) if sizer else _spec.read_model_spec(path)


__all__ = [
    "CorruptModelFileError",
    "ModelSpec",
    "TensorInfo",
    "clear_spec_cache",
    "dense_bytes_per_element",
    "describe",
    "estimate",
    "kv_cache_bytes",
    "max_context_that_fits",
    "prefill_bytes",
    "read_model_spec",
    "read_safetensors_header",
    "register_sizer",
    "weights_bytes",
]
