"""memctl core: settings, device probe, recommendations, estimator, catalog and the controller.

``from memory_controller import MemoryController`` is the public entry point. Heavy parts
(torch, docker) are imported only when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .controller import MemoryController, Plan, shared_controller

__all__ = ["MemoryController", "Plan", "shared_controller"]


def __getattr__(name: str) -> Any:
    if name in ("MemoryController", "Plan", "shared_controller"):
        from . import controller

        return getattr(controller, name)
    raise AttributeError(name)
