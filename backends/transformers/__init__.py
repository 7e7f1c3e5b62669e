"""In-process Hugging Face Transformers backend (registry id ``transformers``).

Files: :mod:`.memory` (host/GPU accounting, malloc), :mod:`.checks` (quantisation, placement and
model files, before loading), :mod:`.loading` (config, from_pretrained, the all-or-nothing load, error
mapping), :mod:`.templates` (requests, chat templates, tool-call family), :mod:`.generation`
(streaming), :mod:`.backend` (the class). torch, transformers, bitsandbytes and accelerate are imported only
inside functions: importing this package costs nothing, and the dashboard paints without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .options import TransformersOptions

if TYPE_CHECKING:
    from .backend import TransformersBackend

__all__ = ["OPTIONS_MODEL", "TransformersBackend", "TransformersOptions", "create"]

# The library's own quiet defaults in a quiet process (memory_controller.quiet): no per-request token-id
# warnings ("Setting `pad_token_id` to `eos_token_id`") or advisory warnings in the dashboard's log.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
OPTIONS_MODEL = TransformersOptions  # [backends.transformers] options (memory_controller.settings reads it)


def create(settings: Any, probe: Any) -> TransformersBackend:
    """Registry factory (``[backends.transformers] factory = "backends.transformers:create"``).

    ``probe`` is a ``memory_controller.probe.DeviceProbe`` (``gpu_used_bytes(index)`` measures a
    release on GPU) or None.
    """
    from memory_controller.quiet import apply_defaults, quiet_requested

    from .backend import TransformersBackend

    if quiet_requested():  # before the library is imported (on the first load)
        apply_defaults(QUIET_ENV)
    return TransformersBackend(settings, probe)


def __getattr__(name: str) -> Any:
    if name == "TransformersBackend":
        from .backend import TransformersBackend

        return TransformersBackend
    raise AttributeError(name)
