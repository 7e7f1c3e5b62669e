"""Ollama as a holder of GPU memory memctl can ask: list its loaded models, unload one (``keep_alive: 0``).

Not a :class:`~memory_controller.backend.Backend` (memctl starts nothing in Ollama): the controller
builds it with :func:`create` and calls :meth:`OllamaClient.ps` / :meth:`OllamaClient.unload`.
"""

from __future__ import annotations

from typing import Any

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

__all__ = ["InvalidOllamaNameError", "OllamaClient", "OllamaError", "OllamaMalformedError", "OllamaModel",
           "OllamaRefusedError", "OllamaTimeoutError", "OllamaUnavailableError", "OllamaUnloadReport", "create",
           "gpu_free_reader", "parse_host", "validate_model_name"]


def gpu_free_reader(probe: Any):
    """A reader of free memory summed over readable GPUs (bytes), None when no GPU can be read."""

    def free_bytes() -> int | None:
        gpus = [g.free_bytes for g in probe.snapshot().gpus if g.free_bytes is not None]
        return sum(gpus) if gpus else None

    return free_bytes


def create(settings: Any, probe: Any = None) -> OllamaClient:
    """The client for ``settings.ollama_host`` (raises SettingsError for a bad value). With a probe
    (``.snapshot()``) and a local Ollama, an unload also waits for the memory to come back on NVML."""
    base = parse_host(getattr(settings, "ollama_host", None))
    reader = gpu_free_reader(probe) if probe is not None and is_local(base) else None
    return OllamaClient(base, free_bytes=reader)
