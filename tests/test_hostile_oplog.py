"""Hostile operation logs: wrong-shaped lines, unwritable state dirs, rotation, reading from the end,
and operations a killed process never finished."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from memory_controller.oplog import INTERRUPTED_ERROR, LOG_NAME, OperationLog
from memory_controller.types import OperationRecord, Outcome, StepRecord, to_jsonable

ROOT = Path(__file__).resolve().parent.parent


def rec(i: int, outcome: Outcome | None = Outcome.SUCCESS, **changes) -> OperationRecord:
    r = OperationRecord(
        op_id=f"op{i}", kind="apply", params={"model": f"m{i}"}, started_at=1000.0 + i, ended_at=1001.0 + i,
        steps=[StepRecord("unload", Outcome.SUCCESS, 0.25, "ok", 10, 5)], outcome=outcome,
        memory_before={"host": 10}, memory_after={"host": 5},
    )
    for k, v in changes.items():
        setattr(r, k, v)
    return r


def good_line(i: int) -> str:
    return json.dumps({"phase": "finished", **to_jsonable(rec(i))})


def _with(i: int, **fields) -> str:
    data = {"phase": "finished", **to_jsonable(rec(i))}
    data.update(fields)
    return json.dumps(data)


HOSTILE_LINES = {
    "a list": "[1, 2, 3]",
    "a string": '"just a string"',
    "a number": "42",
    "nested thousands deep": "[" * 5000 + "]" * 5000,
    "an object nested deep": '{"op_id": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}",
    "params a list": _with(90, params=[1, 2]),
    "started_at 'nan'": _with(91, started_at="nan"),
    "started_at NaN": _with(92).replace('"started_at": 1092.0', '"started_at": NaN'),
    "ended_at 1e400": _with(93).replace('"ended_at": 1094.0', '"ended_at": 1e400'),
    "started_at negative": _with(94, started_at=-5),
    "steps a string": _with(95, steps="unload"),
    "a step a number": _with(96, steps=[1]),
    "a step with a text duration": _with(97, steps=[{"name": "x", "outcome": "success", "duration_s": "slow"}]),
    "a step with an unknown outcome": _with(98, steps=[{"name": "x", "outcome": "meh", "duration_s": 1}]),
    "outcome unknown": _with(99, outcome="fabulous"),
    "op_id a number": _with(100, op_id=7),
    "memory a list": _with(101, memory_before=[1]),
    "memory negative": _with(102, memory_after={"host": -1}),
    "no started_at": json.dumps({"op_id": "x", "kind": "apply"}),
    "not UTF-8": b"\xff\xfe\x00garbage".decode("latin-1"),
}


@pytest.mark.parametrize("kind", list(HOSTILE_LINES))
def test_a_wrong_shaped_line_is_skipped_with_a_warning_and_the_good_records_still_show(tmp_path, kind):
    log = OperationLog(tmp_path)
    log.append(rec(0))
    with open(log.path, "a", encoding="latin-1") as fh:
        fh.write(HOSTILE_LINES[kind] + "\n")
    log.append(rec(1))
    records = log.read()
    assert [r.op_id for r in records] == ["op1", "op0"]
    assert len(log.warnings) == 1 and "skipped an unreadable log line" in log.warnings[0]
    assert log.read(limit=1)[0].op_id == "op1"


def test_many_bad_lines_give_a_bounded_number_of_warnings(tmp_path):
    log = OperationLog(tmp_path)
    log.append(rec(0))
    with open(log.path, "a") as fh:
        fh.write("[1]\n" * 500)
    assert [r.op_id for r in log.read()] == ["op0"]
    assert len(log.warnings) <= 21 and "480 more" in log.warnings[-1]


def test_a_line_over_the_size_limit_is_skipped_without_hiding_its_neighbours(tmp_path):
    log = OperationLog(tmp_path)
    log.append(rec(0))
    with open(log.path, "a") as fh:
        fh.write(_with(5, error="x" * (3 * 1024 * 1024)) + "\n")
    log.append(rec(1))
    assert [r.op_id for r in log.read()] == ["op1", "op0"]
    assert any("over" in w for w in log.warnings)


# --------------------------------------------------------------------------- failed writes are visible


def test_state_dir_that_is_a_file_gives_a_kept_write_error(tmp_path):
    state = tmp_path / "state"
    state.write_text("not a folder")
    log = OperationLog(state)
    assert log.append(rec(0)) is False
    errors = log.write_errors()
    assert len(errors) == 1 and "is a file, not a folder" in errors[0] and "MEMCTL_STATE_DIR" in errors[0]
    assert log.read(20) == []
    assert log.write_errors() == errors  # reading the history does not wipe it
    assert errors[0] in log.warnings
    state.unlink()
    assert log.append(rec(1)) is True  # the next successful write clears it
    assert log.write_errors() == []


def test_state_dir_replaced_by_a_file_mid_run_is_reported_until_acknowledged(tmp_path):
    state = tmp_path / "state"
    log = OperationLog(state)
    assert log.append_started(rec(0, outcome=None)) is True
    shutil.rmtree(state)
    state.write_text("replaced")
    assert log.append(rec(0)) is False
    assert log.append(rec(1)) is False
    assert len(log.write_errors()) == 2 and all("is a file" in e for e in log.write_errors())
    log.read()
    log.read()
    assert len(log.write_errors()) == 2
    log.acknowledge()
    assert log.write_errors() == [] and not any("could not write" in w for w in log.warnings)


def test_log_path_that_is_a_folder_or_an_unwritable_place_is_named(tmp_path):
    (tmp_path / LOG_NAME).mkdir()
    log = OperationLog(tmp_path)
    assert log.append(rec(0)) is False
    assert "is a folder" in log.write_errors()[0]
    assert log.read() == [] and any("not a regular file" in w for w in log.warnings)
    proc_log = OperationLog(Path("/proc/1/memctl-state"))  # nobody may create folders in /proc
    assert proc_log.append(rec(0)) is False
    assert "could not write the operation log" in proc_log.write_errors()[0]


def test_a_fifo_in_place_of_the_log_does_not_hang_a_read(tmp_path):
    os.mkfifo(tmp_path / LOG_NAME)
    log = OperationLog(tmp_path)
    assert log.read() == [] and "not a regular file" in log.warnings[0]


# --------------------------------------------------------------------------- rotation and reading from the end


def test_the_log_rotates_at_its_size_limit_and_keeps_a_few_old_files(tmp_path):
    log = OperationLog(tmp_path, max_bytes=3000, keep=2)
    for i in range(60):
        assert log.append(rec(i))
    files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(LOG_NAME) and not p.name.endswith("lock"))
    assert files == [LOG_NAME, LOG_NAME + ".1", LOG_NAME + ".2"]
    assert all((tmp_path / f).stat().st_size <= 3000 for f in files)
    ids = [r.op_id for r in log.read()]
    assert ids[0] == "op59" and ids == [f"op{i}" for i in range(59, 59 - len(ids), -1)]  # newest first, no gaps
    assert "op0" not in ids  # the oldest went with the oldest file
    assert len(ids) > 15 and len(list(tmp_path.glob(LOG_NAME + ".*"))) >= 2
    assert [r.op_id for r in log.read(limit=15)] == [f"op{i}" for i in range(59, 44, -1)]  # across files


def test_history_of_20_reads_from_the_end_of_a_large_log(tmp_path, monkeypatch):
    import memory_controller.oplog as oplog_module

    log = OperationLog(tmp_path)
    with open(log.path, "w") as fh:
        fh.writelines(good_line(i) + "\n" for i in range(100_000))
    read_bytes = []
    real_pread = os.pread
    monkeypatch.setattr(oplog_module.os, "pread", lambda fd, n, pos: read_bytes.append(n) or real_pread(fd, n, pos))
    records = log.read(limit=20)
    assert [r.op_id for r in records] == [f"op{i}" for i in range(99_999, 99_979, -1)]
    assert 0 < sum(read_bytes) < log.path.stat().st_size // 50  # the end of the file, not all 100,000 records


# --------------------------------------------------------------------------- started, finished, interrupted


def test_a_started_operation_shows_as_running_then_once_when_finished(tmp_path):
    log = OperationLog(tmp_path)
    log.append(rec(0))
    running = rec(1, outcome=None, ended_at=None, steps=[])
    assert log.append_started(running)
    shown = log.read()
    assert [(r.op_id, r.outcome) for r in shown] == [("op1", None), ("op0", Outcome.SUCCESS)]
    assert log.interrupted() == []  # this process still runs it
    log.append(rec(1, outcome=Outcome.ERROR))
    assert [(r.op_id, r.outcome) for r in log.read()] == [("op1", Outcome.ERROR), ("op0", Outcome.SUCCESS)]


_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from memory_controller.oplog import OperationLog
from memory_controller.types import OperationRecord
log = OperationLog({state!r})
log.append_started(OperationRecord(op_id={op_id!r}, kind="apply", params={{"model": "m"}}, started_at=time.time()))
print("started", flush=True)
time.sleep(60)
"""


