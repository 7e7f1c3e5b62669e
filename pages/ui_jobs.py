"""Operations started from the UI run on worker threads, tracked on one shared board.

Why not on the script thread: Streamlit runs a session's script and its fragments one at a time,
so an apply running on the script thread would freeze the live memory panel for its whole
duration. Here the click starts a :class:`Job`; the script returns at once; a small fragment
polls the board and renders the job's steps inside ``st.status`` as they arrive.

The board is process-wide (held by ``st.cache_resource``), like the controller, so every browser
tab sees the same running operation and the same results. No Streamlit import here.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memory_controller.types import ProgressCallback, ProgressEvent

# Kinds that may run while another job runs: the emergency clear stops the running one.
CONCURRENT_KINDS = frozenset({"emergency"})


@dataclass
class Job:
    """One operation started from the UI. ``result`` or ``error`` is set when it ends."""

    job_id: str
    kind: str  # apply | clear | emergency | unload | stop
    title: str
    params: dict[str, Any]
    started_at: float
    ended_at: float | None = None
    result: Any = None
    error: BaseException | None = None
    _events: list[ProgressEvent] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    @property
    def elapsed_s(self) -> float:
        return (self.ended_at or time.time()) - self.started_at

    def add_event(self, event: ProgressEvent) -> None:
        """The progress callback handed to the controller (called on the worker thread)."""
        with self._lock:
            self._events.append(event)

    def events(self) -> list[ProgressEvent]:
        with self._lock:
            return list(self._events)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the job ends; True when it did within ``timeout_s`` seconds."""
        return self._done.wait(timeout_s)


class JobBoard:
    """Starts jobs on daemon threads and remembers the last ``keep`` finished ones. Thread-safe.

    ``version`` changes whenever a job starts or ends: pages compare it with the version they
    last painted to know when a full rerun is due (another tab started something, a job ended).
    """

    def __init__(self, keep: int = 20) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, Job] = {}
        self._finished: deque[Job] = deque(maxlen=keep)
        self.version = 0

    def start(self, kind: str, title: str, fn: Callable[[ProgressCallback], Any],
              params: dict[str, Any] | None = None) -> Job:
        """Run ``fn(progress)`` on a new thread. A second non-emergency job while one runs is refused:
        the new job ends at once with :class:`memory_controller.errors.OperationBusyError`.
        """
        job = Job(job_id=uuid.uuid4().hex[:10], kind=kind, title=title, params=dict(params or {}),
                  started_at=time.time())
        with self._lock:
            busy = [j for j in self._running.values() if j.kind not in CONCURRENT_KINDS]
            self._running[job.job_id] = job
            self.version += 1
        if busy and kind not in CONCURRENT_KINDS:
            from memory_controller.errors import OperationBusyError

            other = busy[0]
            self._finish(job, None, OperationBusyError(
                f"«{other.title}» is still running; «{title}» was not started",
                "wait for it to finish, or use 🚨 emergency clear to stop it",
            ))
            return job

        def runner() -> None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn(job.add_event)
            except BaseException as exc:  # noqa: BLE001 - handed to the page, shown without a traceback
                error = exc
            self._finish(job, result, error)

        threading.Thread(target=runner, name=f"memctl-ui-{kind}", daemon=True).start()
        return job

    def _finish(self, job: Job, result: Any, error: BaseException | None) -> None:
        job.result, job.error, job.ended_at = result, error, time.time()
        with self._lock:
            self._running.pop(job.job_id, None)
            self._finished.appendleft(job)
            self.version += 1
        job._done.set()

    def running(self) -> list[Job]:
        """Jobs still running, oldest first."""
        with self._lock:
            return sorted(self._running.values(), key=lambda j: j.started_at)

    def busy(self) -> bool:
        """True while a job that holds the controller's operation slot runs."""
        with self._lock:
            return any(j.kind not in CONCURRENT_KINDS for j in self._running.values())

    def finished(self, limit: int | None = None) -> list[Job]:
        """Finished jobs, newest first."""
        with self._lock:
            items = list(self._finished)
        return items[:limit] if limit is not None else items

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._running.get(job_id) or next((j for j in self._finished if j.job_id == job_id), None)

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no job runs (tests, scripts); True when idle within ``timeout_s`` seconds."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            jobs = self.running()
            if not jobs:
                return True
            jobs[0].wait(max(0.0, min(0.2, end - time.monotonic())))
        return not self.running()
