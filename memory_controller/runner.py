"""The one operation runner: one slot, one worker per operation, cancellation, deadlines, progress, results.

Every state-changing call (apply, unload, stop, clear, emergency clear) is an :class:`Operation`
run on its own worker thread. Only one holds the slot at a time; a second is refused at once with
:class:`OperationBusyError` (what runs and since when). An emergency clear does not wait for the
slot: it cancels the running operation (its flag is set; backend calls see it at their next
checkpoint) and runs beside it.

The caller either waits (``run``: the synchronous API; progress events are handed to its callback
on the caller's own thread — Streamlit needs that) or gets the :class:`Operation` back at once
(``submit``: the dashboard polls it, so a long apply never freezes the page). Finished operations
are kept (newest first) so every tab sees the same results.

Backend calls inside an operation go through :meth:`OperationContext.call`: on a sub-worker, with
a deadline and the cancel flag watched; a result that arrives after we stopped waiting is handed
to ``on_late_result`` for clean-up.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import OperationBusyError, OperationCancelledError, OperationTimeoutError
from .types import OperationRecord, ProgressCallback, ProgressEvent

# Kinds that may run while another holds the slot (they stop it instead of waiting).
CONCURRENT_KINDS = frozenset({"emergency_clear"})


@dataclass
class Operation:
    op_id: str
    kind: str
    title: str
    params: dict[str, Any]
    started_at: float
    record: OperationRecord
    cancel: threading.Event = field(default_factory=threading.Event)
    ended_at: float | None = None
    result: Any = None
    error: BaseException | None = None
    _events: list[ProgressEvent] = field(default_factory=list)
    _queue: queue.Queue = field(default_factory=queue.Queue)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _done: threading.Event = field(default_factory=threading.Event)
    _callbacks: list[Callable[[Operation], None]] = field(default_factory=list)
    queued: bool = False  # waiting in the runner's queue for the slot (submit(..., queue=True))

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    def add_done_callback(self, fn: Callable[[Operation], None]) -> None:
        """Call ``fn(op)`` once it has ended (at once, on this thread, when it already has); callbacks run on
        the thread that ends the operation and must not block."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _end(self) -> None:
        with self._lock:
            self._done.set()
            fns, self._callbacks = self._callbacks, []
        for fn in fns:
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - a broken callback must not break the runner
                pass

    @property
    def elapsed_s(self) -> float:
        return (self.ended_at or time.time()) - self.started_at

    @property
    def last_event(self) -> ProgressEvent | None:
        with self._lock:
            return self._events[-1] if self._events else None

    def events(self) -> list[ProgressEvent]:
        with self._lock:
            return list(self._events)

    def emit(self, event: ProgressEvent) -> None:
        with self._lock:
            self._events.append(event)
        self._queue.put(event)

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._done.wait(timeout_s)

    def outcome(self) -> Any:
        """The result, or raise the error the operation ended with."""
        self._done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class OperationContext:
    """What an operation's body gets: its record, progress, cancel checks and deadline calls."""

    def __init__(self, op: Operation) -> None:
        self.op = op
        self.record = op.record

    def emit(self, stage: str, message: str, fraction: float | None = None, elapsed_s: float | None = None) -> None:
        self.op.emit(ProgressEvent(stage, message, fraction, elapsed_s))

    @property
    def cancelled(self) -> bool:
        return self.op.cancel.is_set()

    def check_cancel(self) -> None:
        if self.op.cancel.is_set():
            raise OperationCancelledError("the operation was stopped by an emergency clear",
                                          "start it again when ready", code="cancelled")

    def call(self, fn: Callable[[ProgressCallback], Any], *, what: str, deadline_s: float,
             on_late_result: Callable[[Any], None] | None = None, cancellable: bool = True) -> Any:
        """Run ``fn(progress)`` on a sub-worker; wait up to ``deadline_s``, watching the cancel flag."""
        return call_with_deadline(fn, what=what, deadline_s=deadline_s, progress=self.op.emit,
                                  cancel=self.op.cancel if cancellable else None, on_late_result=on_late_result)