def _child(tmp_path: Path, op_id: str) -> subprocess.Popen:
    code = _CHILD.format(root=str(ROOT), state=str(tmp_path), op_id=op_id)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    return proc


def test_an_operation_killed_mid_run_is_marked_interrupted_on_the_next_start(tmp_path):
    killed = _child(tmp_path, "killed-op")
    alive = _child(tmp_path, "alive-op")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        log = OperationLog(tmp_path)
        by_id = {r.op_id: r for r in log.read()}
        assert by_id["killed-op"].outcome is Outcome.ERROR and by_id["killed-op"].error == INTERRUPTED_ERROR
        assert by_id["alive-op"].outcome is None  # another process still runs it: not ours to judge
        marked = log.interrupted()
        assert [r.op_id for r in marked] == ["killed-op"]
        assert OperationLog(tmp_path).interrupted() == []  # written down once
        lines = [json.loads(x) for x in log.path.read_text().splitlines()]
        assert lines[-1]["op_id"] == "killed-op" and lines[-1]["phase"] == "finished"
        assert lines[-1]["error"] == INTERRUPTED_ERROR
    finally:
        alive.kill()
        alive.wait(10)
    assert OperationLog(tmp_path).read(1)[0].error == INTERRUPTED_ERROR  # once its process is gone


