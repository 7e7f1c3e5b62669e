"""Results of the controller's maintenance operations, and the generation ledger (one slot per request)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


class GenerationLedger:
    """Who generates on what now: one slot per request. An emergency clear, an unload of the deployment, or
    (when asked) a switch cancels slots; the executor waits for the slots on what it stops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: list[GenerationSlot] = []

    @contextmanager
    def hold(self, deployment: Deployment, generator: InProcessGenerator | None) -> Iterator[GenerationSlot]:
        slot = GenerationSlot(deployment, generator)
        with self._lock:
            self._slots.append(slot)
        try:
            yield slot
        finally:
            with self._lock:
                self._slots.remove(slot)

    def in_flight(self) -> dict[str, int]:
        """Requests generating now, by model id."""
        with self._lock:
            out: dict[str, int] = {}
            for s in self._slots:
                out[s.deployment.model_id] = out.get(s.deployment.model_id, 0) + 1
            return out

    def cancel(self, handles: set[tuple[str, str]] | None, reason: str) -> int:
        """Cancel slots on the given (backend id, handle) pairs (None: all). Returns how many."""
        with self._lock:
            hit = [s for s in self._slots
                   if handles is None or (s.deployment.backend_id, s.deployment.handle) in handles]
        for s in hit:
            s.cancel(reason)
        return len(hit)

    def on(self, handles: set[tuple[str, str]]) -> int:
        """How many slots generate on the given (backend id, handle) pairs."""
        with self._lock:
            return sum(1 for s in self._slots if (s.deployment.backend_id, s.deployment.handle) in handles)
