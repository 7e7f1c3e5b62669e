"""Which model serves a request, when it is loaded on demand, and when an idle one is unloaded.

* A request for a READY model gets a lease at once (requests for a running model keep being served).
* A request for a cached model that is not running waits for a *switch*: one at a time, in the order
  asked (an ``asyncio.Lock`` is FIFO). The switch plans the load as the dashboard would
  (``purpose="ide"``), lets the requests already leased on the models it will stop finish first
  (new requests for those queue behind it), then calls ``ctl.ensure_deployment``. Every request
  waiting for the same model shares one switch; a client that goes away does not cancel it.
* Idle unload: a READY model with no lease and no waiter for ``serve_idle_unload_s`` is unloaded
  through ``ctl.unload`` (its ReleaseReport is logged by the controller and here).

All state lives on the event loop; ``status()`` may be read from any thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memory_controller.applying import not_fit_error
from memory_controller.backend import Deployment, DeploymentState
from memory_controller.errors import MemctlError, OperationBusyError
from memory_controller.toolcalls import normalize_family

from .errors import ApiError

log = logging.getLogger("memctl.server.openai")

IDLE_TICK_S = 0.25
BUSY_RETRY_S = 0.5

# Plan blockers that mean "not enough memory" (503, may pass once memory is freed); any other blocker
# is a property of the model or the request (400 model_not_servable).
MEMORY_BLOCKER_CODES = frozenset({"plan.blocked_by_holder", "plan.held_by_others", "backend.over_util_cap",
                                  "backend.gpu_memory_unknown"})


@dataclass
class ModelState:
    leased: int = 0  # requests holding a lease (generating, or in the model's FIFO)
    active: int = 0  # requests generating / proxying now
    waiting: int = 0  # requests waiting for a switch to load the model
    last_used_s: float = field(default_factory=time.monotonic)
    gen_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # FIFO of in-process generation


def not_loaded_error(model_id: str) -> ApiError:
    return ApiError(409, f"{model_id} is cached but not running, and loading models on demand is off "
                         "(serve_on_demand = false)",
                    code="model_not_loaded", param="model",
                    headers={"x-should-retry": "false"})


class Scheduler:
    def __init__(self, ctl: Any, settings: Any, backend_id: Callable[[], str]) -> None:
        self.ctl = ctl
        self.settings = settings
        self._backend_id = backend_id
        self._states: dict[str, ModelState] = {}
        self._lock = threading.Lock()  # guards _states for status() readers on other threads
        self._switch_lock = asyncio.Lock()
        self._switches: dict[str, asyncio.Task] = {}
        self._draining: set[str] = set()
        self._changed = asyncio.Event()
        self._idle_task: asyncio.Task | None = None
        self._families: dict[tuple, str | None] = {}
        self._closed = False

    # ------------------------------------------------------------------ state
    def state(self, model_id: str) -> ModelState:
        with self._lock:
            st = self._states.get(model_id)
            if st is None:
                st = self._states[model_id] = ModelState()
            return st

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def ready(self, model_id: str) -> Deployment | None:
        """The READY deployment of ``model_id`` that may take new requests now, or None."""
        if model_id in self._draining:
            return None
        for dep in self.ctl.deployments():
            if dep.model_id == model_id and dep.state is DeploymentState.READY:
                return dep
        return None

    def status(self) -> dict[str, dict]:
        """model_id -> {"in_flight", "queued", "idle_unload_in_s", "tool_parser", "tools_parsed"} for running or
        asked-for models."""
        idle_s = float(self.settings.serve_idle_unload_s or 0)
        now = time.monotonic()
        try:
            deps = {d.model_id: d for d in self.ctl.deployments() if d.state is DeploymentState.READY}
        except Exception:  # noqa: BLE001 - status must answer whatever a backend does
            deps = {}
        running = set(deps)
        with self._lock:
            items = list(self._states.items())
        out: dict[str, dict] = {}
        for model_id, st in items:
            if model_id not in running and not (st.leased or st.waiting):
                continue
            countdown: float | None = None
            if idle_s > 0 and model_id in running and not (st.leased or st.waiting):
                countdown = max(0.0, idle_s - (now - st.last_used_s))
            out[model_id] = {"in_flight": st.active, "queued": st.waiting + (st.leased - st.active),
                             "idle_unload_in_s": countdown}
        for model_id in running - set(out):
            out[model_id] = {"in_flight": 0, "queued": 0, "idle_unload_in_s": idle_s if idle_s > 0 else None}
        for model_id, entry in out.items():
            dep = deps.get(model_id)
            entry["tool_parser"] = self.tool_parser(dep) if dep is not None else None
            entry["tools_parsed"] = entry["tool_parser"] is not None if dep is not None else None
        return out

    def tool_parser(self, dep: Deployment) -> str | None:
        """How tool calls are read for ``dep``: "engine" (vLLM parses them), a family ("qwen", "llama3",
        "mistral"), or None (tools accepted, text returned: the model's family is unknown)."""
        if dep.endpoint:
            return "engine"
        key = (dep.backend_id, dep.handle, dep.started_at)
        if key not in self._families:
            try:
                family = normalize_family(self.ctl.backend(dep.backend_id).model_family(dep))
            except Exception:  # noqa: BLE001 - a backend that cannot tell: tools are not parsed
                family = None
            self._families[key] = family
        return self._families[key]

    # ------------------------------------------------------------------ leases
    async def acquire(self, model_id: str) -> Deployment:
        """A lease on the READY deployment of ``model_id``, loading it on demand first.

        Raises ApiError / MemctlError (not on demand, does not fit, load failed). Pair with release().
        """
        self.ensure_started()
        st = self.state(model_id)
        st.waiting += 1
        try:
            for _ in range(8):  # a model may be switched away again before we get it; bounded
                dep = self.ready(model_id)
                if dep is not None:
                    st.leased += 1
                    st.last_used_s = time.monotonic()
                    return dep
                await asyncio.shield(self._switch_task(model_id))
            raise ApiError(503, f"{model_id} was unloaded again by other requests before this one ran; "
                                "too many models are being asked for at once", type_="server_error",
                           code="switch_contention")
        finally:
            st.waiting -= 1

    def release(self, model_id: str) -> None:
        st = self.state(model_id)
        st.leased -= 1
        st.last_used_s = time.monotonic()
        self._notify()

    def _switch_task(self, model_id: str) -> asyncio.Task:
        task = self._switches.get(model_id)
        if task is None or task.done():
            task = asyncio.create_task(self._switch(model_id), name=f"memctl-switch:{model_id}")
            self._switches[model_id] = task
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "never retrieved"
        return task

    def plan_load(self, model_id: str) -> Any:
        """The plan a switch to ``model_id`` would run (the same one ``ensure_deployment`` makes).

        Raises ApiError 503 (``insufficient_memory``) when a memory blocker forbids it or it does not fit
        (needed vs free and the suggestion), ApiError 400 (``model_not_servable``) naming the reason and
        what to do for any other blocker (no tokenizer, no chat template, context over the model's
        maximum); nothing is touched."""
        plan = self.ctl.plan(self._backend_id(), model_id, purpose="ide")
        if plan.blockers:
            reasons = "; ".join(str(b) for b in plan.blockers)
            if any(getattr(b, "code", "") in MEMORY_BLOCKER_CODES for b in plan.blockers):
                raise ApiError(503, f"{model_id} cannot be served now: {reasons}", type_="server_error",
                               code="insufficient_memory", headers={"x-should-retry": "false"})
            raise ApiError(400, f"{model_id} cannot be served: {reasons}. Fix that (see `memctl plan "
                           f"{model_id}`) or pick another cached model.", code="model_not_servable",
                           param="model", headers={"x-should-retry": "false"})
        if not plan.fits:
            raise not_fit_error(plan)
        return plan

    async def _switch(self, model_id: str) -> None:
        async with self._switch_lock:
            if self.ready(model_id) is not None:
                return
            if not self.settings.serve_on_demand:
                raise not_loaded_error(model_id)
            plan = await asyncio.to_thread(self.plan_load, model_id)
            to_stop = {d.model_id for d in getattr(plan, "to_stop", ())} - {model_id}
            self._draining |= to_stop
            try:
                await self._wait_drained(to_stop)
                log.info("loading %s on demand (stopping %s)", model_id, ", ".join(sorted(to_stop)) or "nothing")
                dep = await self._ensure(model_id)
                self.state(model_id).last_used_s = time.monotonic()
                log.info("%s is ready (%s, context %s)", model_id, dep.backend_id, dep.context_tokens)
            finally:
                self._draining -= to_stop
                self._notify()

    async def _ensure(self, model_id: str) -> Deployment:
        """``ctl.ensure_deployment``, waiting while another operation (a load from the dashboard, say)
        holds the controller, up to ``operation_timeout_s``; the request's heartbeats go on meanwhile."""
        deadline = time.monotonic() + float(getattr(self.settings, "operation_timeout_s", 1800))
        while True:
            try:
                return await asyncio.to_thread(self.ctl.ensure_deployment, model_id)
            except OperationBusyError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(BUSY_RETRY_S)

    async def _wait_drained(self, model_ids: set[str]) -> None:
        while any(self.state(m).leased for m in model_ids):
            changed = self._changed
            await changed.wait()

    # ------------------------------------------------------------------ idle unload
    def ensure_started(self) -> None:
        if self._closed or (self._idle_task is not None and not self._idle_task.done()):
            return
        self._idle_task = asyncio.get_running_loop().create_task(self._idle_loop(), name="memctl-idle-unload")

    async def _idle_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(IDLE_TICK_S)
            idle_s = float(self.settings.serve_idle_unload_s or 0)
            if idle_s <= 0:
                continue
            try:
                await self._unload_idle(idle_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the timer must survive a failed unload
                log.warning("idle unload failed: %s", exc)

    def _idle_for(self, model_id: str, now: float) -> float | None:
        st = self.state(model_id)
        if st.leased or st.waiting:
            return None
        return now - st.last_used_s

    async def _unload_idle(self, idle_s: float) -> None:
        now = time.monotonic()
        for dep in list(self.ctl.deployments()):
            if dep.state is not DeploymentState.READY:
                continue
            idle_for = self._idle_for(dep.model_id, now)
            if idle_for is None or idle_for < idle_s:
                continue
            async with self._switch_lock:
                idle_for = self._idle_for(dep.model_id, time.monotonic())
                if idle_for is None or idle_for < idle_s or self.ready(dep.model_id) is None:
                    continue
                self._draining.add(dep.model_id)
                try:
                    report = await asyncio.to_thread(self.ctl.unload, dep.model_id)
                    log.info("idle for %.0f s: unloaded %s (%s)", idle_for, dep.model_id,
                             getattr(report, "message", report))
                except MemctlError as exc:
                    log.warning("idle unload of %s failed: %s", dep.model_id, exc)
                finally:
                    self._draining.discard(dep.model_id)
                    self._notify()

    def close(self) -> None:
        """Stop the idle timer and pending switches (from any thread; idempotent)."""
        self._closed = True
        tasks = [self._idle_task, *self._switches.values()]
        for task in tasks:
            if task is not None and not task.done():
                try:
                    task.get_loop().call_soon_threadsafe(task.cancel)
                except RuntimeError:  # its loop is closed already
                    pass
