"""The serving scheduler against fake effects, without HTTP (as llama-swap's fifo_test.go): admission,
joins, FIFO turns, cancellations, a load failing mid-queue, idle expiry with requests in flight, the pause and
the emergency clear. The effects are a fake at the boundary the scheduler acts through; the controller's own
effects are tested through the server (tests/test_openai_api.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from memory_controller.backend import Deployment, DeploymentState
from memory_controller.errors import (
    GenerationCancelledError,
    InsufficientMemoryError,
    ModelLoadError,
    ModelNotFoundError,
    OperationCancelledError,
    RequestRefusedError,
    ServingPausedError,
)
from memory_controller.scheduler import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    Facts,
    Need,
    ServingScheduler,
    output_budget,
)
from memory_controller.serving import Pause, ServingState
from memory_controller.types import Precision, Profile


def _dep(model_id: str, *, endpoint: str | None = None, context: int = 4096) -> Deployment:
    profile = Profile(mode="fake", precision=Precision.FP16, device="cuda", context_tokens=context, batch=1)
    return Deployment("fake", model_id, model_id, profile, DeploymentState.READY, {"gpu:0": 1},
                      endpoint=endpoint)


@dataclass
class Ticket:
    model_id: str
    result: Any = None
    error: BaseException | None = None
    _fns: list[Callable[[Any], None]] = field(default_factory=list)
    done: bool = False

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._fns.append(fn)

    def finish(self, error: BaseException | None = None) -> None:
        self.error, self.done = error, True
        for fn in self._fns:
            threading.Thread(target=fn, args=(self,)).start()  # as the runner's worker thread would


class FakeEffects:
    """Deployments in a dict; loads finish when the test says; one ServingState as the ledger and the pause."""

    def __init__(self, *, cached: tuple[str, ...] = ("a", "b", "c"), context: int = 4096) -> None:
        self.cached = set(cached)
        self.context = context
        self.deps: dict[str, Deployment] = {}
        self.state = ServingState()
        self.tickets: list[Ticket] = []
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.no_tools: set[str] = set()
        self.no_memory: set[str] = set()
        self.exclusive = True  # one model at a time: a load stops what runs
        self.on_demand_on = True
        self.idle_s = 0.0
        self.endpoint: str | None = None

    # -- the protocol
    def ready(self, model_id: str) -> Deployment | None:
        return self.deps.get(model_id)

    def running(self) -> list[Deployment]:
        return list(self.deps.values())

    def admit(self, need: Need, deployment: Deployment | None) -> Facts:
        if need.model_id not in self.cached:
            raise ModelNotFoundError(f"{need.model_id} is not in the cache", "download it")
        prompt = len(need.request.split()) if isinstance(need.request, str) else None
        if deployment is not None:
            return Facts(need.model_id, deployment.context_tokens, prompt, need.model_id not in self.no_tools)
        facts = Facts(need.model_id, self.context, prompt, need.model_id not in self.no_tools,
                      frozenset(self.deps) - {need.model_id} if self.exclusive else frozenset())
        from memory_controller.scheduler import check_admission

        check_admission(need, facts)
        if need.model_id in self.no_memory:
            raise InsufficientMemoryError(f"{need.model_id} does not fit", needed_bytes=2, free_bytes=1)
        return facts

    def paused(self, model_id: str) -> Pause | None:
        return self.state.paused(model_id)

    def on_demand(self) -> bool:
        return self.on_demand_on

    def idle_unload_s(self) -> float:
        return self.idle_s

    def load(self, model_id: str) -> Ticket:
        self.loads.append(model_id)
        t = Ticket(model_id)
        self.tickets.append(t)
        return t

    def unload_idle(self, model_id: str) -> None:
        self.unloads.append(model_id)
        with self.state.quiet(model_id):
            self.state.cancel({("fake", model_id)}, "unload", frozenset({model_id}))
        self.deps.pop(model_id, None)

    def open_lease(self, deployment: Deployment) -> Any:
        return self.state.open(deployment, None)

    def close_lease(self, slot: Any) -> None:
        self.state.close(slot)

    def subscribe(self, fn):
        return self.state.subscribe(fn)

    # -- what the world does (the runner running a queued load, a user's unload, an emergency clear)
    def complete(self, ticket: Ticket, error: BaseException | None = None) -> None:
        if error is None:
            if self.exclusive:
                self.deps.clear()
            self.deps[ticket.model_id] = _dep(ticket.model_id, endpoint=self.endpoint, context=self.context)
            ticket.result = self.deps[ticket.model_id]
        ticket.finish(error)

    def user_unload(self, model_id: str) -> None:
        self.state.cancel({("fake", model_id)}, "unload", frozenset({model_id}))
        self.deps.pop(model_id, None)

    def emergency_clear(self) -> None:
        self.state.cancel(None, "emergency_clear")
        self.deps.clear()
        for t in self.tickets:
            if not t.done:
                t.finish(OperationCancelledError("dropped by an emergency clear"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro_fn: Callable[..., Any], effects: FakeEffects | None = None, clock: Clock | None = None) -> Any:
    fx = effects or FakeEffects()
    sched = ServingScheduler(fx, clock=clock or Clock())

    async def main() -> Any:
        try:
            return await coro_fn(sched, fx)
        finally:
            sched.close()
    return asyncio.run(asyncio.wait_for(main(), 20))


async def until(cond: Callable[[], bool]) -> None:
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


# --------------------------------------------------------------------------- the output budget
def test_without_max_tokens_the_answer_gets_what_the_context_leaves_capped_by_the_default():
    assert output_budget("m", 723, None, 65536) == DEFAULT_MAX_OUTPUT_TOKENS
    assert output_budget("m", 4000, None, 4096) == 96
    assert output_budget("m", 10, 32000, 65536) == 32000
    with pytest.raises(RequestRefusedError) as err:
        output_budget("m", 100, 4000, 4096)
    assert err.value.code == "context_length_exceeded" and "4100" in err.value.message
    with pytest.raises(RequestRefusedError):
        output_budget("m", 4096, None, 4096)


# --------------------------------------------------------------------------- leases and loads
def test_a_running_model_is_leased_at_once_and_the_lease_is_its_refcount():
    async def body(s: ServingScheduler, fx: FakeEffects):
        fx.deps["a"] = _dep("a", endpoint="http://engine")
        leases = [await s.acquire(Need("a")) for _ in range(3)]
        assert s.status()["a"]["leases"] == 3 and s.status()["a"]["in_flight"] == 3
        assert fx.state.in_flight() == {"a": 3}  # one ledger: the controller's slots
        for lease in leases:
            s.release(lease)
            s.release(lease)  # idempotent
        assert s.status()["a"]["leases"] == 0 and fx.state.in_flight() == {}
        assert fx.loads == []
    run(body)


def test_requests_for_a_model_that_is_not_running_join_one_queued_load():
    async def body(s: ServingScheduler, fx: FakeEffects):
        fx.endpoint = "http://engine"
        tasks = [asyncio.create_task(s.acquire(Need("a"))) for _ in range(4)]
        await until(lambda: len(fx.tickets) == 1)
        assert s.status()["a"]["queued"] == 4
        fx.complete(fx.tickets[0])
        leases = await asyncio.gather(*tasks)
        assert fx.loads == ["a"] and all(le.deployment.model_id == "a" for le in leases)
        for lease in leases:
            s.release(lease)
    run(body)


def test_in_process_generation_takes_turns_in_the_order_asked():
    async def body(s: ServingScheduler, fx: FakeEffects):
        fx.deps["a"] = _dep("a")
        first = await s.acquire(Need("a"))
        order: list[int] = []

        async def later(i: int) -> Any:
            lease = await s.acquire(Need("a"))
            order.append(i)
            return lease
        tasks = []
        for i in range(3):
            tasks.append(asyncio.create_task(later(i)))
            await until(lambda n=i: s.status()["a"]["queued"] == n + 1)
        assert s.status()["a"] == {**s.status()["a"], "in_flight": 1, "queued": 3}
        s.release(first)
        for i, t in enumerate(tasks):
            lease = await t
            assert order == list(range(i + 1))
            s.release(lease)
    run(body)


def test_a_client_that_leaves_its_place_in_the_fifo_passes_the_turn_on():
    async def body(s: ServingScheduler, fx: FakeEffects):
        fx.deps["a"] = _dep("a")
        first = await s.acquire(Need("a"))
        leaving = asyncio.create_task(s.acquire(Need("a")))
        staying = asyncio.create_task(s.acquire(Need("a")))
        await until(lambda: s.status()["a"]["queued"] == 2)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        s.release(first)
        lease = await staying
        assert s.status()["a"]["leases"] == 1 and fx.state.in_flight() == {"a": 1}
        s.release(lease)
        assert fx.state.in_flight() == {}
    run(body)


def test_a_load_failing_mid_queue_fails_every_waiter_and_the_next_request_loads_again():
    async def body(s: ServingScheduler, fx: FakeEffects):
        tasks = [asyncio.create_task(s.acquire(Need("a"))) for _ in range(3)]
        await until(lambda: len(fx.tickets) == 1)
        fx.complete(fx.tickets[0], ModelLoadError("a: weights unreadable", "download it again"))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, ModelLoadError) for r in results)
        assert s.status() == {} and fx.state.in_flight() == {}
        again = asyncio.create_task(s.acquire(Need("a")))
        await until(lambda: len(fx.tickets) == 2)
        fx.complete(fx.tickets[1])
        s.release(await again)
    run(body)


def test_a_load_stops_what_it_replaces_only_after_its_leases_drain_and_new_ones_wait():
    async def body(s: ServingScheduler, fx: FakeEffects):
        fx.deps["a"] = _dep("a", endpoint="http://engine")
        fx.endpoint = "http://engine"
        on_a = await s.acquire(Need("a"))
        want_b = asyncio.create_task(s.acquire(Need("b")))
        await until(lambda: len(fx.tickets) == 1)
        later_a = asyncio.create_task(s.acquire(Need("a")))  # "a" drains: it waits for the load of b
        await asyncio.sleep(0.05)
        assert not later_a.done() and s.status()["a"]["leases"] == 1
        s.release(on_a)
        fx.complete(fx.tickets[0])  # the runner stopped a, started b
        lease_b = await want_b
        await until(lambda: len(fx.tickets) == 2)  # a is asked for again: a new load, behind b
        assert fx.loads == ["b", "a"]
        s.release(lease_b)
        fx.complete(fx.tickets[1])
        s.release(await later_a)
    run(body)


# --------------------------------------------------------------------------- admission
def test_admission_refuses_before_anything_is_loaded_or_evicted():
    async def body(s: ServingScheduler, fx: FakeEffects):
        fx.deps["a"] = _dep("a")
        fx.no_tools.add("b")
        fx.no_memory.add("c")
        with pytest.raises(RequestRefusedError) as err:
            await s.acquire(Need("b", request="x " * 5000, requested_tokens=10))
        assert err.value.code == "context_length_exceeded"
        with pytest.raises(RequestRefusedError) as err:
            await s.acquire(Need("b", tools=True))
        assert err.value.code == "tools_not_supported" and "b" in err.value.message
        with pytest.raises(InsufficientMemoryError):
            await s.acquire(Need("c"))
        with pytest.raises(ModelNotFoundError):
            await s.acquire(Need("nope"))
        assert fx.loads == [] and list(fx.deps) == ["a"] and fx.state.in_flight() == {}
        assert s.status()["a"]["leases"] == 0
    run(body)


def test_on_demand_off_refuses_a_model_that_is_not_running():
    async def body(s: ServingScheduler, fx: FakeEffects):
        fx.on_demand_on = False
        with pytest.raises(RequestRefusedError) as err:
            await s.acquire(Need("a"))
        assert err.value.code == "model_not_loaded" and fx.loads == []
    run(body)


# --------------------------------------------------------------------------- pause and emergency clear
def test_emergency_clear_frees_every_lease_and_answers_every_queued_request_with_the_pause():
    async def body(s: ServingScheduler, fx: FakeEffects):
        fx.deps["a"] = _dep("a")
        running = await s.acquire(Need("a"))
        behind = [asyncio.create_task(s.acquire(Need("a"))) for _ in range(2)]
        loading = asyncio.create_task(s.acquire(Need("b")))
        await until(lambda: s.status().get("a", {}).get("queued") == 2 and len(fx.tickets) == 1)
        fx.emergency_clear()
        results = await asyncio.gather(*behind, loading, return_exceptions=True)
        assert all(isinstance(r, ServingPausedError) for r in results), results
        assert running.cancelled() and running.reason == "emergency_clear"
        await until(lambda: s.status() == {})
        assert fx.state.in_flight() == {}
        s.release(running)  # the wedged request finishes later: nothing to give back
        with pytest.raises(ServingPausedError) as err:  # the client's retry does not load it again
            await s.acquire(Need("a"))
        assert "memctl serve resume" in str(err.value)
        assert fx.loads == ["b"]
        fx.state.resume()
        again = asyncio.create_task(s.acquire(Need("a")))
        await until(lambda: len(fx.tickets) == 2)
        fx.complete(fx.tickets[1])
        s.release(await again)
    run(body)


def test_an_unload_pauses_that_model_only_and_queued_requests_get_the_pause_not_a_404():
    async def body(s: ServingScheduler, fx: FakeEffects):
        fx.exclusive = False
        fx.deps["a"] = _dep("a")
        fx.deps["b"] = _dep("b")
        running = await s.acquire(Need("a"))
        behind = asyncio.create_task(s.acquire(Need("a")))
        await until(lambda: s.status()["a"]["queued"] == 1)
        fx.user_unload("a")
        with pytest.raises(ServingPausedError):
            await behind
        assert running.cancelled()
        s.release(running)
        s.release(await s.acquire(Need("b")))  # another model is served as before
        with pytest.raises(ServingPausedError):
            await s.acquire(Need("a"))
        assert fx.loads == []
    run(body)


def test_a_switch_cancels_queued_requests_with_a_retryable_cancellation():
    async def body(s: ServingScheduler, fx: FakeEffects):
        fx.deps["a"] = _dep("a")
        running = await s.acquire(Need("a"))
        behind = asyncio.create_task(s.acquire(Need("a")))
        await until(lambda: s.status()["a"]["queued"] == 1)
        fx.state.cancel({("fake", "a")}, "switch", frozenset({"a"}))
        with pytest.raises(GenerationCancelledError) as err:
            await behind
        assert err.value.code == "generation_cancelled" and fx.state.pause() is None
        s.release(running)
    run(body)


# --------------------------------------------------------------------------- idle expiry
def test_idle_expiry_never_unloads_a_model_with_a_request_in_flight():
    clock = Clock()

    async def body(s: ServingScheduler, fx: FakeEffects):
        fx.idle_s = 60
        fx.deps["a"] = _dep("a")
        lease = await s.acquire(Need("a"))
        clock.now += 3600
        assert await s.expire_idle() == [] and "a" in fx.deps
        s.release(lease)
        clock.now += 59
        assert await s.expire_idle() == []
        assert s.status()["a"]["idle_unload_in_s"] == pytest.approx(1)
        clock.now += 2
        assert await s.expire_idle() == ["a"]
        assert fx.unloads == ["a"] and fx.state.pause() is None  # an idle unload does not pause
        loading = asyncio.create_task(s.acquire(Need("a")))  # asked again: loaded on demand
        await until(lambda: len(fx.tickets) == 1)
        fx.complete(fx.tickets[0])
        s.release(await loading)
    run(body, clock=clock)


def test_idle_expiry_waits_for_queued_requests_too():
    clock = Clock()

    async def body(s: ServingScheduler, fx: FakeEffects):
        fx.idle_s = 60
        fx.exclusive = False
        fx.deps["b"] = _dep("b")
        assert await s.expire_idle() == []  # first seen now
        pending = asyncio.create_task(s.acquire(Need("a")))
        await until(lambda: len(fx.tickets) == 1)
        clock.now += 3600
        assert await s.expire_idle() == ["b"]  # b idles; a is being loaded for a waiting request
        fx.complete(fx.tickets[0])
        lease = await pending
        clock.now += 3600
        assert await s.expire_idle() == []
        s.release(lease)
    run(body, clock=clock)
