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

from .files import CorruptModelFileError, TensorInfo, read_safetensors_header
from .spec import ModelSpec, clear_spec_cache, read_model_spec
from .totals import describe, estimate, max_context_that_fits, prefill_bytes
from .weights import dense_bytes_per_element, kv_cache_bytes, weights_bytes

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
    "weights_bytes",
]
