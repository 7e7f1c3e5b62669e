"""The serving scheduler's own cost, against the fake effects of tests/test_serving_scheduler.py (no HTTP, no
model): what admission + a lease + giving it back costs per request, in-process (FIFO turn) and for an HTTP
deployment, and that N requests for a model not running make one load. Printed as µs per request and as a
ratio to an empty asyncio round trip (``await asyncio.sleep(0)``) measured in the same run.

Run: .venv/bin/python bench/bench_scheduler.py [--n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory_controller.scheduler import Need, ServingScheduler  # noqa: E402
from tests.test_serving_scheduler import FakeEffects, _dep  # noqa: E402


async def per_request(n: int, endpoint: str | None) -> float:
    fx = FakeEffects()
    fx.deps["a"] = _dep("a", endpoint=endpoint)
    s = ServingScheduler(fx)
    facts = await s.admit(Need("a"))
    t0 = time.perf_counter()
    for _ in range(n):
        s.release(await s.acquire(Need("a"), facts))
    dt = time.perf_counter() - t0
    s.close()
    return dt / n


async def baseline(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        await asyncio.sleep(0)
    return (time.perf_counter() - t0) / n


async def joins(n: int) -> tuple[int, int]:
    fx = FakeEffects()
    fx.endpoint = "http://engine"
    s = ServingScheduler(fx)
    tasks = [asyncio.create_task(s.acquire(Need("a"))) for _ in range(n)]
    while not fx.tickets:
        await asyncio.sleep(0.001)
    fx.complete(fx.tickets[0])
    for lease in await asyncio.gather(*tasks):
        s.release(lease)
    s.close()
    return n, len(fx.loads)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    n = ap.parse_args().n
    rounds = [asyncio.run(per_request(n, None)) for _ in range(5)]
    http = [asyncio.run(per_request(n, "http://engine")) for _ in range(5)]
    base = [asyncio.run(baseline(n)) for _ in range(5)]
    b = statistics.median(base)
    print(f"lease + release, in-process (FIFO turn): {statistics.median(rounds) * 1e6:7.1f} µs/request "
          f"({statistics.median(rounds) / b:.1f}x an empty await)")
    print(f"lease + release, HTTP deployment:        {statistics.median(http) * 1e6:7.1f} µs/request "
          f"({statistics.median(http) / b:.1f}x an empty await)")
    asked, loads = asyncio.run(joins(200))
    print(f"{asked} requests for a model not running -> {loads} load")


if __name__ == "__main__":
    main()
