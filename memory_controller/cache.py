"""The one time-bounded cache: a value kept for ``ttl_s`` seconds under a key, recomputed when the key
changes or the value grows old. Every "remember this for a few seconds" in memctl uses it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")
_NOTHING = object()


class TTLCache(Generic[V]):
    """One value under one key (a new key replaces the old value). Thread-safe; ``clock`` is monotonic."""

    def __init__(self, ttl_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entry: tuple[Hashable, float, V] | None = None

    def get(self, key: Hashable = None, *, max_age_s: float | None = None) -> V | None:
        """The value under ``key`` when younger than ``max_age_s`` (default ``ttl_s``), else None."""
        with self._lock:
            e = self._entry
        if e is None or e[0] != key:
            return None
        age = self._clock() - e[1]
        return e[2] if age < (self.ttl_s if max_age_s is None else max_age_s) else None

    def put(self, value: V, key: Hashable = None) -> V:
        with self._lock:
            self._entry = (key, self._clock(), value)
        return value

    def get_or(self, compute: Callable[[], V], key: Hashable = None, *, refresh: bool = False) -> V:
        """The cached value, or ``compute()`` stored under ``key`` (always with ``refresh``)."""
        if not refresh:
            hit = self.get(key)
            if hit is not None:
                return hit
        return self.put(compute(), key)

    def age_s(self) -> float | None:
        with self._lock:
            e = self._entry
        return None if e is None else self._clock() - e[1]

    def clear(self) -> None:
        with self._lock:
            self._entry = None
