"""The one serving scheduler: leases, the FIFO per model, on-demand loads queued into the runner, idle expiry.

It only decides; everything it does to the world goes through :class:`ServingEffects` (the controller, or a
fake in tests), as llama-swap's router ``Scheduler`` acts through its ``Effects`` and Ollama's ``sched.go``
through injected load functions. It runs on one asyncio loop (the server's); :meth:`status` may be read
from any thread.

* **Admission first.** A request is admitted (the model is cached and servable, takes its tools, its prompt
  plus answer fit the served context, it fits in memory) *before* anything is loaded or evicted; a refused
  request changes nothing.
* **Leases.** An admitted request gets a :class:`Lease` on the READY deployment of its model: one slot in
  the controller's ledger (apply waits for it to drain; an emergency clear or an unload cancels it). The
  leases of a deployment are its refcount. A deployment that generates in-process serves one lease at a time,
  in the order asked (FIFO per model); an HTTP deployment (an engine with an endpoint) takes them all.
* **Loads.** A request for a model that is not running joins the one pending load of that model or queues a
  new one into the operation runner (it starts when the runner's slot frees; no polling). While it runs, the
  models it will stop take no new leases (they drain). A load that fails fails every request waiting on it.
* **Pause.** After an emergency clear or an explicit unload, on-demand loading is paused (see
  :mod:`.serving`); requests then get :class:`ServingPausedError` instead of loading the model again.
* **Emergency clear.** Every lease is freed at once and every queued request is answered (the pause, or
  :class:`GenerationCancelledError`): nothing stays queued or in flight.
* **Idle expiry.** A READY model with no lease, no waiter and no pending load for ``idle_unload_s`` is
  unloaded (an unload that does not pause); never while a request runs on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .backend import Deployment
from .errors import (
    GenerationCancelledError,
    MemctlError,
    OperationCancelledError,
    RequestRefusedError,
    ServingPausedError,
)

log = logging.getLogger("memctl.serving")

# Without max_tokens a request may generate what the served context leaves after its prompt, up to this many
# tokens (never an error: vLLM and Ollama accept such a request too). Documented in README ("Serving").
DEFAULT_MAX_OUTPUT_TOKENS = 8192
IDLE_TICK_S = 0.25
MAX_ROUNDS = 8  # a model may be switched away again before a request gets it: bounded
PAUSE_RETRY_AFTER_S = 30  # what the paused answer's Retry-After says


# --------------------------------------------------------------------------- values
@dataclass(frozen=True)
class Need:
    """What a request asks of a model, known before anything loads."""

    model_id: str
    request: Any = None  # a GenerationRequest to count the prompt's tokens with (None: not counted)
    requested_tokens: int | None = None  # max_tokens / max_completion_tokens; None: not given
    tools: bool = False  # the request sends tools (and does not say tool_choice "none")


@dataclass(frozen=True)
class Facts:
    """What admission found out without loading anything (``ServingEffects.admit``)."""

    model_id: str
    context_tokens: int | None  # the served context (the deployment's, or the plan's)
    prompt_tokens: int | None = None  # None: could not be counted before the model runs
    tools_supported: bool | None = None  # None: unknown, or the engine parses tools itself
    to_stop: frozenset[str] = frozenset()  # models a load of it would stop


def output_budget(model_id: str, prompt_tokens: int, requested: int | None, context_tokens: int | None,
                  default_max: int = DEFAULT_MAX_OUTPUT_TOKENS) -> int:
    """How many new tokens a request may generate; RequestRefusedError ``context_length_exceeded`` (naming
    both numbers) when the prompt plus the requested answer do not fit the served context.

    Without ``requested``: what the context leaves after the prompt, at most ``default_max``."""
    if context_tokens is None:
        return requested or min(default_max, 512)
    if requested is not None and prompt_tokens + requested > context_tokens:
        raise RequestRefusedError(
            f"{model_id} is served with a context of {context_tokens} tokens, but this request needs "
            f"{prompt_tokens + requested}: {prompt_tokens} in the prompt plus {requested} requested for the "
            f"answer", "shorten the conversation or ask for fewer output tokens (max_tokens)",
            code="context_length_exceeded", param="messages",
            args={"model": model_id, "context": context_tokens, "prompt": prompt_tokens, "requested": requested})
    if requested is None and prompt_tokens >= context_tokens:
        raise RequestRefusedError(
            f"{model_id} is served with a context of {context_tokens} tokens, but the prompt alone takes "
            f"{prompt_tokens} tokens (0 left for the answer)", "shorten the conversation",
            code="context_length_exceeded", param="messages",
            args={"model": model_id, "context": context_tokens, "prompt": prompt_tokens})
    if requested is not None:
        return requested
    return max(1, min(default_max, context_tokens - prompt_tokens))


def check_admission(need: Need, facts: Facts) -> None:
    """Refuse what the model cannot take as sent: tools it does not render, a prompt over its context."""
    if need.tools and facts.tools_supported is False:
        raise RequestRefusedError(
            f"{facts.model_id} does not support tools: its chat template does not render them, so the tools "
            "would be dropped", "send the request without tools, or pick a model whose template renders "
            "tools (see `memctl ps` / the `tools` field of /v1/models)", code="tools_not_supported",
            param="tools", args={"model": facts.model_id})
    if facts.prompt_tokens is not None:
        output_budget(facts.model_id, facts.prompt_tokens, need.requested_tokens, facts.context_tokens)


def paused_error(model_id: str, pause: Any) -> ServingPausedError:
    why = "an emergency clear" if getattr(pause, "reason", "") == "emergency_clear" else "an unload"
    return ServingPausedError(
        f"{model_id} is not loaded and loading models on demand is paused since {why}",
        "load a model from the dashboard, or resume serving there or with `memctl serve resume`",
        code="serving_paused", args={"model": model_id, "reason": getattr(pause, "reason", None),
                                     "retry_after_s": PAUSE_RETRY_AFTER_S})


def cancelled_error(model_id: str, reason: str | None) -> GenerationCancelledError:
    why = {"emergency_clear": "an emergency clear ran", "unload": f"{model_id} was unloaded",
           "switch": "another model is being loaded in its place"}.get(reason or "", "the model went away")
    return GenerationCancelledError(f"the request for {model_id} was cancelled: {why}", "send it again",
                                    code="generation_cancelled", args={"model": model_id, "reason": reason})


class Ticket(Protocol):
    """A queued load (the runner's Operation): calls back once it has ended."""

    def add_done_callback(self, fn: Callable[[Any], None]) -> None: ...


class ServingEffects(Protocol):
    """Everything the scheduler does to the world. Blocking calls are run off the loop."""

    def ready(self, model_id: str) -> Deployment | None:
        """The READY deployment of ``model_id`` now, or None (fast: no engine is asked)."""

    def running(self) -> list[Deployment]:
        """Every READY deployment (fast)."""

    def admit(self, need: Need, deployment: Deployment | None) -> Facts:
        """Blocking. The facts admission needs; raises ModelNotFoundError, RequestRefusedError
        (``model_not_servable`` ...), InsufficientMemoryError — and changes nothing."""

    def paused(self, model_id: str) -> Any:
        """The pause covering ``model_id`` (reason, since), or None."""

    def on_demand(self) -> bool:
        """Whether a request may load a model that is not running."""

    def idle_unload_s(self) -> float:
        """Unload a model idle this long (0: never)."""

    def load(self, model_id: str) -> Ticket:
        """Queue a load; the ticket's result is the deployment, or ``error``."""

    def unload_idle(self, model_id: str) -> None:
        """Blocking. Unload ``model_id`` (idle): no pause."""

    def open_lease(self, deployment: Deployment) -> Any:
        """A slot in the controller's ledger (``cancelled()``, ``reason``, ``generator``)."""

    def close_lease(self, slot: Any) -> None: ...

    def subscribe(self, fn: Callable[[str, frozenset[str] | None], None]) -> Callable[[], None]:
        """Serving events from any thread ("cancel", "paused", "resumed"); returns unsubscribe."""


@dataclass(eq=False)
class Lease:
    """One admitted request's hold on a deployment; give it back with ``ServingScheduler.release``."""

    model_id: str
    deployment: Deployment
    slot: Any
    facts: Facts | None = None
    released: bool = False

    def cancelled(self) -> bool:
        return bool(self.slot.cancelled())

    @property
    def reason(self) -> str | None:
        return getattr(self.slot, "reason", None)

    @property
    def exclusive(self) -> bool:
        """Generates in this process: one lease at a time per model."""
        return not self.deployment.endpoint


@dataclass(eq=False)
class _Model:
    last_used_s: float
    leases: set[Lease] = field(default_factory=set)  # refcount of its deployment
    turn: Lease | None = None  # the lease generating now (in-process deployments)
    turns: deque[tuple[Lease, asyncio.Future]] = field(default_factory=deque)  # FIFO of leases waiting
    waiting: int = 0  # requests not yet leased (admission, a load, a drain)


class ServingScheduler:
    def __init__(self, effects: ServingEffects, *, clock: Callable[[], float] = time.monotonic,
                 max_rounds: int = MAX_ROUNDS) -> None:
        self.effects = effects
        self.clock = clock
        self.max_rounds = max_rounds
        self._models: dict[str, _Model] = {}
        self._loads: dict[str, asyncio.Future] = {}  # model id -> its pending load
        self._draining: dict[str, asyncio.Future] = {}  # model id -> what ends its drain (a load, an unload)
        self._lock = threading.Lock()  # status() readers on other threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._idle_task: asyncio.Task | None = None
        self._closed = False

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        """Bind to the running loop and start the idle timer (idempotent). Serving events are subscribed to at
        the first request (before it, there is no lease or waiter an event could concern)."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
        if self._idle_task is None or self._idle_task.done():
            self._idle_task = loop.create_task(self._idle_loop(), name="memctl-idle-unload")

    def _subscribed(self) -> None:
        self.start()
        if self._unsubscribe is None and not self._closed:
            self._unsubscribe = self.effects.subscribe(self._event_from_thread)

    def close(self) -> None:
        """Stop the idle timer and the subscription (from any thread; idempotent)."""
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        task = self._idle_task
        if task is not None and not task.done():
            try:
                task.get_loop().call_soon_threadsafe(task.cancel)
            except RuntimeError:  # its loop is closed already
                pass

    def _model(self, model_id: str) -> _Model:
        m = self._models.get(model_id)
        if m is None:
            with self._lock:
                m = self._models[model_id] = _Model(self.clock())
        return m

    # ------------------------------------------------------------------ leases
    async def admit(self, need: Need) -> Facts:
        """Admission alone (blocking work off the loop): the facts, or the refusal — the pause when the model is
        not running and on-demand loading is paused. Nothing is loaded or evicted."""
        self._subscribed()
        dep = self.effects.ready(need.model_id)
        pause = self.effects.paused(need.model_id)
        if pause is not None:
            raise paused_error(need.model_id, pause)
        facts = await asyncio.to_thread(self.effects.admit, need, dep)
        check_admission(need, facts)
        return facts

    async def acquire(self, need: Need, facts: Facts | None = None) -> Lease:
        """Admit ``need`` (unless ``facts`` says it was), load its model when it is not running (queued; shared
        with every request for the same model), and return a lease on its READY deployment — with the FIFO
        turn when it generates in-process.

        Raises ModelNotFoundError, RequestRefusedError, InsufficientMemoryError (admission: nothing changed),
        ServingPausedError, GenerationCancelledError, or the load's error. Pair with :meth:`release`."""
        self._subscribed()
        model_id = need.model_id
        m = self._model(model_id)
        with self._lock:
            m.waiting += 1
        counted = False
        try:
            for _ in range(self.max_rounds):
                drain = self._draining.get(model_id)
                if drain is not None:  # a load or an idle unload is stopping it: wait for that, then look again
                    await _settled(drain)
                    continue
                if facts is None:
                    facts = await self.admit(need)
                    continue  # admission took time: look again at what runs
                dep = self.effects.ready(model_id)
                pause = self.effects.paused(model_id)
                if pause is not None:  # an unload of it is under way, or loading is paused
                    raise paused_error(model_id, pause)
                if dep is None:
                    if not self.effects.on_demand():
                        raise RequestRefusedError(
                            f"{model_id} is cached but not running, and loading models on demand is off "
                            "(serve_on_demand = false)", "load it from the dashboard or with `memctl load`",
                            code="model_not_loaded", param="model", args={"model": model_id})
                    await self._load(model_id, facts)
                    continue
                lease = Lease(model_id, dep, self.effects.open_lease(dep), facts)
                with self._lock:
                    m.leases.add(lease)
                    m.waiting -= 1
                    counted = True
                    m.last_used_s = self.clock()
                if not lease.exclusive:
                    return lease
                try:
                    await self._take_turn(m, lease)
                except BaseException:
                    self.release(lease)
                    raise
                return lease
            raise cancelled_error(model_id, "switch")
        finally:
            if not counted:
                with self._lock:
                    m.waiting -= 1
                    m.last_used_s = self.clock()

    def gone_error(self, lease: Lease) -> MemctlError:
        """What to tell a request whose lease was cancelled: the pause, or a retryable cancellation."""
        return self._gone(lease.model_id, lease.reason)

    async def _take_turn(self, m: _Model, lease: Lease) -> None:
        if m.turn is None and not m.turns:
            m.turn = lease
            return
        fut = asyncio.get_running_loop().create_future()
        m.turns.append((lease, fut))
        await fut  # cancelled (the client went away) or refused: the caller releases the lease

    def _grant(self, m: _Model) -> None:
        while m.turn is None and m.turns:
            lease, fut = m.turns.popleft()
            if fut.done() or lease.released:
                continue
            m.turn = lease
            fut.set_result(None)

    def release(self, lease: Lease) -> None:
        """Give a lease back (idempotent; on the loop's thread)."""
        if lease.released:
            return
        lease.released = True
        self.effects.close_lease(lease.slot)
        m = self._model(lease.model_id)
        with self._lock:
            m.leases.discard(lease)
            m.last_used_s = self.clock()
        m.turns = deque((le, f) for le, f in m.turns if le is not lease)
        if m.turn is lease:
            m.turn = None
        self._grant(m)

    async def _load(self, model_id: str, facts: Facts) -> None:
        fut = self._loads.get(model_id)
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            fut.add_done_callback(_retrieve)
            self._loads[model_id] = fut
            for other in facts.to_stop - {model_id}:
                self._draining.setdefault(other, fut)
            log.info("loading %s on demand (stopping %s)", model_id, ", ".join(sorted(facts.to_stop)) or "nothing")
            try:
                ticket = self.effects.load(model_id)
            except BaseException as exc:
                self._load_done(model_id, fut, None, exc)
                raise
            ticket.add_done_callback(lambda op: loop.call_soon_threadsafe(
                self._load_done, model_id, fut, getattr(op, "result", None), getattr(op, "error", None)))
        await asyncio.shield(fut)

    def _load_done(self, model_id: str, fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
        if self._loads.get(model_id) is fut:
            del self._loads[model_id]
        for other in [k for k, v in self._draining.items() if v is fut]:
            del self._draining[other]
        if fut.done():  # answered already (an emergency clear)
            return
        if error is None:
            self._model(model_id).last_used_s = self.clock()
            log.info("%s is ready (on demand)", model_id)
            fut.set_result(result)
            return
        if isinstance(error, OperationCancelledError):
            pause = self.effects.paused(model_id)
            error = paused_error(model_id, pause) if pause is not None else cancelled_error(model_id, None)
        log.info("on-demand load of %s failed: %s", model_id, error)
        fut.set_exception(error)

    # ------------------------------------------------------------------ events
    def _event_from_thread(self, event: str, models: frozenset[str] | None) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._on_event, event, models)
        except RuntimeError:  # the loop is closed
            pass

    def _on_event(self, event: str, models: frozenset[str] | None) -> None:
        if event != "cancel":
            return
        if models is None:
            self._clear_all()
            return
        for model_id in models:
            m = self._models.get(model_id)
            if m is None:
                continue
            # Its deployment goes away: requests waiting for a turn on it are answered now (the pause or a
            # retryable cancellation), never left to find it gone.
            turns, m.turns = list(m.turns), deque()
            for lease, fut in turns:
                if not fut.done():
                    fut.set_exception(self._gone(model_id, lease.reason))

    def _gone(self, model_id: str, reason: str | None) -> MemctlError:
        pause = self.effects.paused(model_id)
        return paused_error(model_id, pause) if pause is not None else cancelled_error(model_id, reason)

    def _clear_all(self) -> None:
        """An emergency clear: free every lease, answer every queued request, forget every pending load."""
        for model_id, m in list(self._models.items()):
            with self._lock:
                leases, m.leases = list(m.leases), set()
            for lease in leases:
                lease.released = True
                self.effects.close_lease(lease.slot)
            m.turn = None
            turns, m.turns = list(m.turns), deque()
            for _lease, fut in turns:
                if not fut.done():
                    fut.set_exception(self._gone(model_id, "emergency_clear"))
        loads, self._loads = dict(self._loads), {}
        for model_id, fut in loads.items():
            if not fut.done():
                fut.set_exception(self._gone(model_id, "emergency_clear"))
        self._draining.clear()

    # ------------------------------------------------------------------ idle expiry
    async def _idle_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(IDLE_TICK_S)
            try:
                await self.expire_idle()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the timer must survive a failed unload
                log.warning("idle unload failed: %s", exc)

    def _idle_for(self, model_id: str, now: float) -> float | None:
        m = self._model(model_id)
        if m.leases or m.waiting or m.turns or model_id in self._loads or model_id in self._draining:
            return None
        return now - m.last_used_s

    async def expire_idle(self) -> list[str]:
        """Unload every READY model idle for ``idle_unload_s``; the ids unloaded."""
        idle_s = float(self.effects.idle_unload_s() or 0)
        if idle_s <= 0:
            return []
        done: list[str] = []
        for dep in list(self.effects.running()):
            idle_for = self._idle_for(dep.model_id, self.clock())
            if idle_for is None or idle_for < idle_s:
                continue
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_retrieve)
            self._draining[dep.model_id] = fut
            try:
                await asyncio.to_thread(self.effects.unload_idle, dep.model_id)
                log.info("idle for %.0f s: unloaded %s", idle_for, dep.model_id)
                done.append(dep.model_id)
            except MemctlError as exc:
                log.warning("idle unload of %s failed: %s", dep.model_id, exc)
            finally:
                if self._draining.get(dep.model_id) is fut:
                    del self._draining[dep.model_id]
                if not fut.done():
                    fut.set_result(None)
                self._model(dep.model_id).last_used_s = self.clock()
        return done

    # ------------------------------------------------------------------ reading
    def status(self) -> dict[str, dict[str, Any]]:
        """model_id -> {"in_flight", "queued", "leases", "idle_unload_in_s"} for running or asked-for models."""
        try:
            idle_s = float(self.effects.idle_unload_s() or 0)
            running = {d.model_id for d in self.effects.running()}
        except Exception:  # noqa: BLE001 - status must answer whatever a backend does
            idle_s, running = 0.0, set()
        now = self.clock()
        with self._lock:
            items = [(k, len(m.leases), m.waiting, m.turn is not None, m.last_used_s)
                     for k, m in self._models.items()]
        out: dict[str, dict[str, Any]] = {}
        for model_id, leases, waiting, turn, last in items:
            if model_id not in running and not (leases or waiting):
                continue
            exclusive_wait = max(0, leases - 1) if turn else 0
            countdown = None
            if idle_s > 0 and model_id in running and not (leases or waiting):
                countdown = max(0.0, idle_s - (now - last))
            out[model_id] = {"in_flight": leases - exclusive_wait, "queued": waiting + exclusive_wait,
                             "leases": leases, "idle_unload_in_s": countdown}
        for model_id in running - set(out):
            out[model_id] = {"in_flight": 0, "queued": 0, "leases": 0,
                             "idle_unload_in_s": idle_s if idle_s > 0 else None}
        return out


async def _settled(fut: asyncio.Future) -> None:
    """Wait for ``fut`` whatever it ends with (a drain ends when the load ends, well or not)."""
    with contextlib.suppress(Exception):
        await asyncio.shield(fut)


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # never "exception was never retrieved"