def test_the_hostile_number_lines_really_carry_the_hostile_numbers():
    assert '"started_at": NaN' in HOSTILE_LINES["started_at NaN"]
    assert '"ended_at": 1e400' in HOSTILE_LINES["ended_at 1e400"]


def _try(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


def test_a_read_only_state_dir_is_named_as_not_writable(tmp_path):
    state = tmp_path / "ro"
    state.mkdir()
    if not _try(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(state)]):
        pytest.skip("cannot mount a read-only file system here (needs root)")
    try:
        log = OperationLog(state)
        assert log.append_started(rec(0, outcome=None)) is False
        assert log.append(rec(0)) is False
        assert "is not writable" in log.write_errors()[-1] and "Read-only" in log.write_errors()[-1]
        assert log.read() == [] and len(log.write_errors()) == 2
    finally:
        _try(["umount", str(state)])


def test_an_immutable_state_dir_is_named_as_not_writable(tmp_path):
    state = tmp_path / "immutable"
    state.mkdir()
    if not _try(["chattr", "+i", str(state)]):
        pytest.skip("chattr +i is not available here (needs root and ext4)")
    try:
        log = OperationLog(state)
        assert log.append(rec(0)) is False
        assert "is not writable" in log.write_errors()[0]
    finally:
        _try(["chattr", "-i", str(state)])
    assert log.append(rec(1)) is True and log.write_errors() == []


_WRITER = """
import sys
sys.path.insert(0, {root!r})
from memory_controller.oplog import OperationLog
from memory_controller.types import OperationRecord, Outcome
log = OperationLog({state!r}, max_bytes=20_000, keep=3)
for i in range(150):
    r = OperationRecord(op_id=f"{{sys.argv[1]}}-{{i}}", kind="apply", params={{"model": "m" * 50}},
                        started_at=1000.0 + i, outcome=None)
    assert log.append_started(r)
    r.outcome = Outcome.SUCCESS
    r.ended_at = 1001.0 + i
    assert log.append(r)
"""


def test_processes_appending_at_once_through_rotations_tear_no_line(tmp_path):
    code = _WRITER.format(root=str(ROOT), state=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code, f"w{n}"]) for n in range(3)]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    log = OperationLog(tmp_path, max_bytes=20_000, keep=3)
    records = log.read()
    assert log.warnings == []  # no torn or interleaved line anywhere
    assert len(list(tmp_path.glob(LOG_NAME + ".*"))) >= 3  # it did rotate (.1 .. .3 and the lock)
    assert all(r.outcome is Outcome.SUCCESS for r in records)  # a start is shadowed by its finish
    # Rotation drops the oldest file, so which writers still show depends on how the scheduler ran them
    # (on a loaded machine one writer may finish before another starts, and its lines rotate out). What
    # holds every time: the newest line is some writer's last record, and each writer still present
    # shows an unbroken run of its newest records up to its last one (no record lost inside the window).
    assert records and records[0].op_id.endswith("-149"), records[:1]
    seen = {w: sorted(int(r.op_id.split("-")[1]) for r in records if r.op_id.startswith(w + "-"))
            for w in ("w0", "w1", "w2")}
    assert len(records) == sum(len(ids) for ids in seen.values())  # no foreign or duplicated id
    for w, ids in seen.items():
        assert ids == list(range(150 - len(ids), 150)), (w, ids)
