"""vLLM in Docker: the ``vllm`` backend (``config/defaults.toml`` ``[backends.vllm]``: ``factory = "backends.vllm:create"`` and its options,
:class:`VllmOptions`).

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
from .options import VllmOptions, vllm_options

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.settings import Settings

__all__ = ["OPTIONS_MODEL", "ContainerHolder", "InvalidContainerNameError", "VllmDockerBackend", "VllmOptions", "create",
           "validate_container_name"]

OPTIONS_MODEL = VllmOptions  # [backends.vllm] options (memory_controller.settings reads it)


def create(settings: Settings, probe: Any) -> VllmDockerBackend:
    """The registry's factory: ``create(settings, probe)`` (probe: a DeviceProbe, ``.snapshot()``)."""
    return VllmDockerBackend(settings, probe, network=vllm_options(settings).network)
