"""The memory monitor: device snapshots, and the history of used/free memory the dashboard charts."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from .types import SystemSnapshot

Sample = tuple[float, dict[str, tuple[int | None, int | None]]]  # (time, device key -> (used, free))


class MemoryMonitor:
    def __init__(self, probe: Any, poll_interval_s: float, history_s: float) -> None:
        self.probe = probe
        self._every_s = poll_interval_s
        self._lock = threading.Lock()
        self._samples: deque[Sample] = deque(maxlen=max(2, int(history_s / poll_interval_s)))

    def snapshot(self) -> SystemSnapshot:
        """A fresh snapshot of every GPU and the host; kept in the history at most every half poll interval."""
        snap = self.probe.snapshot()
        with self._lock:
            last = self._samples[-1][0] if self._samples else None
            if last is None or snap.taken_at - last >= self._every_s * 0.5:
                self._samples.append((snap.taken_at, {d.key: (d.used_bytes, d.free_bytes) for d in snap.devices}))
        return snap

    def history(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def seed(self, samples: list[Sample]) -> None:
        with self._lock:
            self._samples.clear()
            self._samples.extend(samples)

    def used_by_device(self) -> dict[str, int | None]:
        return {d.key: d.used_bytes for d in self.probe.snapshot().devices}
