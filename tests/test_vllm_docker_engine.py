"""vLLM Docker backend against a real (private) Docker engine running the fake vLLM image."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pytest

from backends.vllm import VllmDockerBackend
from backends.vllm.args import container_name_for
from backends.vllm.labels import MANAGED_LABEL
from memory_controller.backend import DeploymentState
from memory_controller.errors import ContainerError, ContainerStartError, OperationCancelledError
from memory_controller.types import CachedModel, Outcome, Precision, Profile
from tests.fixtures_docker import (  # fixtures come from conftest's pytest_plugins
    make_cached_model,
    make_vllm_backend,
    run_foreign,
    vllm_start,
    with_changes,
)

pytestmark = pytest.mark.docker

GIB = 1024**3
FP16 = Profile(mode="vllm", precision=Precision.FP16, context_tokens=2048, batch=4)


def fetch(port: int, path: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
        return resp.read().decode()


def names_on_engine(client, all_: bool = True) -> set[str]:
    return {c.name for c in client.containers.list(all=all_)}


def test_available_with_a_running_engine(vllm_settings):
    backend = make_vllm_backend(vllm_settings)
    av = backend.availability(backend.probe.snapshot())
    assert av.ok and av.reason is None


def test_arguments_labels_env_mounts_and_gpu_request_reach_the_container(vllm_settings, docker_client):
    model = make_cached_model(vllm_settings, "Org/Tiny-Llama")
    backend = make_vllm_backend(vllm_settings, (24, 23), (24, 23))
    profile = FP16.with_(context_tokens=1024, batch=2, gpu_ids=(0, 1))
    dep = vllm_start(backend, model, profile, 8 * GIB)
    port = vllm_settings.vllm_port
    assert dep.name == "memctl-vllm-org-tiny-llama" and dep.state is DeploymentState.READY
    assert dep.endpoint == f"http://127.0.0.1:{port}/v1" and dep.backend_id == "vllm"
    assert dep.handle == docker_client.containers.get(dep.name).id
    assert dep.memory_bytes == {"gpu:0": int(0.22 * 24 * GIB), "gpu:1": int(0.22 * 24 * GIB)}
    assert dep.profile == profile and dep.model_id == "Org/Tiny-Llama" and dep.device == "cuda:0,1"

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

    c = docker_client.containers.get(dep.name)
    assert c.labels[MANAGED_LABEL] == "true"
    assert c.labels["memctl.model"] == "Org/Tiny-Llama"
    assert json.loads(c.labels["memctl.profile"])["context_tokens"] == 1024
    assert json.loads(c.labels["memctl.claim"]) == dep.memory_bytes
    host_cfg = c.attrs["HostConfig"]
    assert host_cfg["Init"] is True
    assert host_cfg["IpcMode"] == "host"
    assert host_cfg["DeviceRequests"][0]["DeviceIDs"] == ["0", "1"]
    mounts = {m["Destination"]: m for m in c.attrs["Mounts"]}
    hub_mount = mounts["/root/.cache/huggingface/hub"]
    assert hub_mount["RW"] is False
    assert hub_mount["Source"] == str(vllm_settings.resolved_hf_cache_dir.resolve())
    assert "Org/Tiny-Llama" in backend.verify(dep)


def test_a_qwen_model_starts_with_tool_flags_and_an_unknown_one_without(vllm_settings, docker_client):
    backend = make_vllm_backend(vllm_settings)
    qwen = make_cached_model(vllm_settings, "Qwen/Qwen2.5-Coder-0.5B-Instruct")
    with open(f"{qwen.path}/config.json", "w") as fh:
        json.dump({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, fh)
    dep = vllm_start(backend, qwen, FP16.with_(context_tokens=32768))
    args = fetch(vllm_settings.vllm_port, "/fake/args").splitlines()
    assert "--enable-auto-tool-choice" in args and args[args.index("--tool-call-parser") + 1] == "hermes"
    assert args[args.index("--max-model-len") + 1] == "32768"
    assert dep.detail["tool_parser"] == "hermes" and dep.detail["tools_parsed"] is True
    backend.stop(dep.handle)

    plain = make_cached_model(vllm_settings, "Org/Tiny-Gpt2")
    with open(f"{plain.path}/config.json", "w") as fh:
        json.dump({"model_type": "gpt2"}, fh)
    dep = vllm_start(backend, CachedModel(**{**plain.__dict__, "architecture": None}), FP16)
    args = fetch(vllm_settings.vllm_port, "/fake/args").splitlines()
    assert "--enable-auto-tool-choice" not in args and "--tool-call-parser" not in args
    assert dep.detail["tools_parsed"] is False


def test_local_model_dir_is_mounted_read_only_under_models(vllm_settings, tmp_path, docker_client):
    d = tmp_path / "my-coder"
    d.mkdir()
    model = CachedModel(model_id=str(d), revision=None, size_on_disk_bytes=1, has_safetensors=True,
                        has_config=True, architecture=None, path=str(d), source="local_dir")
    backend = make_vllm_backend(vllm_settings)
    dep = vllm_start(backend, model, FP16)
    args = fetch(vllm_settings.vllm_port, "/fake/args").splitlines()
    assert args[0].startswith("/models/") and args[args.index("--served-model-name") + 1] == "my-coder"
    env = fetch(vllm_settings.vllm_port, "/fake/env")
    assert "HF_HUB_OFFLINE" not in env
    assert docker_client.containers.get(dep.handle).attrs["HostConfig"]["DeviceRequests"][0]["Count"] == -1
    mounts = {m["Destination"]: m for m in docker_client.containers.get(dep.handle).attrs["Mounts"]}
    assert mounts[args[0]]["RW"] is False and mounts[args[0]]["Source"] == str(d)


def test_port_is_published_on_loopback_from_a_bridge_network(vllm_settings, user_network, docker_client):
    backend = make_vllm_backend(vllm_settings, network=user_network)
    dep = vllm_start(backend, make_cached_model(vllm_settings), FP16)
    c = docker_client.containers.get(dep.handle)
    binding = c.attrs["NetworkSettings"]["Ports"][f"{vllm_settings.vllm_port}/tcp"][0]
    assert binding["HostIp"] == "127.0.0.1"
    assert json.loads(fetch(vllm_settings.vllm_port, "/v1/models"))["data"][0]["id"] == "Org/Tiny-Llama"
    assert backend.verify(dep)


def test_slow_start_is_awaited_with_progress_showing_the_latest_log_line(vllm_settings):
    settings = with_changes(vllm_settings, vllm_tag="slow")
    events = []
    t0 = time.monotonic()
    dep = vllm_start(make_vllm_backend(settings), make_cached_model(settings), FP16, progress=events.append)
    assert time.monotonic() - t0 >= 2.0  # the fake "loads weights" for 2 s
    assert dep.state is DeploymentState.READY and dep.detail["health"] == "ready"
    waiting = [e.message for e in events if e.stage == "waiting"]
    assert any("Starting to load model" in m for m in waiting), waiting
    assert events[-1].stage == "ready" and events[-1].elapsed_s >= 2.0


@pytest.mark.parametrize(
    "tag,cause,words",
    [("oom", "cuda_oom", "CUDA out of memory"), ("kv", "no_kv_cache_memory", "KV cache"),
     ("maxlen", "max_model_len_too_large", "max_model_len")],
)
def test_crash_during_start_fails_fast_with_status_log_tail_and_cause(vllm_settings, docker_client, tag, cause,
                                                                        words):
    settings = with_changes(vllm_settings, vllm_tag=tag, vllm_ready_timeout_s=60)
    with pytest.raises(ContainerStartError) as err:
        vllm_start(make_vllm_backend(settings), make_cached_model(settings), FP16)
    e = err.value
    assert e.cause == cause  # the crash is the cause, not the 60 s readiness deadline ("ready_timeout")
    assert "exited with status 1" in e.message and words in e.message
    assert any("EngineCore failed to start" in line for line in e.log_tail)
    assert "memctl-vllm-org-tiny-llama" not in names_on_engine(docker_client)


def test_readiness_timeout_stops_and_removes_the_container(vllm_settings, docker_client):
    settings = with_changes(vllm_settings, vllm_tag="never-ready", vllm_ready_timeout_s=1.5)
    with pytest.raises(ContainerStartError) as err:
        vllm_start(make_vllm_backend(settings), make_cached_model(settings), FP16)
    assert err.value.cause == "ready_timeout" and "1.5 s" in err.value.message
    assert any("Application startup complete" in line for line in err.value.log_tail)
    assert "memctl-vllm-org-tiny-llama" not in names_on_engine(docker_client)


def test_cancel_during_start_removes_the_container(vllm_settings, docker_client):
    settings = with_changes(vllm_settings, vllm_tag="never-ready", vllm_ready_timeout_s=30)
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    with pytest.raises(OperationCancelledError):  # cancelled, not the 30 s readiness deadline
        vllm_start(make_vllm_backend(settings), make_cached_model(settings), FP16, cancel=stop.is_set)
    assert "memctl-vllm-org-tiny-llama" not in names_on_engine(docker_client)


def test_missing_image_says_how_to_get_it_and_creates_nothing(vllm_settings, docker_client):
    settings = with_changes(vllm_settings, vllm_tag="not-built")
    before = names_on_engine(docker_client)
    with pytest.raises(ContainerStartError) as err:
        vllm_start(make_vllm_backend(settings), make_cached_model(settings), FP16)
    assert err.value.cause == "image_missing"
    assert "docker pull memctl-test/fake-vllm:not-built" in err.value.hint
    assert names_on_engine(docker_client) == before


def test_port_already_in_use_is_a_clear_error(vllm_settings, docker_client):
    with socket.socket() as s:
        s.bind(("127.0.0.1", vllm_settings.vllm_port))
        s.listen()
        with pytest.raises(ContainerError, match=f"port {vllm_settings.vllm_port} on 127.0.0.1 is already in use"):
            vllm_start(make_vllm_backend(vllm_settings), make_cached_model(vllm_settings), FP16)
    assert "memctl-vllm-org-tiny-llama" not in names_on_engine(docker_client)


def test_name_squatted_by_a_foreign_container_is_refused_and_left_alone(vllm_settings, docker_client,
                                                                           fake_vllm_image):
    name = container_name_for("Org/Tiny-Llama")
    squatter = run_foreign(docker_client, fake_vllm_image, name=name)
    try:
        backend = make_vllm_backend(vllm_settings)
        with pytest.raises(ContainerError, match="memctl did not start it"):
            vllm_start(backend, make_cached_model(vllm_settings), FP16)
        with pytest.raises(ContainerError, match="refusing to stop"):
            backend.stop(name)
        with pytest.raises(ContainerError, match="refusing to stop"):
            backend.stop(squatter.id)
        squatter.reload()
        assert squatter.status == "running"
        assert name not in {d.name for d in backend.deployments(max_wait_s=5)}
    finally:
        squatter.remove(force=True)


def test_stop_with_init_is_quick_and_removes_the_container_and_is_idempotent(vllm_settings, docker_client):
    backend = make_vllm_backend(vllm_settings)
    dep = vllm_start(backend, make_cached_model(vllm_settings), FP16)
    report = backend.stop(dep.handle)
    # the container ended on SIGTERM (its init forwards it): docker stop did not wait out its kill timeout
    assert report.message.args["seconds"] < vllm_settings.vllm_stop_timeout_s
    assert dep.name not in names_on_engine(docker_client)
    assert report.handle == dep.handle and report.model_id == "Org/Tiny-Llama" and not report.already_gone
    # The fake NVML's used memory did not move: the report says so instead of assuming success.
    assert report.measure == "nvml_used" and report.freed_bytes == 0
    assert report.verdict is Outcome.WARNING and report.message.code == "release.partial"
    again = backend.stop(dep.handle)
    assert again.already_gone and again.verdict is Outcome.SUCCESS and again.freed_bytes == 0
    assert backend.stop(dep.name).already_gone
    assert dep.handle not in {d.handle for d in backend.deployments()}


def test_stop_all_managed_leaves_an_unlabelled_container_running(vllm_settings, docker_client, fake_vllm_image):
    backend = make_vllm_backend(vllm_settings)
    dep = vllm_start(backend, make_cached_model(vllm_settings), FP16)
    other = run_foreign(docker_client, fake_vllm_image, name=f"not-memctl-{vllm_settings.vllm_port}")
    try:
        reports = backend.stop_all_managed()
        assert [r.handle for r in reports] == [dep.handle] and reports[0].verdict is not Outcome.ERROR
        assert other.id not in [r.handle for r in reports]
        other.reload()
        assert other.status == "running"
        assert dep.name not in names_on_engine(docker_client)
    finally:
        other.remove(force=True)


def test_a_new_backend_instance_finds_the_running_container(vllm_settings):
    first = make_vllm_backend(vllm_settings)
    dep = vllm_start(first, make_cached_model(vllm_settings), FP16.with_(batch=2))
    first.close()
    again = make_vllm_backend(vllm_settings)  # e.g. a restarted dashboard
    found = {d.handle: d for d in again.deployments()}  # the first call waits for Docker's answer
    d = found[dep.handle]
    assert d.state is DeploymentState.READY and d.detail["health"] == "ready" and d.model_id == "Org/Tiny-Llama"
    assert d.detail["port"] == vllm_settings.vllm_port and d.profile.batch == 2
    assert d.memory_bytes == dep.memory_bytes and d.warnings == ()
    assert 0 < time.time() - d.started_at < 60
    assert again.verify(d)
    again.stop(d.handle)
    assert dep.handle not in {x.handle for x in again.deployments()}


def test_deployments_show_a_starting_container_while_start_waits(vllm_settings):
    settings = with_changes(vllm_settings, vllm_tag="slow")
    backend = make_vllm_backend(settings)
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault(
        "dep", vllm_start(backend, make_cached_model(settings), FP16)))
    t.start()
    try:
        seen = set()
        deadline = time.monotonic() + 10
        while t.is_alive() and time.monotonic() < deadline:
            seen |= {(d.detail["docker_state"], d.state) for d in backend.deployments(max_wait_s=1)}
            time.sleep(0.2)
    finally:
        t.join(30)
    assert ("running", DeploymentState.STARTING) in seen
    assert result["dep"].state is DeploymentState.READY


def test_deployments_never_block_on_a_slow_refresh(vllm_settings, monkeypatch):
    from backends.vllm import backend as backend_module

    backend = make_vllm_backend(vllm_settings)
    vllm_start(backend, make_cached_model(vllm_settings), FP16)
    backend.deployments()
    entered, release = threading.Event(), threading.Event()
    real = backend.list_managed

    def blocked_listing(probe=True):
        entered.set()
        release.wait(60)  # Docker "hangs" until the test lets it go
        return real(probe)

    monkeypatch.setattr(backend, "list_managed", blocked_listing)
    backend._cache_at -= backend_module.REFRESH_INTERVAL_S + 1  # stale: the next call kicks a refresh
    answered: list = []
    try:
        reader = threading.Thread(target=lambda: answered.append(backend.deployments()))
        reader.start()
        assert entered.wait(30)  # the refresh runs and is blocked ...
        reader.join(30)
        assert not reader.is_alive() and not release.is_set()  # ... and deployments() answered meanwhile
        assert len(answered[0]) == 1  # from the cache
    finally:
        release.set()


def test_a_stale_exited_container_of_ours_is_replaced(vllm_settings, docker_client):
    backend = make_vllm_backend(vllm_settings)
    dep = vllm_start(backend, make_cached_model(vllm_settings), FP16)
    docker_client.containers.get(dep.handle).kill()
    states = {d.handle: d for d in backend.deployments(max_wait_s=5)}
    assert states[dep.handle].state is DeploymentState.FAILED and states[dep.handle].detail["health"] == "stopped"
    again = vllm_start(backend, make_cached_model(vllm_settings), FP16)
    assert again.handle != dep.handle and again.state is DeploymentState.READY
    with pytest.raises(ContainerError, match="already running"):
        vllm_start(backend, make_cached_model(vllm_settings), FP16)
    assert docker_client.containers.get(again.handle).status == "running"  # the refused start removed nothing


def test_logs_tail_reads_a_managed_container(vllm_settings):
    backend = make_vllm_backend(vllm_settings)
    dep = vllm_start(backend, make_cached_model(vllm_settings), FP16)
    assert any("Application startup complete" in line for line in backend.logs_tail(dep.handle))


def test_verify_refuses_a_container_that_stopped(vllm_settings, docker_client):
    backend = make_vllm_backend(vllm_settings)
    dep = vllm_start(backend, make_cached_model(vllm_settings), FP16)
    docker_client.containers.get(dep.handle).kill()
    with pytest.raises(ContainerError, match="exited"):
        backend.verify(dep)


def test_create_factory_builds_the_backend_from_settings(vllm_settings):
    from backends.vllm import create

    b = create(vllm_settings, make_vllm_backend(vllm_settings).probe)
    assert isinstance(b, VllmDockerBackend) and b.network == vllm_settings.vllm_network


class _EngineGpu:
    """A fake GPU whose used memory is what memctl's running containers claim (NVML stays fake)."""

    def __init__(self, client, base_used: int):
        self.client, self.base_used = client, base_used

    def used(self) -> int:
        held = 0
        for c in self.client.containers.list(filters={"label": "memctl.managed=true"}):
            held += json.loads(c.labels.get("memctl.claim", "{}")).get("gpu:0", 0)
        return self.base_used + held


