"""Fixtures for tests against a real Docker engine and the fake vLLM image.

Use either ``from tests.fixtures_docker import docker_host, fake_vllm_image, vllm_settings  # noqa: F401``
or ``pytest_plugins = ["tests.fixtures_docker"]`` in conftest.py.

- ``docker_host`` (session): ``$MEMCTL_TEST_DOCKER_HOST`` (scripts/test.sh), else a private dockerd
  started with scripts/dockerd.sh and stopped at session end; skips with the reason when neither works.
- ``docker_client`` (session): a docker.DockerClient on that host (for the tests' own checks).
- ``fake_vllm_image`` (session): ``memctl-test/fake-vllm:test`` imported from busybox-static.
- ``vllm_settings`` (per test): Settings on that host and image, a free ``vllm_port`` of its own and
  a short readiness deadline; at teardown every container labelled with that port is removed.
- ``free_port()``: a TCP port nothing listens on (127.0.0.1).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from memory_controller.settings import Settings, load_settings
from tests.fake_vllm.engine import PrivateEngine, shared_engine
from tests.fake_vllm.image import FAKE_IMAGE_REPO, FAKE_IMAGE_TAG, build_fake_image

_used_ports: set[int] = set()
_built_images: dict[str, str] = {}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 that this session has not handed out before."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise RuntimeError("no free TCP port found")


@pytest.fixture(scope="session")
def docker_engine() -> PrivateEngine:
    """The process-wide engine (a daemon we start ourselves is stopped when the process exits)."""
    try:
        return shared_engine()
    except Exception as exc:  # noqa: BLE001 - the reason is shown with the skip
        msg = f"no Docker engine could be started: {exc}"
        print(f"\nSKIP Docker tests: {msg}")
        pytest.skip(msg)


@pytest.fixture(scope="session")
def docker_host(docker_engine: PrivateEngine) -> str:
    """The ``unix://...`` (or tcp) URL of a Docker engine the tests may use freely."""
    return docker_engine.docker_host


@pytest.fixture(scope="session")
def docker_client(docker_host: str) -> Iterator[object]:
    import docker

    client = docker.DockerClient(base_url=docker_host, timeout=60)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def fake_vllm_image(docker_host: str, docker_client) -> str:
    """``memctl-test/fake-vllm:test`` in the test engine (built once per process and engine)."""
    if docker_host in _built_images:
        return _built_images[docker_host]
    try:
        ref = build_fake_image(docker_client, FAKE_IMAGE_REPO, FAKE_IMAGE_TAG)
        _built_images[docker_host] = ref
        return ref
    except RuntimeError as exc:
        print(f"\nSKIP fake vLLM image: {exc}")
        pytest.skip(str(exc))


@pytest.fixture()
def vllm_settings(docker_host: str, fake_vllm_image: str, docker_client, tmp_path: Path) -> Iterator[Settings]:
    """Settings for one test: the test engine, the fake image, a fresh port, a 20 s readiness deadline."""
    port = free_port()
    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    settings = load_settings(
        docker_host=docker_host,
        vllm_image=FAKE_IMAGE_REPO,
        vllm_tag=FAKE_IMAGE_TAG,
        vllm_port=port,
        vllm_ready_timeout_s=20,
        vllm_stop_timeout_s=5,
        hf_cache_dir=hub,
        state_dir=tmp_path / "state",
    )
    try:
        yield settings
    finally:
        remove_containers_on_port(docker_client, port)


def remove_containers_on_port(client, port: int) -> None:
    """Force-remove every memctl-labelled container of the test engine bound to ``port``."""
    import docker.errors

    for c in client.containers.list(all=True, filters={"label": f"memctl.port={port}"}):
        try:
            c.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass


@pytest.fixture(scope="session")
def user_network(docker_client) -> Iterator[str]:
    """A user-defined bridge network in the test engine (ports published from it via docker-proxy)."""
    import docker.errors

    name = "memctl-test-net"
    try:
        net = docker_client.networks.get(name)
    except docker.errors.NotFound:
        net = docker_client.networks.create(name, driver="bridge")
    try:
        yield name
    finally:
        try:
            net.reload()
            for c in net.containers:
                c.remove(force=True)
            net.remove()
        except docker.errors.APIError:
            pass


def with_changes(settings: Settings, **changes) -> Settings:
    """A copy of ``settings`` with fields changed (e.g. ``vllm_tag="oom"`` for a fake variant)."""
    return load_settings(**{**settings.model_dump(exclude_unset=True), **changes})


def make_cached_model(settings: Settings, model_id: str = "Org/Tiny-Llama", revision: str = "a" * 40):
    """A CachedModel whose snapshot directory exists in ``settings.hf_cache_dir`` (no weights needed)."""
    from memory_controller.types import CachedModel

    hub = settings.resolved_hf_cache_dir
    repo_dir = hub / ("models--" + model_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    (snap / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    return CachedModel(model_id=model_id, revision=revision, size_on_disk_bytes=64, has_safetensors=False,
                       has_config=True, architecture="LlamaForCausalLM", path=str(snap))


# --------------------------------------------------------------------------- the vLLM backend's helpers
GIB = 1024**3


def fake_probe(*gpus: tuple[float, float]):
    """A DeviceProbe over the fake NVML with one GPU per ``(total_gib, free_gib)`` (default one 24/23 GiB)."""
    from memory_controller.probe import DeviceProbe
    from tests.fake_pynvml import FakeGpu, FakeNvml

    specs = gpus or ((24, 23),)
    fakes = [FakeGpu(name=f"Fake GPU {i}", uuid=f"GPU-{i}", total_bytes=int(t * GIB), used_bytes=int((t - f) * GIB))
             for i, (t, f) in enumerate(specs)]
    return DeviceProbe(nvml=FakeNvml(fakes).module())


def estimate_of(model_id: str, profile, total_bytes: int):
    """A MemoryEstimate whose total is ``total_bytes`` (the backend sizes its claim from the total)."""
    from memory_controller.types import MemoryEstimate

    return MemoryEstimate(model_id=model_id, profile=profile, weights_bytes=total_bytes, kv_cache_bytes=0,
                          activation_bytes=0, cuda_context_bytes=0, total_bytes=total_bytes, parameters=0,
                          source="test")


def vllm_start(backend, model, profile, needed_bytes: int = GIB, snapshot=None, **kwargs):
    """claim() on ``snapshot`` (default: the backend's probe) then start(); returns the Deployment."""
    snap = snapshot if snapshot is not None else backend.probe.snapshot()
    claim = backend.claim(model, profile, estimate_of(model.model_id, profile, needed_bytes), snap)
    return backend.start(model, profile, claim, **kwargs)


def make_vllm_backend(settings: Settings, *gpus: tuple[float, float], network: str | None = None):
    """A VllmDockerBackend on ``settings`` with a fake-NVML probe (see :func:`fake_probe`)."""
    from backends.vllm import VllmDockerBackend

    return VllmDockerBackend(settings, fake_probe(*gpus), network=network)


def run_foreign(client, image: str, name: str | None = None, labels: dict | None = None, port: int | None = None):
    """A container memctl did not start (host network, the fake image serving on a free port)."""
    return client.containers.run(image, ["x", "--port", str(port or free_port())], name=name, labels=labels or {},
                                 detach=True, network_mode="host", init=True)
