"""vLLM Docker backend: pure sizing/arguments, and a real Docker engine running the fake vLLM image."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
import urllib.request

import pytest

from backends.vllm_docker import (
    MANAGED_LABEL,
    VllmDockerBackend,
    build_vllm_args,
    classify_failure,
    compute_gpu_memory_utilization,
    container_name_for,
)
from memory_controller.errors import (
    ContainerError,
    ContainerStartError,
    DockerUnavailableError,
    InsufficientMemoryError,
    InvalidModelIdError,
    OperationCancelledError,
    QuantizationUnavailableError,
    SettingsError,
)
from memory_controller.settings import load_settings
from memory_controller.types import DeviceKind, DeviceSnapshot, DeviceStatus, Mode, Precision, Profile
from tests.fixtures_docker import (  # fixtures come from conftest's pytest_plugins
    free_port,
    make_cached_model,
    with_changes,
)

GIB = 1024**3
FP16 = Profile(mode=Mode.VLLM, precision=Precision.FP16, context_tokens=2048, batch=4)


def gpu(index: int = 0, total_gib: float = 24, free_gib: float = 23, status=DeviceStatus.OK) -> DeviceSnapshot:
    total = int(total_gib * GIB)
    free = int(free_gib * GIB)
    return DeviceSnapshot(kind=DeviceKind.GPU, index=index, name=f"Fake GPU {index}", uuid=f"GPU-{index}",
                          total_bytes=total, used_bytes=total - free, free_bytes=free, utilization_pct=0.0,
                          status=status)


def fetch(port: int, path: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
        return resp.read().decode()


def names_on_engine(client, all_: bool = True) -> set[str]:
    return {c.name for c in client.containers.list(all=all_)}


# --------------------------------------------------------------------------- pure


def test_gpu_util_is_need_over_total_plus_margin_rounded_up_to_a_hundredth():
    assert compute_gpu_memory_utilization(8 * GIB, 24 * GIB, 0.05, 0.95) == pytest.approx(0.39)
    assert compute_gpu_memory_utilization(12 * GIB, 24 * GIB, 0.0, 0.95) == pytest.approx(0.50)


def test_gpu_util_exactly_at_cap_is_allowed_and_one_byte_more_is_refused_with_numbers():
    total = 100 * GIB
    at_cap = 90 * GIB  # 0.90 + 0.05 = 0.95
    assert compute_gpu_memory_utilization(at_cap, total, 0.05, 0.95) == pytest.approx(0.95)
    with pytest.raises(InsufficientMemoryError) as err:
        compute_gpu_memory_utilization(at_cap + 2**20, total, 0.05, 0.95)
    assert "0.95" in err.value.message and "100.00 GiB" in err.value.message
    assert err.value.hint


@pytest.mark.parametrize("total", [0, -1, None])
def test_gpu_util_refuses_unknown_total(total):
    with pytest.raises(InsufficientMemoryError, match="total memory is unknown"):
        compute_gpu_memory_utilization(GIB, total, 0.05, 0.95)


def test_gpu_util_refuses_bad_margin_or_cap():
    with pytest.raises(SettingsError):
        compute_gpu_memory_utilization(GIB, 10 * GIB, 1.5, 0.95)
    with pytest.raises(SettingsError):
        compute_gpu_memory_utilization(GIB, 10 * GIB, 0.05, 0)


def test_vllm_args_put_model_first_and_carry_every_profile_knob():
    profile = FP16.with_(context_tokens=4096, batch=3, gpu_ids=(0, 1))
    args = build_vllm_args("Org/M", "coder", profile, 0.5, 8123, "sekret")
    assert args[0] == "Org/M"
    flags = dict(zip(args[1::2], args[2::2], strict=False))
    assert flags["--served-model-name"] == "coder"
    assert flags["--max-model-len"] == "4096"
    assert flags["--max-num-seqs"] == "3"
    assert flags["--dtype"] == "float16"
    assert flags["--tensor-parallel-size"] == "2"
    assert flags["--gpu-memory-utilization"] == "0.50"
    assert flags["--port"] == "8123"
    assert flags["--api-key"] == "sekret"
    assert "--quantization" not in args


def test_vllm_args_nf4_uses_bitsandbytes_and_no_key_means_no_flag():
    args = build_vllm_args("Org/M", "Org/M", FP16.with_(precision=Precision.NF4), 0.3, 8000, None)
    assert args[args.index("--quantization") + 1] == "bitsandbytes"
    assert "--api-key" not in args


@pytest.mark.parametrize("precision", [Precision.INT8, Precision.FP4])
def test_vllm_args_refuse_quantizations_vllm_cannot_do_on_the_fly(precision):
    with pytest.raises(QuantizationUnavailableError, match=precision.value):
        build_vllm_args("Org/M", "Org/M", FP16.with_(precision=precision), 0.3, 8000, None)


def test_container_names_are_readable_slugs_and_long_ids_stay_unique():
    assert container_name_for("Qwen/Qwen2.5-Coder-7B-Instruct") == "memctl-vllm-qwen-qwen2.5-coder-7b-instruct"
    assert container_name_for("/data/models/My Model") == "memctl-vllm-data-models-my-model"
    a = container_name_for("org/" + "x" * 80)
    b = container_name_for("org/" + "x" * 79 + "y")
    assert a != b and len(a) <= 64 and len(b) <= 64
    with pytest.raises(InvalidModelIdError):
        container_name_for("///")


@pytest.mark.parametrize(
    "line,cause",
    [
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.", "cuda_oom"),
        ("ValueError: No available memory for the cache blocks. Try increasing", "no_kv_cache_memory"),
        ("ValueError: ... which is larger than the available KV cache memory (1.50 GiB). Based on the "
         "available memory, the estimated maximum model length is 1024.", "max_model_len_too_large"),
        ("ValueError: Free memory on device (1.2/23.6 GiB) on startup is less than desired GPU memory "
         "utilization (0.9, 21.3 GiB).", "gpu_memory_busy"),
        ("INFO: all fine", None),
    ],
)
def test_known_vllm_failures_get_a_plain_words_cause(line, cause):
    key, words = classify_failure(["INFO starting", line])
    assert key == cause
    assert (words is None) == (cause is None)


def test_memory_is_checked_before_docker_is_touched(tmp_path):
    # A dead engine: if start() reached Docker it would raise DockerUnavailableError instead.
    hub = tmp_path / "hub"
    hub.mkdir()
    settings = load_settings(docker_host=f"unix://{tmp_path}/none.sock", hf_cache_dir=hub)
    model = make_cached_model(settings)
    backend = VllmDockerBackend(settings)
    with pytest.raises(InsufficientMemoryError) as err:
        backend.start(model, FP16, 8 * GIB, [gpu(free_gib=5)])
    assert "only 5.00 GiB is free" in err.value.message
    with pytest.raises(InsufficientMemoryError, match="vllm_gpu_util_max"):
        backend.start(model, FP16, 23 * GIB, [gpu(free_gib=24)])
    with pytest.raises(ContainerError, match="needs a GPU"):
        backend.start(model, FP16, GIB, [])
    with pytest.raises(ContainerError, match="GPU 3"):
        backend.start(model, FP16.with_(gpu_ids=(3,)), GIB, [gpu(0)])
    with pytest.raises(InsufficientMemoryError, match="unknown"):
        backend.start(model, FP16, GIB, [dataclasses.replace(gpu(), status=DeviceStatus.LOST, free_bytes=None)])


def test_construction_does_not_connect(tmp_path):
    VllmDockerBackend(load_settings(docker_host=f"unix://{tmp_path}/none.sock"))  # no error


# --------------------------------------------------------------------------- daemon faults


def test_daemon_down_is_reported_in_plain_words_and_start_raises(tmp_path):
    settings = load_settings(docker_host=f"unix://{tmp_path}/docker.sock", hf_cache_dir=tmp_path)
    backend = VllmDockerBackend(settings)
    ok, reason = backend.available()
    assert not ok and "not running" in reason and str(tmp_path) in reason
    with pytest.raises(DockerUnavailableError, match="not running"):
        backend.list()
    with pytest.raises(DockerUnavailableError):
        backend.start(make_cached_model(settings), FP16, GIB, [gpu()])


def test_unreachable_docker_host_is_reported():
    port = free_port()  # nothing listens there
    ok, reason = VllmDockerBackend(load_settings(docker_host=f"tcp://127.0.0.1:{port}")).available()
    assert not ok and "connection refused" in reason
    ok, reason = VllmDockerBackend(load_settings(docker_host="tcp://no-such-host.invalid:2375")).available()
    assert not ok and "cannot reach" in reason


@pytest.mark.docker
def test_socket_permission_denied_is_reported(docker_host):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user")
    if not docker_host.startswith("unix://"):
        pytest.skip("needs a unix socket engine")
    import docker  # noqa: F401 - loaded before dropping privileges (the venv may be unreadable then)
    import requests  # noqa: F401

    backend = VllmDockerBackend(load_settings(docker_host=docker_host))
    # Warm up as root so every module the call needs is loaded: as nobody, an import from an
    # unreadable venv would also be a PermissionError and could fake a pass.
    assert backend.available() == (True, None)
    # Make sure the socket is not world-accessible (dockerd creates it 0660 root:docker).
    assert os.stat(docker_host[len("unix://"):]).st_mode & 0o007 == 0
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody and ask
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, json.dumps(backend.available()).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    ok, reason = json.loads(os.read(r, 65536) or b"[true, null]")
    os.close(r)
    assert not ok and "permission denied" in reason and "docker group" in reason


# --------------------------------------------------------------------------- real engine


@pytest.mark.docker
def test_available_with_a_running_engine(vllm_settings):
    assert VllmDockerBackend(vllm_settings).available() == (True, None)


@pytest.mark.docker
def test_arguments_labels_env_mounts_and_gpu_request_reach_the_container(vllm_settings, docker_client):
    model = make_cached_model(vllm_settings, "Org/Tiny-Llama")
    backend = VllmDockerBackend(vllm_settings)
    profile = FP16.with_(context_tokens=1024, batch=2, gpu_ids=(0, 1))
    info = backend.start(model, profile, 8 * GIB, [gpu(0), gpu(1)])
    port = vllm_settings.vllm_port
    assert info.name == "memctl-vllm-org-tiny-llama" and info.health == "ready" and info.port == port

    args = fetch(port, "/fake/args").splitlines()
    assert args[0] == "Org/Tiny-Llama"
    flags = dict(zip(args[1::2], args[2::2], strict=False))
    assert flags["--served-model-name"] == "Org/Tiny-Llama"
    assert flags["--max-model-len"] == "1024" and flags["--max-num-seqs"] == "2"
    assert flags["--tensor-parallel-size"] == "2"
    assert flags["--gpu-memory-utilization"] == "0.22"  # 4 GiB per GPU / 24 GiB + 0.05, rounded up
    assert flags["--revision"] == "a" * 40
    env = dict(line.split("=", 1) for line in fetch(port, "/fake/env").splitlines() if "=" in line)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["NVIDIA_VISIBLE_DEVICES"] == "0,1"  # the device request reached the engine

    c = docker_client.containers.get(info.name)
    assert c.labels[MANAGED_LABEL] == "true"
    assert c.labels["memctl.model"] == "Org/Tiny-Llama"
    assert json.loads(c.labels["memctl.profile"])["context_tokens"] == 1024
    host_cfg = c.attrs["HostConfig"]
    assert host_cfg["Init"] is True
    assert host_cfg["IpcMode"] == "host"
    assert host_cfg["DeviceRequests"][0]["DeviceIDs"] == ["0", "1"]
    mounts = {m["Destination"]: m for m in c.attrs["Mounts"]}
    hub_mount = mounts["/root/.cache/huggingface/hub"]
    assert hub_mount["RW"] is False
    assert hub_mount["Source"] == str(vllm_settings.resolved_hf_cache_dir.resolve())
    assert backend.verify(info.name) is True


@pytest.mark.docker
def test_local_model_dir_is_mounted_read_only_under_models(vllm_settings, tmp_path, docker_client):
    from memory_controller.types import CachedModel

    d = tmp_path / "my-coder"
    d.mkdir()
    model = CachedModel(model_id=str(d), revision=None, size_on_disk_bytes=1, has_safetensors=True,
                        has_config=True, architecture=None, path=str(d), source="local_dir")
    backend = VllmDockerBackend(vllm_settings)
    info = backend.start(model, FP16, GIB, [gpu()])
    args = fetch(vllm_settings.vllm_port, "/fake/args").splitlines()
    assert args[0].startswith("/models/") and args[args.index("--served-model-name") + 1] == "my-coder"
    env = fetch(vllm_settings.vllm_port, "/fake/env")
    assert "HF_HUB_OFFLINE" not in env
    assert docker_client.containers.get(info.name).attrs["HostConfig"]["DeviceRequests"][0]["Count"] == -1
    mounts = {m["Destination"]: m for m in docker_client.containers.get(info.name).attrs["Mounts"]}
    assert mounts[args[0]]["RW"] is False and mounts[args[0]]["Source"] == str(d)


@pytest.mark.docker
def test_port_is_published_on_loopback_from_a_bridge_network(vllm_settings, user_network, docker_client):
    backend = VllmDockerBackend(vllm_settings, network=user_network)
    info = backend.start(make_cached_model(vllm_settings), FP16, GIB, [gpu()])
    c = docker_client.containers.get(info.name)
    binding = c.attrs["NetworkSettings"]["Ports"][f"{vllm_settings.vllm_port}/tcp"][0]
    assert binding["HostIp"] == "127.0.0.1"
    assert json.loads(fetch(vllm_settings.vllm_port, "/v1/models"))["data"][0]["id"] == "Org/Tiny-Llama"
    assert backend.verify(info.name)


@pytest.mark.docker
def test_slow_start_is_awaited_with_progress_showing_the_latest_log_line(vllm_settings):
    settings = with_changes(vllm_settings, vllm_tag="slow")
    events = []
    t0 = time.monotonic()
    info = VllmDockerBackend(settings).start(make_cached_model(settings), FP16, GIB, [gpu()],
                                             progress=events.append)
    assert time.monotonic() - t0 >= 2.0  # the fake "loads weights" for 2 s
    assert info.health == "ready"
    waiting = [e.message for e in events if e.stage == "waiting"]
    assert any("Starting to load model" in m for m in waiting), waiting
    assert events[-1].stage == "ready" and events[-1].elapsed_s >= 2.0


@pytest.mark.docker
@pytest.mark.parametrize(
    "tag,cause,words",
    [("oom", "cuda_oom", "CUDA out of memory"), ("kv", "no_kv_cache_memory", "KV cache"),
     ("maxlen", "max_model_len_too_large", "max_model_len")],
)
def test_crash_during_start_fails_fast_with_status_log_tail_and_cause(vllm_settings, docker_client, tag, cause,
                                                                        words):
    settings = with_changes(vllm_settings, vllm_tag=tag, vllm_ready_timeout_s=60)
    t0 = time.monotonic()
    with pytest.raises(ContainerStartError) as err:
        VllmDockerBackend(settings).start(make_cached_model(settings), FP16, GIB, [gpu()])
    assert time.monotonic() - t0 < 10  # fails fast, not at the 60 s deadline
    e = err.value
    assert e.cause == cause
    assert "exited with status 1" in e.message and words in e.message
    assert any("EngineCore failed to start" in line for line in e.log_tail)
    assert "memctl-vllm-org-tiny-llama" not in names_on_engine(docker_client)


@pytest.mark.docker
def test_readiness_timeout_stops_and_removes_the_container(vllm_settings, docker_client):
    settings = with_changes(vllm_settings, vllm_tag="never-ready", vllm_ready_timeout_s=1.5)
    with pytest.raises(ContainerStartError) as err:
        VllmDockerBackend(settings).start(make_cached_model(settings), FP16, GIB, [gpu()])
    assert err.value.cause == "ready_timeout" and "1.5 s" in err.value.message
    assert any("Application startup complete" in line for line in err.value.log_tail)
    assert "memctl-vllm-org-tiny-llama" not in names_on_engine(docker_client)


@pytest.mark.docker
def test_cancel_during_start_removes_the_container(vllm_settings, docker_client):
    settings = with_changes(vllm_settings, vllm_tag="never-ready", vllm_ready_timeout_s=30)
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(OperationCancelledError):
        VllmDockerBackend(settings).start(make_cached_model(settings), FP16, GIB, [gpu()], cancel=stop.is_set)
    assert time.monotonic() - t0 < 5
    assert "memctl-vllm-org-tiny-llama" not in names_on_engine(docker_client)


@pytest.mark.docker
def test_missing_image_says_how_to_get_it_and_creates_nothing(vllm_settings, docker_client):
    settings = with_changes(vllm_settings, vllm_tag="not-built")
    before = names_on_engine(docker_client)
    with pytest.raises(ContainerStartError) as err:
        VllmDockerBackend(settings).start(make_cached_model(settings), FP16, GIB, [gpu()])
    assert err.value.cause == "image_missing"
    assert "docker pull memctl-test/fake-vllm:not-built" in err.value.hint
    assert names_on_engine(docker_client) == before


@pytest.mark.docker
def test_port_already_in_use_is_a_clear_error(vllm_settings, docker_client):
    with socket.socket() as s:
        s.bind(("127.0.0.1", vllm_settings.vllm_port))
        s.listen()
        with pytest.raises(ContainerError, match=f"port {vllm_settings.vllm_port} on 127.0.0.1 is already in use"):
            VllmDockerBackend(vllm_settings).start(make_cached_model(vllm_settings), FP16, GIB, [gpu()])
    assert "memctl-vllm-org-tiny-llama" not in names_on_engine(docker_client)


@pytest.mark.docker
def test_name_squatted_by_a_foreign_container_is_refused_and_left_alone(vllm_settings, docker_client,
                                                                           fake_vllm_image):
    name = container_name_for("Org/Tiny-Llama")
    squatter = docker_client.containers.run(fake_vllm_image, ["x", "--port", str(free_port())], name=name,
                                            detach=True, network_mode="host")
    try:
        backend = VllmDockerBackend(vllm_settings)
        with pytest.raises(ContainerError, match="memctl did not start it"):
            backend.start(make_cached_model(vllm_settings), FP16, GIB, [gpu()])
        with pytest.raises(ContainerError, match="refusing to stop"):
            backend.stop(name)
        squatter.reload()
        assert squatter.status == "running"
        assert name not in {c.name for c in backend.list()}
    finally:
        squatter.remove(force=True)


@pytest.mark.docker
def test_stop_with_init_is_quick_and_removes_the_container(vllm_settings, docker_client):
    backend = VllmDockerBackend(vllm_settings)
    info = backend.start(make_cached_model(vllm_settings), FP16, GIB, [gpu()])
    t0 = time.monotonic()
    backend.stop(info.name)
    assert time.monotonic() - t0 < 2.0
    assert info.name not in names_on_engine(docker_client)
    with pytest.raises(ContainerError, match="already gone"):
        backend.stop(info.name)


@pytest.mark.docker
def test_stop_all_managed_leaves_an_unlabelled_container_running(vllm_settings, docker_client, fake_vllm_image):
    backend = VllmDockerBackend(vllm_settings)
    info = backend.start(make_cached_model(vllm_settings), FP16, GIB, [gpu()])
    other = docker_client.containers.run(fake_vllm_image, ["x", "--port", str(free_port())],
                                         name=f"not-memctl-{vllm_settings.vllm_port}", detach=True,
                                         network_mode="host")
    try:
        results = backend.stop_all_managed()
        assert (info.name, True) in [(n, ok) for n, ok, _ in results]
        assert other.name not in [n for n, _, _ in results]
        other.reload()
        assert other.status == "running"
        assert info.name not in names_on_engine(docker_client)
    finally:
        other.remove(force=True)


@pytest.mark.docker
def test_a_new_backend_instance_finds_the_running_container(vllm_settings):
    first = VllmDockerBackend(vllm_settings)
    info = first.start(make_cached_model(vllm_settings), FP16.with_(batch=2), GIB, [gpu()])
    first.close()
    again = VllmDockerBackend(vllm_settings)  # e.g. a restarted dashboard
    found = {c.name: c for c in again.list()}
    c = found[info.name]
    assert c.state == "running" and c.health == "ready" and c.model_id == "Org/Tiny-Llama"
    assert c.port == vllm_settings.vllm_port and c.profile["batch"] == 2
    assert c.uptime_s is not None and 0 <= c.uptime_s < 60
    assert again.verify(info.name)
    again.stop(info.name)
    assert info.name not in {x.name for x in again.list()}


@pytest.mark.docker
def test_list_shows_a_starting_container_while_start_waits(vllm_settings):
    settings = with_changes(vllm_settings, vllm_tag="slow")
    backend = VllmDockerBackend(settings)
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault(
        "info", backend.start(make_cached_model(settings), FP16, GIB, [gpu()])))
    t.start()
    try:
        seen = set()
        deadline = time.monotonic() + 10
        while t.is_alive() and time.monotonic() < deadline:
            seen |= {(c.state, c.health) for c in backend.list()}
            time.sleep(0.2)
    finally:
        t.join(30)
    assert ("running", "starting") in seen
    assert result["info"].health == "ready"


@pytest.mark.docker
def test_a_stale_exited_container_of_ours_is_replaced(vllm_settings, docker_client):
    backend = VllmDockerBackend(vllm_settings)
    info = backend.start(make_cached_model(vllm_settings), FP16, GIB, [gpu()])
    docker_client.containers.get(info.name).kill()
    assert {c.name: c.health for c in backend.list()}[info.name] == "stopped"
    again = backend.start(make_cached_model(vllm_settings), FP16, GIB, [gpu()])
    assert again.container_id != info.container_id and again.health == "ready"
    with pytest.raises(ContainerError, match="already running"):
        backend.start(make_cached_model(vllm_settings), FP16, GIB, [gpu()])