def call_with_deadline(fn: Callable[[ProgressCallback], Any], *, what: str, deadline_s: float,
                       progress: ProgressCallback | None = None, cancel: threading.Event | None = None,
                       on_late_result: Callable[[Any], None] | None = None) -> Any:
    done = threading.Event()
    box: dict[str, Any] = {}
    abandoned = threading.Event()
    lock = threading.Lock()

    def emit(event: ProgressEvent) -> None:
        if progress is not None and not abandoned.is_set():
            try:
                progress(event)
            except Exception:  # noqa: BLE001 - a broken callback must not break the operation
                pass

    def runner() -> None:
        try:
            result = fn(emit)
            with lock:
                box["result"] = result
                late = abandoned.is_set()
            if late and on_late_result is not None:
                try:
                    on_late_result(result)
                except Exception:  # noqa: BLE001
                    pass
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=runner, name=f"memctl-{what}", daemon=True).start()
    end = time.monotonic() + deadline_s
    while not done.wait(0.05):
        cancelled = cancel is not None and cancel.is_set()
        if cancelled or time.monotonic() > end:
            with lock:
                if done.is_set():
                    break
                abandoned.set()
            if cancelled:
                raise OperationCancelledError(f"{what} was stopped by an emergency clear",
                                              "its result is discarded when it returns", code="cancelled")
            raise OperationTimeoutError(
                f"{what} did not finish within {deadline_s:.0f} s",
                "it is abandoned and cleaned up when it returns; check the logs, or raise the deadline "
                "(MEMCTL_OPERATION_TIMEOUT_S / MEMCTL_STEP_TIMEOUT_S)", code="timeout", args={"what": what, "deadline_s": deadline_s})
    if "error" in box:
        raise box["error"]
    return box.get("result")


