"""Ollama: the ``ollama`` serving backend (``config/defaults.toml`` ``[backends]``: ``backends.ollama:create``).

Modules: ``client`` (Ollama's HTTP API with size limits and clear errors), ``gguf_spec`` (GGUF metadata
from the blob in the models folder or from ``/api/show``), ``sizing`` (weights + KV + graph + reserve,
the largest ``num_ctx`` that fits), ``calibration`` (measured size against the estimate, per model),
``backend`` (the :class:`~memory_controller.backend.Backend`: list, fit, apply as a derived tag, verify,
serve through Ollama's ``/v1``), ``fit`` (the per-model fit report ``memctl ollama fit`` prints).
The backend also hands the core Ollama as "another holder" (``holder_client``) for what it did not load.
"""

from __future__ import annotations

import os
from typing import Any

from .backend import BACKEND_ID, HolderView, ModelInfo, OllamaBackend, base_of, derived_name
from .client import (
    InvalidOllamaNameError,
    OllamaClient,
    OllamaError,
    OllamaMalformedError,
    OllamaModel,
    OllamaRefusedError,
    OllamaTimeoutError,
    OllamaUnavailableError,
    OllamaUnloadReport,
    is_local,
    parse_host,
    validate_model_name,
)

__all__ = ["BACKEND_ID", "HolderView", "InvalidOllamaNameError", "ModelInfo", "OllamaBackend", "OllamaClient",
           "OllamaError", "OllamaMalformedError", "OllamaModel", "OllamaRefusedError", "OllamaTimeoutError",
           "OllamaUnavailableError", "OllamaUnloadReport", "base_of", "create", "derived_name", "gpu_free_reader",
           "client_for", "host_setting", "parse_host", "validate_model_name"]

DEFAULT_HOST = "127.0.0.1:11434"


def gpu_free_reader(probe: Any):
    """A reader of free memory summed over readable GPUs (bytes), None when no GPU can be read."""

    def free_bytes() -> int | None:
        gpus = [g.free_bytes for g in probe.snapshot().gpus if g.free_bytes is not None]
        return sum(gpus) if gpus else None

    return free_bytes


def host_setting(settings: Any, env: Any = None) -> str:
    """Where Ollama listens: ``MEMCTL_OLLAMA_HOST`` or a configured ``ollama_host`` other than the default,
    else Ollama's own ``OLLAMA_HOST`` (as Ollama's CLI reads it), else 127.0.0.1:11434."""
    env = os.environ if env is None else env
    configured = getattr(settings, "ollama_host", None) or DEFAULT_HOST
    if env.get("MEMCTL_OLLAMA_HOST") or configured != DEFAULT_HOST:
        return configured
    return env.get("OLLAMA_HOST") or configured


def client_for(settings: Any, probe: Any = None) -> OllamaClient:
    """The client for the configured host (raises SettingsError for a bad value). With a probe
    (``.snapshot()``) and a local Ollama, an unload also waits for the memory to come back on NVML."""
    base = parse_host(host_setting(settings))
    reader = gpu_free_reader(probe) if probe is not None and is_local(base) else None
    return OllamaClient(base, free_bytes=reader)


def create(settings: Any, probe: Any = None) -> OllamaBackend:
    """The registry's factory: ``create(settings, probe)``."""
    return OllamaBackend(settings, probe, client_for(settings, probe))
