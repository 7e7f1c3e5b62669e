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

from pydantic import BaseModel, ConfigDict, Field

from memory_controller.errors import SettingsError

from .backend import BACKEND_ID, HolderView, ModelInfo, OllamaBackend, base_of, derived_name, process_role
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
    UnaddressedClient,
    is_local,
    parse_host,
    validate_model_name,
)

__all__ = ["BACKEND_ID", "OPTIONS_MODEL", "OPTION_ALIASES", "HolderView", "OllamaOptions", "options", "process_role", "InvalidOllamaNameError", "ModelInfo", "OllamaBackend", "OllamaClient",
           "OllamaError", "OllamaMalformedError", "OllamaModel", "OllamaRefusedError", "OllamaTimeoutError",
           "OllamaUnavailableError", "OllamaUnloadReport", "base_of", "create", "derived_name", "gpu_free_reader",
           "client_for", "host_setting", "parse_host", "validate_model_name"]

DEFAULT_HOST = "127.0.0.1:11434"


class OllamaOptions(BaseModel):
    """``[backends.ollama]``: where Ollama listens, and whether the emergency clear asks it to unload."""

    model_config = ConfigDict(extra="forbid")

    host: str | None = Field(None, max_length=2048)  # OLLAMA_HOST form (host:port or a URL); None: OLLAMA_HOST, else the default
    emergency_unload: bool = True


OPTIONS_MODEL = OllamaOptions  # [backends.ollama] options (memory_controller.settings reads it)
# Its settings before backends owned theirs: ``ollama_host`` moves by its id; this one does not start with it.
OPTION_ALIASES = {"emergency_unloads_ollama": "emergency_unload"}


def options(settings: Any) -> OllamaOptions:
    """The ``[backends.ollama]`` options of ``settings`` (anything else: the defaults, with its ``ollama_host``)."""
    reader = getattr(settings, "backend_options", None)
    if callable(reader):
        return reader(BACKEND_ID, OllamaOptions)
    return OllamaOptions(host=getattr(settings, "ollama_host", None))


def gpu_free_reader(probe: Any):
    """A reader of free memory summed over readable GPUs (bytes), None when no GPU can be read."""

    def free_bytes() -> int | None:
        gpus = [g.free_bytes for g in probe.snapshot().gpus if g.free_bytes is not None]
        return sum(gpus) if gpus else None

    return free_bytes


def host_setting(settings: Any, env: Any = None) -> str:
    """Where Ollama listens: the configured ``host`` (``[backends.ollama]``, ``ollama_host``,
    ``MEMCTL_OLLAMA_HOST``), else Ollama's own ``OLLAMA_HOST`` (as Ollama's CLI reads it), else 127.0.0.1:11434."""
    env = os.environ if env is None else env
    return options(settings).host or env.get("OLLAMA_HOST") or DEFAULT_HOST


def client_for(settings: Any, probe: Any = None) -> OllamaClient:
    """The client for the configured host (raises SettingsError for a bad value). With a probe
    (``.snapshot()``) and a local Ollama, an unload also waits for the memory to come back on NVML."""
    base = parse_host(host_setting(settings))
    reader = gpu_free_reader(probe) if probe is not None and is_local(base) else None
    return OllamaClient(base, free_bytes=reader)


def create(settings: Any, probe: Any = None) -> OllamaBackend:
    """The registry's factory: ``create(settings, probe)``. A configured host that is no address leaves the
    backend in place, unavailable with that reason (its client raises it on every call)."""
    try:
        client: OllamaClient = client_for(settings, probe)
    except SettingsError as exc:
        client = UnaddressedClient(host_setting(settings), exc)
    return OllamaBackend(settings, probe, client, emergency_unload=options(settings).emergency_unload)
