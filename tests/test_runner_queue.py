"""The operation runner's queue (on-demand loads wait for the slot instead of polling a busy error)."""

from __future__ import annotations

import threading

import pytest

from memory_controller.errors import OperationBusyError, OperationCancelledError
from memory_controller.runner import OperationRunner


def _runner() -> OperationRunner:
    return OperationRunner(on_start=lambda r: None, on_end=lambda r: None)


def test_a_queued_operation_starts_when_the_slot_frees_in_order():
    runner = _runner()
    gate = threading.Event()
    order: list[str] = []
    first = runner.submit("apply", "first", lambda ctx: gate.wait(10) and order.append("first"))
    with pytest.raises(OperationBusyError):
        runner.submit("apply", "refused", lambda ctx: None)
    seen: list[str] = []
    second = runner.submit("apply", "second", lambda ctx: order.append("second") or "b", queue=True)
    third = runner.submit("apply", "third", lambda ctx: order.append("third") or "c", queue=True)
    second.add_done_callback(lambda op: seen.append(op.result))
    assert second.queued and third.queued and [o.title for o in runner.queued()] == ["second", "third"]
    gate.set()
    assert third.outcome() == "c" and second.outcome() == "b" and first.outcome() is None
    assert order == ["first", "second", "third"] and seen == ["b"]
    assert runner.wait_idle(5)


def test_an_emergency_clear_drops_what_waits_in_the_queue():
    runner = _runner()
    gate = threading.Event()
    runner.submit("apply", "running", lambda ctx: gate.wait(10))
    ran: list[str] = []
    waiting = runner.submit("apply", "waiting", lambda ctx: ran.append("waiting"), queue=True)
    ended: list[BaseException | None] = []
    waiting.add_done_callback(lambda op: ended.append(op.error))
    clear = runner.submit("emergency_clear", "clear", lambda ctx: gate.set())
    clear.outcome()
    with pytest.raises(OperationCancelledError):
        waiting.outcome()
    assert isinstance(ended[0], OperationCancelledError) and ran == [] and runner.wait_idle(5)