def test_stop_measures_the_memory_given_back_on_nvml(vllm_settings, docker_client):
    from memory_controller.probe import DeviceProbe
    from tests.fake_pynvml import FakeGpu, FakeNvml

    engine_gpu = _EngineGpu(docker_client, 1 * GIB)

    class Gpu(FakeGpu):
        @property
        def used_bytes(self):  # noqa: D401 - read on every NVML call
            return engine_gpu.used()

        @used_bytes.setter
        def used_bytes(self, value):
            pass

    probe = DeviceProbe(nvml=FakeNvml([Gpu(total_bytes=24 * GIB)]).module())
    backend = VllmDockerBackend(vllm_settings, probe)
    dep = vllm_start(backend, make_cached_model(vllm_settings), FP16, 8 * GIB)
    assert probe.snapshot().gpus[0].used_bytes == GIB + dep.memory_bytes["gpu:0"]
    report = backend.stop(dep.handle)
    assert report.measure == "nvml_used" and report.verdict is Outcome.SUCCESS
    assert report.freed_bytes == report.expected_bytes == dep.memory_bytes["gpu:0"] and report.still_held_bytes == 0
    assert report.message.code == "release.freed"


def test_stop_without_nvml_reports_the_claim_as_measured_by_docker(vllm_settings, docker_client):
    backend = make_vllm_backend(vllm_settings)
    dep = vllm_start(backend, make_cached_model(vllm_settings), FP16, 8 * GIB)
    blind = VllmDockerBackend(vllm_settings, None)  # no probe: NVML says nothing
    report = blind.stop(dep.handle)
    assert report.measure == "docker" and report.freed_bytes == sum(dep.memory_bytes.values())
    assert report.verdict is Outcome.SUCCESS and dep.name not in names_on_engine(docker_client)
