"""vLLM Docker backend against a real engine and the fake vLLM image (busybox httpd).

Measures, in one run:
- ready-report delay: from the fake server first answering ``/health`` 200 (seen by a 5 ms
  watcher) to ``start()`` reporting ready (goal <= 1 s);
- stop time with ``init=True``: ``stop(name)`` = SIGTERM via docker-init, wait, remove (goal <= 2 s),
  and, for comparison, a container without init whose PID 1 ignores SIGTERM;
- start-to-ready for an instantly-ready server; ``list_managed()`` (Docker + one /health probe, what the
  background refresh does) and ``deployments()`` (answered from the cache: never blocks).

Uses ``$MEMCTL_TEST_DOCKER_HOST`` or starts its own private dockerd (scripts/dockerd.sh).
Run: .venv/bin/python bench/bench_vllm.py   (writes bench/results/vllm.txt)
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import docker  # noqa: E402

from backends.vllm import VllmDockerBackend  # noqa: E402
from memory_controller.settings import load_settings  # noqa: E402
from memory_controller.types import Precision, Profile  # noqa: E402
from tests.fake_vllm.engine import start_engine  # noqa: E402
from tests.fake_vllm.image import FAKE_IMAGE_REPO, build_fake_image  # noqa: E402
from tests.fixtures_docker import fake_probe, free_port, make_cached_model, vllm_start  # noqa: E402

GIB = 1024**3
RUNS = 5
PROFILE = Profile(mode="vllm", precision=Precision.FP16, context_tokens=1024, batch=2)
SNAPSHOT = fake_probe((24, 23)).snapshot()  # one 24 GiB GPU, 23 GiB free (the fake NVML)
VARIANTS = {"test": {}, "bench-slow": {"FAKE_VLLM_START_DELAY_S": "1.5"}}


def _health_ok(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=0.2) as r:
            return r.status == 200
    except OSError:
        return False


def settings_for(docker_host: str, hub: Path, tag: str):
    return load_settings(docker_host=docker_host, vllm_image=FAKE_IMAGE_REPO, vllm_tag=tag, vllm_port=free_port(),
                         vllm_ready_timeout_s=30, vllm_stop_timeout_s=10, hf_cache_dir=hub)


def ready_delay_s(docker_host: str, hub: Path) -> tuple[float, float]:
    """(ready-report delay, start-to-ready) for one start of the 1.5 s slow fake."""
    settings = settings_for(docker_host, hub, "bench-slow")
    backend = VllmDockerBackend(settings, None)  # no probe: the release is measured as "docker" (no NVML wait)
    first_ok: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if _health_ok(settings.vllm_port):
                first_ok.append(time.monotonic())
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    t0 = time.monotonic()
    watcher.start()
    dep = vllm_start(backend, make_cached_model(settings), PROFILE, GIB, snapshot=SNAPSHOT)
    t_ready = time.monotonic()
    done.set()
    watcher.join(1)
    backend.stop(dep.handle)
    if not first_ok:
        raise RuntimeError("the watcher never saw /health answer")
    return t_ready - first_ok[0], t_ready - t0


def stop_time_s(docker_host: str, hub: Path) -> tuple[float, float]:
    """(stop+remove time with init, start-to-ready of the instantly-ready fake)."""
    settings = settings_for(docker_host, hub, "test")
    backend = VllmDockerBackend(settings, None)
    t0 = time.monotonic()
    dep = vllm_start(backend, make_cached_model(settings), PROFILE, GIB, snapshot=SNAPSHOT)
    started = time.monotonic() - t0
    t0 = time.monotonic()
    backend.stop(dep.handle)
    return time.monotonic() - t0, started


def list_time_ms(docker_host: str, hub: Path) -> tuple[float, float]:
    """(list_managed() with its /health probe, deployments() from the cache), medians of 10, in ms."""
    settings = settings_for(docker_host, hub, "test")
    backend = VllmDockerBackend(settings, None)
    dep = vllm_start(backend, make_cached_model(settings), PROFILE, GIB, snapshot=SNAPSHOT)
    try:
        backend.list_managed()
        listed, cached = [], []
        for _ in range(10):
            t0 = time.perf_counter()
            assert any(d.handle == dep.handle and d.detail["health"] == "ready" for d in backend.list_managed())
            listed.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            assert any(d.handle == dep.handle for d in backend.deployments())
            cached.append((time.perf_counter() - t0) * 1000)
        return statistics.median(listed), statistics.median(cached)
    finally:
        backend.stop(dep.handle)


def stop_without_init_s(client, timeout_s: int = 3) -> float:
    """docker stop of the fake with httpd as PID 1 (ignores SIGTERM): waits the whole timeout."""
    c = client.containers.run(f"{FAKE_IMAGE_REPO}:test", ["x", "--port", str(free_port())], detach=True,
                              network_mode="host", init=False)
    time.sleep(0.3)
    t0 = time.monotonic()
    c.stop(timeout=timeout_s)
    elapsed = time.monotonic() - t0
    c.remove(force=True)
    return elapsed


def fmt(values: list[float]) -> str:
    return (f"median {statistics.median(values):.3f} s, min {min(values):.3f} s, max {max(values):.3f} s "
            f"({len(values)} runs)")


def main() -> int:
    import tempfile

    engine = start_engine()
    lines = ["# bench_vllm: vLLM Docker backend, private dockerd + fake vLLM image (busybox httpd)"]
    try:
        client = docker.DockerClient(base_url=engine.docker_host)
        version = client.version().get("Version", "?")
        bridge = "default bridge" if client.networks.list(names=["bridge"]) else "no bridge: host network"
        lines.append(f"engine: dockerd {version} at {engine.docker_host} ({bridge})")
        build_fake_image(client, variants=VARIANTS)
        with tempfile.TemporaryDirectory() as tmp:
            hub = Path(tmp) / "hub"
            hub.mkdir()
            delays, slow_starts = zip(*(ready_delay_s(engine.docker_host, hub) for _ in range(RUNS)), strict=True)
            stops, starts = zip(*(stop_time_s(engine.docker_host, hub) for _ in range(RUNS)), strict=True)
            list_ms, cached_ms = list_time_ms(engine.docker_host, hub)
        no_init = stop_without_init_s(client)
        client.close()
        lines += [
            f"ready-report delay after /health first answers 200 (poll every 0.2 s; goal <= 1 s): {fmt(delays)}",
            f"start-to-ready, fake loading 1.5 s: {fmt(list(slow_starts))}",
            f"start-to-ready, fake ready at once: {fmt(list(starts))}",
            f"stop + remove with init=True (goal <= 2 s): {fmt(list(stops))}",
            f"for comparison, docker stop without init (PID 1 ignores SIGTERM, timeout 3 s): {no_init:.3f} s",
            f"list_managed() with one running container and its /health probe: {list_ms:.1f} ms (median of 10)",
            f"deployments() answered from the cache (refreshed in the background): {cached_ms:.3f} ms (median of 10)",
            f"verdict: ready delay {'OK' if max(delays) <= 1 else 'OVER GOAL'}, "
            f"stop {'OK' if max(stops) <= 2 else 'OVER GOAL'}",
        ]
    finally:
        engine.stop()
    out = "\n".join(lines)
    print(out)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "vllm.txt").write_text(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
