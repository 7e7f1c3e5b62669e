"""Operation log: JSON lines in ``<state_dir>/operations.jsonl``, rotated at a size limit.

* Each operation writes a ``started`` line before it acts (:meth:`OperationLog.append_started`) and a
  ``finished`` line at the end (:meth:`OperationLog.append`). A start with no finish whose process is
  gone (kill -9, power loss) is shown as interrupted, and :meth:`OperationLog.interrupted` writes
  that down on the next start.
* Each append is flushed and fsynced under an advisory lock (several memctl processes may write).
  A failed write is kept in :meth:`OperationLog.write_errors` until the next successful write or
  :meth:`OperationLog.acknowledge`: reading the log never wipes it.
* Lines are untrusted on read: each is parsed with limits (:mod:`memory_controller.safejson`) and
  checked field by field; a torn line or one of the wrong shape is skipped with a warning and the
  good records still show.
* :meth:`OperationLog.read` reads from the end of the file in blocks, so the newest 20 records cost
  the same with 100 or 100,000 records in the log.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import CorruptDataError
from .logrecords import record_from_dict
from .safejson import loads_bounded
from .types import OperationRecord, Outcome, to_jsonable

LOG_NAME = "operations.jsonl"
MAX_LOG_BYTES = 8 * 1024 * 1024  # rotate the current file when a line would take it past this
KEEP_ROTATED = 2  # operations.jsonl.1 (newer) ... operations.jsonl.2 (older)
MAX_LINE_BYTES = 1024 * 1024
_BLOCK_BYTES = 64 * 1024
_MAX_WARNINGS = 20
_INTERRUPTED_SCAN = 500  # how many of the newest entries interrupted() looks at
INTERRUPTED_ERROR = (
    "interrupted: the memctl process running this operation ended before it finished "
    "(killed or crashed); what it started may still be running — check the dashboard or `memctl containers`"
)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (None when it does not exist)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "boot": _boot_id(), "start": _process_start(pid)}


def _owner_alive(owner: Any) -> bool:
    """Whether the process that wrote a ``started`` line still runs (same boot, same process)."""
    pid = owner.get("pid") if isinstance(owner, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or owner.get("boot") != _boot_id():
        return False
    start = _process_start(pid)
    return start is not None and start == owner.get("start")


# --------------------------------------------------------------------------- the log


log = logging.getLogger("memctl.oplog")


def _describe_write_error(path: Path, exc: OSError) -> str:
    folder = path.parent
    if isinstance(exc, (FileExistsError, NotADirectoryError)) or exc.errno in (errno.EEXIST, errno.ENOTDIR):
        why = f"the state dir {folder} (or a folder above it) is a file, not a folder"
    elif isinstance(exc, IsADirectoryError):
        why = f"{path} is a folder, not a file"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = f"the state dir {folder} is not writable ({exc.strerror})"
    elif exc.errno == errno.ENOSPC:
        why = f"no space left on the disk of {folder}"
    elif exc.errno == errno.ELOOP:
        why = f"{path} is a symbolic link, which memctl does not follow for its log (remove the link)"
    else:
        why = f"{exc.strerror or exc}"
    return (f"could not write the operation log {path}: {why}; this operation is not in the history — "
            "set MEMCTL_STATE_DIR to a writable folder (or fix this one)")


# Write failures of every log in this process (the CLI reports them after any command), by log path.
_PROCESS_WRITE_ERRORS: dict[str, list[str]] = {}


def process_write_errors() -> list[str]:
    """Log writes that failed in this process and were not followed by a successful one."""
    return [e for errs in list(_PROCESS_WRITE_ERRORS.values()) for e in errs]


class OperationLog:
    """Append-only JSON-lines log with rotation. Thread-safe; several processes may append."""

    def __init__(self, state_dir: Path, *, max_bytes: int = MAX_LOG_BYTES, keep: int = KEEP_ROTATED):
        self.path = Path(state_dir) / LOG_NAME
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        self._read_warnings: list[str] = []
        self._write_errors: list[str] = []

    # ---------------------------------------------------------------- problems for the user
    @property
    def warnings(self) -> list[str]:
        """Write errors not yet acknowledged, then what the last :meth:`read` skipped."""
        with self._lock:
            return [*self._write_errors, *self._read_warnings]

    def write_errors(self) -> list[str]:
        """Failed writes since the last successful one (or :meth:`acknowledge`), oldest first."""
        with self._lock:
            return list(self._write_errors)

    def acknowledge(self) -> None:
        """The user has seen the write errors: forget them."""
        with self._lock:
            self._write_errors.clear()

    # ---------------------------------------------------------------- writing
    def append_started(self, record: OperationRecord) -> bool:
        """Write that ``record`` has started (before acting). Returns False when it could not be written
        (the reason is in :meth:`write_errors`)."""
        return self._append({"phase": "started", "owner": _owner(), **to_jsonable(record)})

    def append(self, record: OperationRecord) -> bool:
        """Write the finished ``record`` durably (flush + fsync). Returns False when it could not be
        written (the reason is in :meth:`write_errors`); never raises for a file-system problem."""
        return self._append({"phase": "finished", **to_jsonable(record)})

    def _append(self, data: dict[str, Any]) -> bool:
        line = (json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            try:
                self._write_line(line)
            except OSError as exc:
                problem = _describe_write_error(self.path, exc)
                if problem not in self._write_errors:  # said once (serve output, dashboard log), kept for status
                    log.warning("%s", problem)
                self._write_errors.append(problem)
                del self._write_errors[:-_MAX_WARNINGS]
                _PROCESS_WRITE_ERRORS[str(self.path)] = list(self._write_errors)
                return False
            self._write_errors.clear()
            _PROCESS_WRITE_ERRORS.pop(str(self.path), None)
            return True

    def _write_line(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.path.parent / (LOG_NAME + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            self._rotate_if_needed(len(line))
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise IsADirectoryError(errno.EISDIR, "not a regular file", str(self.path))
                if st.st_size > 0 and os.pread(fd, 1, st.st_size - 1) != b"\n":
                    line = b"\n" + line  # a torn line from a crash: start ours on a fresh line
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            os.close(lock_fd)

    def _rotate_if_needed(self, incoming: int) -> None:
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return
        if size == 0 or size + incoming <= self.max_bytes:
            return
        for n in range(self.keep, 0, -1):  # .keep is dropped, .1 -> .2, current -> .1
            older = self._rotated(n)
            newer = self.path if n == 1 else self._rotated(n - 1)
            with contextlib.suppress(FileNotFoundError):
                os.replace(newer, older)
        if self.keep == 0:
            os.unlink(self.path)

    def _rotated(self, n: int) -> Path:
        return self.path.with_name(f"{LOG_NAME}.{n}")

    # ---------------------------------------------------------------- reading
    def _files(self) -> list[Path]:
        return [self.path, *(self._rotated(n) for n in range(1, self.keep + 1))]

    def _lines_newest_first(self, warnings: list[str]) -> Iterator[tuple[Path, int, bytes]]:
        """(file, byte offset, line) from the newest line of the newest file backwards."""
        for path in self._files():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            except FileNotFoundError:
                continue
            except OSError as exc:
                warnings.append(f"cannot read the operation log {path}: {exc.strerror or exc}")
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    warnings.append(f"the operation log {path} is not a regular file; it is ignored")
                    continue
                yield from _reverse_lines(fd, path, warnings)
            except OSError as exc:
                warnings.append(f"cannot read the operation log {path}: {exc.strerror or exc}")
            finally:
                os.close(fd)

    def _entries(self, warnings: list[str]) -> Iterator[tuple[dict[str, Any], OperationRecord]]:
        skipped = 0
        for path, offset, raw in self._lines_newest_first(warnings):
            if not raw.strip():
                continue
            try:
                data = loads_bounded(raw, what="log line", max_bytes=MAX_LINE_BYTES)
                record = record_from_dict(data)
            except (CorruptDataError, ValueError) as exc:
                skipped += 1
                if skipped <= _MAX_WARNINGS:
                    reason = exc.message if isinstance(exc, CorruptDataError) else str(exc)
                    warnings.append(
                        f"{path.name}: skipped an unreadable log line at byte {offset} ({reason[:160]}); "
                        "it is most likely torn by a crash or edited by hand"
                    )
                continue
            yield data, record
        if skipped > _MAX_WARNINGS:
            warnings.append(f"… and {skipped - _MAX_WARNINGS} more unreadable log lines skipped")

    def read(self, limit: int | None = None) -> list[OperationRecord]:
        """Records, newest first, at most ``limit``. A finished operation appears once (its final line);
        one that started but has not finished shows with ``outcome None`` while its process runs, and
        as interrupted (outcome error) once that process is gone. Unreadable lines are skipped and
        named in :attr:`warnings`."""
        warnings: list[str] = []
        records: list[OperationRecord] = []
        seen: set[str] = set()
        if limit is None or limit > 0:
            for data, record in self._entries(warnings):
                if record.op_id in seen:
                    continue
                seen.add(record.op_id)
                if data.get("phase") == "started" and not _owner_alive(data.get("owner")):
                    record = _as_interrupted(record)
                records.append(record)
                if limit is not None and len(records) >= limit:
                    break
        with self._lock:
            self._read_warnings = warnings
        return records

    def interrupted(self) -> list[OperationRecord]:
        """Write down, as interrupted, every recent operation that started but never finished and whose
        process is gone; return those records (newest first). Call it once when memctl starts."""
        found: list[OperationRecord] = []
        seen: set[str] = set()
        for n, (data, record) in enumerate(self._entries([])):
            if n >= _INTERRUPTED_SCAN:
                break
            if record.op_id in seen:
                continue
            seen.add(record.op_id)
            if data.get("phase") == "started" and not _owner_alive(data.get("owner")):
                found.append(_as_interrupted(record))
        for record in reversed(found):
            self.append(record)
        return found


def _as_interrupted(record: OperationRecord) -> OperationRecord:
    record.outcome = Outcome.ERROR
    record.error = INTERRUPTED_ERROR
    return record


def _reverse_lines(fd: int, path: Path, warnings: list[str]) -> Iterator[tuple[Path, int, bytes]]:
    """Lines of an open file from the last to the first, reading blocks backwards from the end.

    A line longer than MAX_LINE_BYTES is skipped (with a warning) without being held in memory.
    """
    pos = os.fstat(fd).st_size
    tail = b""  # the start of the file's part we have read: a line whose beginning is further back
    oversized = False
    while pos > 0:
        size = min(_BLOCK_BYTES, pos)
        pos -= size
        block = os.pread(fd, size, pos)
        if len(block) < size:  # the file shrank under us (rotation by another process)
            break
        parts = (block + tail).split(b"\n")
        tail = parts[0]
        start = pos + len(parts[0]) + 1
        complete = parts[1:]
        offsets = []
        for part in complete:
            offsets.append(start)
            start += len(part) + 1
        for off, part in zip(reversed(offsets), reversed(complete), strict=True):
            if oversized:
                oversized = False
                warnings.append(f"{path.name}: skipped a log line over {MAX_LINE_BYTES} bytes at byte {off}")
                continue
            yield path, off, part
        if len(tail) > MAX_LINE_BYTES:
            tail = b""
            oversized = True
    if oversized:
        warnings.append(f"{path.name}: skipped a log line over {MAX_LINE_BYTES} bytes at byte 0")
    elif tail:
        yield path, 0, tail


class Journal:
    """The operation runner's hooks: each operation's record goes to ``log`` with used memory before
    (written before acting: a kill -9 mid-way leaves a record) and after."""

    def __init__(self, log: OperationLog, used_by_device: Callable[[], dict[str, int | None]]) -> None:
        self.log, self._used = log, used_by_device

    def started(self, record: OperationRecord) -> None:
        try:
            record.memory_before = self._used()
        except Exception:  # noqa: BLE001 - never lose the operation for a probe glitch
            pass
        self.log.append_started(record)

    def ended(self, record: OperationRecord) -> None:
        try:
            record.memory_after = self._used()
        except Exception:  # noqa: BLE001
            pass
        self.log.append(record)  # False when it could not be written: kept in write_errors()
