"""Cost of the dashboard's history read (``OperationLog.read(20)``) with 100 vs 100,000 records.

Goal (issue 11 item 4): with 100,000 records within 10% of the time with 100 records, because the
log is read from its end in blocks. The 100,000-record log is written as one file (no rotation:
the worst case for a reader). A full read of the big log is timed too, for scale.
Run: .venv/bin/python bench/bench_history.py
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memory_controller.oplog import OperationLog  # noqa: E402
from memory_controller.types import OperationRecord, Outcome, StepRecord, to_jsonable  # noqa: E402

REPEATS = 200


def _line(i: int) -> str:
    r = OperationRecord(
        op_id=f"op-{i:08d}", kind="apply", params={"model": "Qwen/Qwen2.5-Coder-1.5B-Instruct", "mode": "vllm"},
        started_at=1.7e9 + i, ended_at=1.7e9 + i + 12.5,
        steps=[StepRecord(name, Outcome.SUCCESS, 0.5, "ok", 1 << 30, 2 << 30)
               for name in ("unload", "clear", "load", "verify")],
        outcome=Outcome.SUCCESS, memory_before={"gpu:0": 1 << 30, "host": 8 << 30},
        memory_after={"gpu:0": 5 << 30, "host": 8 << 30},
    )
    return json.dumps({"phase": "finished", **to_jsonable(r)}, separators=(",", ":"))


def _log_with(tmp: Path, n: int) -> OperationLog:
    folder = tmp / f"state-{n}"
    folder.mkdir()
    log = OperationLog(folder)
    with open(log.path, "w") as fh:
        fh.writelines(_line(i) + "\n" for i in range(n))
    return log


def read_ms(log: OperationLog, limit: int | None, repeats: int) -> float:
    log.read(limit)  # page cache warm, as on a dashboard rerun
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        records = log.read(limit)
        samples.append((time.perf_counter() - t0) * 1000)
    assert limit is None or len(records) == limit
    return statistics.median(samples)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        small = _log_with(Path(tmp), 100)
        big = _log_with(Path(tmp), 100_000)
        size_mb = big.path.stat().st_size / 1e6
        # interleave the two so machine noise hits both alike
        small_ms, big_ms = [], []
        for _ in range(5):
            small_ms.append(read_ms(small, 20, REPEATS // 5))
            big_ms.append(read_ms(big, 20, REPEATS // 5))
        s, b = statistics.median(small_ms), statistics.median(big_ms)
        full = read_ms(big, None, 1)
    print("# bench_history: OperationLog.read(20), median of interleaved runs (page cache warm)")
    print(f"records=100:     {s:.3f} ms")
    print(f"records=100000:  {b:.3f} ms  (log {size_mb:.1f} MB, one file)")
    print(f"ratio 100000/100: {b / s:.3f} (goal <= 1.10)")
    print(f"for scale, reading all 100,000 records: {full:.0f} ms")


if __name__ == "__main__":
    main()