class OperationRunner:
    """The slot and the board of operations. Thread-safe; ``version`` changes at each start and end."""

    def __init__(self, *, on_start: Callable[[OperationRecord], None],
                 on_end: Callable[[OperationRecord], None], keep: int = 20) -> None:
        self._on_start = on_start
        self._on_end = on_end
        self._lock = threading.Lock()
        self._running: dict[str, Operation] = {}
        self._finished: deque[Operation] = deque(maxlen=keep)
        self._queue: deque[tuple[Operation, Callable[[OperationContext], Any]]] = deque()
        self.version = 0

    # ------------------------------------------------------------------ starting
    def submit(self, kind: str, title: str, body: Callable[[OperationContext], Any],
               params: dict[str, Any] | None = None, *, queue: bool = False) -> Operation:
        """Start ``body(ctx)`` on a worker; refuse at once (OperationBusyError) when the slot is taken.

        ``queue=True`` (the serving scheduler's on-demand loads): when the slot is taken the operation waits
        in a FIFO instead (``op.queued``) and starts when the slot frees; an emergency clear cancels what
        waits there (OperationCancelledError, never run, never logged)."""
        now = time.time()
        op_id = uuid.uuid4().hex[:12]
        record = OperationRecord(op_id=op_id, kind=kind, params=dict(params or {}), started_at=now)
        op = Operation(op_id, kind, title, dict(params or {}), now, record)
        with self._lock:
            if queue and kind not in CONCURRENT_KINDS and (self._running or self._queue):
                op.queued = True
                self._queue.append((op, body))
                self.version += 1
                return op
            holders = [o for o in self._running.values() if o.kind not in CONCURRENT_KINDS]
            if kind in CONCURRENT_KINDS and any(o.kind == kind for o in self._running.values()):
                raise OperationBusyError(f"an {kind.replace('_', ' ')} is already running", "wait for it to finish",
                                         code="busy", args={"running": kind})
            if holders and kind not in CONCURRENT_KINDS:
                raise self._busy_error(holders[0], kind)
            if kind not in CONCURRENT_KINDS and any(o.kind in CONCURRENT_KINDS for o in self._running.values()):
                raise OperationBusyError(f"an emergency clear is running; {kind} was not started",
                                         "wait a few seconds for it to finish", code="busy",
                                         args={"running": "emergency_clear", "refused": kind})
            if kind in CONCURRENT_KINDS:
                for o in holders:
                    o.cancel.set()
                dropped, self._queue = list(self._queue), deque()
            else:
                dropped = []
            self._running[op_id] = op
            self.version += 1
        for waiting, _body in dropped:
            self._drop(waiting, kind)
        threading.Thread(target=self._work, args=(op, body), name=f"memctl-op-{kind}", daemon=True).start()
        return op

    def _drop(self, op: Operation, by: str) -> None:
        """End a queued operation that never ran."""
        op.error = OperationCancelledError(f"{op.kind} ({op.title}) was waiting to start and was dropped by an "
                                           f"{by.replace('_', ' ')}", "ask again when ready", code="cancelled")
        op.ended_at = time.time()
        op.queued = False
        with self._lock:
            self._finished.appendleft(op)
            self.version += 1
        op._end()

    def _start_queued(self) -> None:
        """Start the first queued operation when the slot is free (called as each operation ends)."""
        with self._lock:
            if self._running or not self._queue:
                return
            op, body = self._queue.popleft()
            op.queued = False
            op.started_at = op.record.started_at = time.time()
            self._running[op.op_id] = op
            self.version += 1
        threading.Thread(target=self._work, args=(op, body), name=f"memctl-op-{op.kind}", daemon=True).start()

    def queued(self) -> list[Operation]:
        with self._lock:
            return [op for op, _ in self._queue]

    @staticmethod
    def _busy_error(other: Operation, kind: str) -> OperationBusyError:
        since = time.strftime("%H:%M:%S", time.localtime(other.started_at))
        return OperationBusyError(
            f"{other.kind} ({other.title}) is running since {since} ({time.time() - other.started_at:.0f} s ago); "
            f"{kind} was not started",
            "wait for it to finish, or use 🚨 emergency clear to stop it",
            code="busy", args={"running": other.kind, "title": other.title, "since": other.started_at, "refused": kind},
        )

    def _work(self, op: Operation, body: Callable[[OperationContext], Any]) -> None:
        try:
            self._on_start(op.record)
        except Exception:  # noqa: BLE001 - the start marker is best effort; the end record is written anyway
            pass
        try:
            op.result = body(OperationContext(op))
            if op.record.outcome is None:
                from .types import Outcome

                warn = any(s.outcome is Outcome.WARNING for s in op.record.steps)
                op.record.outcome = Outcome.WARNING if warn else Outcome.SUCCESS
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            from .types import Outcome

            if (isinstance(exc, OperationCancelledError) and op.cancel.is_set()
                    and "emergency clear" not in exc.message):  # a backend's own "cancelled" says why, too
                said = OperationCancelledError(f"{op.title} was stopped by an emergency clear ({exc.message})",
                                               exc.hint or "start it again when ready", code="cancelled")
                said.__cause__ = exc
                exc = said
            op.error = exc
            op.record.outcome = Outcome.ERROR
            op.record.error = str(exc)
            try:
                exc.operation = op.record  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001
                pass
        finally:
            op.ended_at = op.record.ended_at = time.time()
            try:
                self._on_end(op.record)
            except Exception:  # noqa: BLE001
                pass
            with self._lock:
                self._running.pop(op.op_id, None)
                self._finished.appendleft(op)
                self.version += 1
            op._end()
            self._start_queued()

    def run(self, kind: str, title: str, body: Callable[[OperationContext], Any],
            params: dict[str, Any] | None = None, progress: ProgressCallback | None = None) -> Any:
        """Submit and wait; progress events reach ``progress`` on this (the caller's) thread."""
        return self.run_existing(self.submit(kind, title, body, params), progress)

    @staticmethod
    def run_existing(op: Operation, progress: ProgressCallback | None = None) -> Any:
        """Wait for ``op``, handing its progress events to ``progress`` on this thread; its result or error."""
        while True:
            finished = op.wait(0.05)
            while progress is not None:
                try:
                    event = op._queue.get_nowait()
                except queue.Empty:
                    break
                try:
                    progress(event)
                except Exception:  # noqa: BLE001 - a broken callback must not break the operation
                    pass
            if finished and (progress is None or op._queue.empty()):
                break
        return op.outcome()

    # ------------------------------------------------------------------ reading
    def running(self) -> list[Operation]:
        with self._lock:
            return sorted(self._running.values(), key=lambda o: o.started_at)

    def holder(self) -> Operation | None:
        with self._lock:
            return next((o for o in self._running.values() if o.kind not in CONCURRENT_KINDS), None)

    def finished(self, limit: int | None = None) -> list[Operation]:
        with self._lock:
            items = list(self._finished)
        return items[:limit] if limit is not None else items

    def get(self, op_id: str) -> Operation | None:
        with self._lock:
            return self._running.get(op_id) or next((o for o in self._finished if o.op_id == op_id), None)

    def wait_idle(self, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            ops = self.running() or self.queued()
            if not ops:
                return True
            ops[0].wait(max(0.0, min(0.2, end - time.monotonic())))
        return not self.running() and not self.queued()
