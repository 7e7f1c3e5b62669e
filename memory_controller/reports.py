"""Results of the controller's maintenance operations, and the generation ledger (one slot per request)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from .backend import Deployment, InProcessGenerator
from .types import Message, Outcome, StepRecord


@dataclass
class ClearReport:
    before: dict[str, int | None]
    after: dict[str, int | None]
    actions: dict[str, Any] = field(default_factory=dict)

    @property
    def freed(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for k, b in self.before.items():
            a = self.after.get(k)
            out[k] = None if b is None or a is None else b - a
        return out


@dataclass
class EmergencyReport:
    steps: list[StepRecord]
    outcome: Outcome
    cancelled_operation: str | None = None
    remaining: list[Any] = field(default_factory=list)  # holders.DeviceHolders per GPU, after the clear
    verdict: Message | None = None  # what still holds memory (or that nothing does), as a code


@dataclass
class GenerationSlot:
    """One request generating on a deployment. ``generator`` is None for HTTP backends (proxy them)."""

    deployment: Deployment
    generator: InProcessGenerator | None
    _cancel: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None  # why it was cancelled ("emergency_clear", "unload", "switch")

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self, reason: str) -> None:
        self.reason = self.reason or reason
        self._cancel.set()
