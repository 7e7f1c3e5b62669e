"""Operation log: one JSON line per finished operation in ``<state_dir>/operations.jsonl``.

Each append is flushed and fsynced, so a crash loses at most the line being written; a torn
last line is skipped on read with a warning, never fatal.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from .types import OperationRecord, Outcome, StepRecord, to_jsonable

LOG_NAME = "operations.jsonl"


def record_from_dict(data: dict) -> OperationRecord:
    steps = [
        StepRecord(
            name=s["name"],
            outcome=Outcome(s["outcome"]),
            duration_s=float(s["duration_s"]),
            message=s.get("message", ""),
            memory_before_bytes=s.get("memory_before_bytes"),
            memory_after_bytes=s.get("memory_after_bytes"),
        )
        for s in data.get("steps", [])
    ]
    return OperationRecord(
        op_id=data["op_id"],
        kind=data["kind"],
        params=data.get("params", {}),
        started_at=float(data["started_at"]),
        ended_at=data.get("ended_at"),
        steps=steps,
        outcome=Outcome(data["outcome"]) if data.get("outcome") else None,
        error=data.get("error"),
        memory_before=data.get("memory_before", {}),
        memory_after=data.get("memory_after", {}),
    )


class OperationLog:
    """Append-only JSON-lines log. Thread-safe."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / LOG_NAME
        self._lock = threading.Lock()
        self.warnings: list[str] = []

    def append(self, record: OperationRecord) -> None:
        """Write one record durably (flush + fsync). Raises OSError when the state dir is unwritable."""
        line = json.dumps(to_jsonable(record), ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as fh:
                if fh.tell() > 0 and not self._ends_with_newline():
                    fh.write("\n")  # a torn line from a crash: start ours on a fresh line
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    def read(self, limit: int | None = None) -> list[OperationRecord]:
        """Records, newest first. Unreadable lines are skipped and named in ``self.warnings``."""
        with self._lock:
            self.warnings = []
            if not self.path.exists():
                return []
            records: list[OperationRecord] = []
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                for lineno, raw in enumerate(fh, start=1):
                    raw = raw.strip()
                    if not raw:
                        continue
                    try:
                        records.append(record_from_dict(json.loads(raw)))
                    except (ValueError, KeyError, TypeError) as exc:
                        self.warnings.append(
                            f"{self.path}:{lineno}: skipped an unreadable log line ({type(exc).__name__}); "
                            "it is most likely torn by a crash"
                        )
        records.reverse()
        return records[:limit] if limit is not None else records
