"""vLLM in Docker: the ``vllm`` backend (``config/defaults.toml`` ``[backends]``: ``backends.vllm:create``).

Modules: ``args`` (launch arguments, names, sizing), ``labels`` (labels written and read back with
limits), ``client`` (the Docker client, error mapping, HTTP probes), ``launch`` (one start, all or
nothing), ``view`` (a container as a Deployment, release reports), ``holders`` (PID -> container),
``backend`` (the class). Importing this package does not import ``docker``: it is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .args import InvalidContainerNameError, validate_container_name
from .backend import VllmDockerBackend
from .holders import ContainerHolder

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.settings import Settings

__all__ = ["ContainerHolder", "InvalidContainerNameError", "VllmDockerBackend", "create", "validate_container_name"]


def create(settings: Settings, probe: Any) -> VllmDockerBackend:
    """The registry's factory: ``create(settings, probe)`` (probe: a DeviceProbe, ``.snapshot()``)."""
    return VllmDockerBackend(settings, probe, network=settings.vllm_network)
