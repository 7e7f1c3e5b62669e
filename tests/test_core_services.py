"""The core's small services on their own: the one time-bounded cache and the generation ledger."""

from __future__ import annotations

from memory_controller.backend import Deployment, DeploymentState
from memory_controller.cache import TTLCache
from memory_controller.serving import ServingState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_cache_keeps_a_value_for_its_ttl_under_its_key_only():
    clock, calls = Clock(), []
    cache: TTLCache[int] = TTLCache(5.0, clock=clock)

    def compute() -> int:
        calls.append(1)
        return len(calls)

    assert cache.get_or(compute, key="a") == 1
    clock.now += 4.9
    assert cache.get_or(compute, key="a") == 1  # still fresh
    assert cache.get_or(compute, key="b") == 2  # another key: computed again, and replaces "a"
    assert cache.get("a") is None
    clock.now += 5.0
    assert cache.get("b") is None and cache.get_or(compute, key="b") == 3  # too old
    assert cache.get_or(compute, key="b", refresh=True) == 4
    assert cache.get("b", max_age_s=0.0) is None and cache.age_s() == 0.0
    cache.clear()
    assert cache.get("b") is None and cache.age_s() is None


def _dep(handle: str, model: str) -> Deployment:
    return Deployment("inmem", handle, model, None, DeploymentState.READY, {})


def test_the_ledger_counts_and_cancels_only_the_slots_it_is_asked_for():
    ledger = ServingState()
    a, b = _dep("h1", "m1"), _dep("h2", "m2")
    with ledger.hold(a, None) as s1, ledger.hold(a, None) as s2, ledger.hold(b, None) as s3:
        assert ledger.in_flight() == {"m1": 2, "m2": 1}
        assert ledger.on({("inmem", "h1")}) == 2 and ledger.on({("other", "h1")}) == 0
        assert ledger.cancel({("inmem", "h2")}, "unload") == 1
        assert s3.cancelled() and s3.reason == "unload" and not s1.cancelled()
        assert ledger.cancel(None, "emergency_clear") == 3
        assert s1.reason == "emergency_clear" and s2.cancelled() and s3.reason == "unload"  # the first reason stays
    assert ledger.in_flight() == {} and ledger.on({("inmem", "h1")}) == 0
