"""The operation log survives restarts and a torn last line."""

from __future__ import annotations

import json

from memory_controller.oplog import OperationLog
from memory_controller.types import OperationRecord, Outcome, StepRecord


def rec(i: int, outcome: Outcome = Outcome.SUCCESS) -> OperationRecord:
    return OperationRecord(
        op_id=f"op{i}", kind="apply", params={"model": f"m{i}"}, started_at=1000.0 + i, ended_at=1001.0 + i,
        steps=[StepRecord("unload", Outcome.SUCCESS, 0.25, "ok", 10, 5)], outcome=outcome,
        memory_before={"host": 10}, memory_after={"host": 5},
    )


def test_records_are_read_back_newest_first_by_a_new_instance(tmp_path):
    log = OperationLog(tmp_path)
    for i in range(3):
        log.append(rec(i, Outcome.ERROR if i == 1 else Outcome.SUCCESS))
    again = OperationLog(tmp_path).read()
    assert [r.op_id for r in again] == ["op2", "op1", "op0"]
    assert again[1].outcome is Outcome.ERROR
    assert again[0].steps[0].duration_s == 0.25 and again[0].steps[0].memory_after_bytes == 5
    assert OperationLog(tmp_path).read(limit=1)[0].op_id == "op2"


def test_a_torn_last_line_is_skipped_with_a_warning_and_appending_goes_on(tmp_path):
    log = OperationLog(tmp_path)
    log.append(rec(0))
    line = json.dumps({"op_id": "torn", "kind": "apply"})
    with open(log.path, "a") as fh:
        fh.write(line[: len(line) // 2])  # a crash mid-write: no newline
    records = log.read()
    assert [r.op_id for r in records] == ["op0"]
    assert len(log.warnings) == 1 and "torn" in log.warnings[0]
    log.append(rec(1))  # starts on a fresh line
    assert [r.op_id for r in OperationLog(tmp_path).read()] == ["op1", "op0"]


def test_missing_log_is_empty_not_an_error(tmp_path):
    assert OperationLog(tmp_path / "nowhere").read() == []
