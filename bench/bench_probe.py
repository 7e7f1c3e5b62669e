"""Cost of one device snapshot through the probe with the fake NVML (goal: <= 1 ms per device).

The fake NVML returns at once, so what is timed is our own code per GPU. The host row (psutil)
is timed apart. Run: .venv/bin/python bench/bench_probe.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memory_controller.probe.devices import DeviceProbe  # noqa: E402
from tests.fake_pynvml import FakeGpu, FakeNvml, FakeProcess  # noqa: E402

REPEATS = 2000


def per_gpu_cost_ms(n_gpus: int) -> float:
    gpus = [FakeGpu(uuid=f"GPU-{i}", processes=[FakeProcess(pid=1, usedGpuMemory=1 << 30)]) for i in range(n_gpus)]
    probe = DeviceProbe(FakeNvml(gpus).module())
    probe.snapshot()  # NVML init, caches
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(REPEATS // 5):
            for i in range(n_gpus):
                probe._gpu_snapshot(i, 0.0)
        samples.append((time.perf_counter() - t0) * 1000 / (REPEATS // 5) / n_gpus)
    return statistics.median(samples)


def full_snapshot_ms(n_gpus: int) -> float:
    probe = DeviceProbe(FakeNvml([FakeGpu(uuid=f"GPU-{i}") for i in range(n_gpus)]).module())
    probe.snapshot()
    t0 = time.perf_counter()
    for _ in range(200):
        probe.snapshot()
    return (time.perf_counter() - t0) * 1000 / 200


def main() -> None:
    lines = ["# bench_probe: one snapshot through the probe, fake NVML (our own code)"]
    for n in (1, 2, 8):
        lines.append(f"gpus={n}: {per_gpu_cost_ms(n):.4f} ms per GPU row (goal <= 1 ms)")
    for n in (1, 8):
        lines.append(f"gpus={n}: full snapshot incl. host row (psutil, process list cached 5 s): "
                     f"{full_snapshot_ms(n):.3f} ms")
    out = "\n".join(lines)
    print(out)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "probe.txt").write_text(out + "\n")


if __name__ == "__main__":
    main()
