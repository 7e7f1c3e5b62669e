"""vLLM Docker backend: pure sizing, arguments, claims, names; and Docker daemon faults.

The real engine with the fake vLLM image: tests/test_vllm_docker_engine.py; hostile labels,
races, the API key and GPU holders: tests/test_vllm_hostile.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest

from backends.vllm import VllmDockerBackend, create
from backends.vllm.args import (
    InvalidContainerNameError,
    build_vllm_args,
    compute_gpu_memory_utilization,
    container_name_for,
    validate_container_name,
)
from backends.vllm.client import classify_failure
from memory_controller.backend import Backend
from memory_controller.errors import (
    ContainerError,
    DockerUnavailableError,
    InsufficientMemoryError,
    InvalidModelIdError,
    MemctlError,
    QuantizationUnavailableError,
    SettingsError,
)
from memory_controller.settings import load_settings
from memory_controller.types import DeviceKind, DeviceSnapshot, DeviceStatus, Precision, Profile
from tests.fixtures_docker import (  # fixtures come from conftest's pytest_plugins
    estimate_of,
    fake_probe,
    free_port,
    make_cached_model,
)

GIB = 1024**3
FP16 = Profile(mode="vllm", precision=Precision.FP16, context_tokens=2048, batch=4)


def gpu(index: int = 0, total_gib: float = 24, free_gib: float = 23, status=DeviceStatus.OK) -> DeviceSnapshot:
    total = int(total_gib * GIB)
    free = int(free_gib * GIB)
    return DeviceSnapshot(kind=DeviceKind.GPU, index=index, name=f"Fake GPU {index}", uuid=f"GPU-{index}",
                          total_bytes=total, used_bytes=total - free, free_bytes=free, utilization_pct=0.0,
                          status=status)


def snapshot_with(*gpus: DeviceSnapshot):
    snap = fake_probe().snapshot()
    return dataclasses.replace(snap, gpus=tuple(gpus))


def write_config(model, **cfg) -> None:
    with open(os.path.join(model.path, "config.json"), "w") as fh:
        json.dump(cfg, fh)


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


def test_vllm_args_put_model_first_and_carry_every_profile_knob_but_never_a_key():
    profile = FP16.with_(context_tokens=4096, batch=3, gpu_ids=(0, 1))
    args = build_vllm_args("Org/M", "coder", profile, 0.5, 8123, tool_parser="hermes")
    assert args[0] == "Org/M"
    flags = dict(zip(args[1::2], args[2::2], strict=False))
    assert flags["--served-model-name"] == "coder"
    assert flags["--max-model-len"] == "4096"
    assert flags["--max-num-seqs"] == "3"
    assert flags["--dtype"] == "float16"
    assert flags["--tensor-parallel-size"] == "2"
    assert flags["--gpu-memory-utilization"] == "0.50"
    assert flags["--port"] == "8123"
    assert "--quantization" not in args
    assert "--api-key" not in args  # the key travels in VLLM_API_KEY (see the engine test)
    assert args[args.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in args


def test_vllm_args_nf4_uses_bitsandbytes_and_no_parser_means_no_tool_flags():
    args = build_vllm_args("Org/M", "Org/M", FP16.with_(precision=Precision.NF4), 0.3, 8000)
    assert args[args.index("--quantization") + 1] == "bitsandbytes"
    assert "--api-key" not in args
    assert "--enable-auto-tool-choice" not in args and "--tool-call-parser" not in args


@pytest.mark.parametrize("precision", [Precision.INT8, Precision.FP4])
def test_vllm_args_refuse_quantizations_vllm_cannot_do_on_the_fly(precision):
    with pytest.raises(QuantizationUnavailableError, match=precision.value):
        build_vllm_args("Org/M", "Org/M", FP16.with_(precision=precision), 0.3, 8000)


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


@pytest.mark.parametrize("name,why", [
    ("", "required"), ("   ", "required"), ("/", "'/'"), ("//", "'/'"), ("../x", "'/'"), ("..", "'..'"),
    ("x" * 129, "at most 128"), ("a", "at least two"), ("-abc", "start with a letter"), ("bad name", "only letters"),
    ("name\n", "only letters"), ("naïve", "only letters"), ("a;rm -rf", "only letters"),
])
def test_bad_container_names_are_refused_before_docker_with_a_clear_error(name, why):
    with pytest.raises(InvalidContainerNameError) as err:
        validate_container_name(name)
    assert why in err.value.message and err.value.hint
    assert isinstance(err.value, MemctlError) and err.value.code == "invalid_container_name"


def test_good_container_names_and_ids_pass():
    for name in ("memctl-vllm-org-tiny", "ab", "a" * 64, "x_y.z-1", "0123456789ab"):
        assert validate_container_name(name) == name
    assert VllmDockerBackend.validate_container_name("ok-name") == "ok-name"


@pytest.mark.parametrize("handle", ["", "/", "//", "../etc"])
def test_stop_with_a_bad_name_never_asks_docker(tmp_path, handle):
    backend = VllmDockerBackend(load_settings(docker_host=f"unix://{tmp_path}/none.sock"))
    with pytest.raises(InvalidContainerNameError):  # not DockerUnavailableError: Docker was not asked
        backend.stop(handle)


# --------------------------------------------------------------------------- protocol, claims


def test_the_backend_implements_the_protocol_and_importing_it_does_not_load_docker(tmp_path):
    code = ("import sys; import backends.vllm as v; "
            "print('docker' in sys.modules, 'requests' in sys.modules)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__))).stdout.split()
    assert out == ["False", "False"]
    b = create(load_settings(docker_host=f"unix://{tmp_path}/none.sock", vllm_tag="v0.27.1"), fake_probe())
    assert isinstance(b, Backend) and b.id == "vllm"
    caps = b.capabilities
    assert caps.precisions == (Precision.FP16, Precision.BF16, Precision.NF4) and caps.fit_ladder == (Precision.NF4,)
    assert caps.serves_http and not caps.generates_in_process and caps.needs_gpu and caps.devices == ("cuda",)
    assert b.clear_caches() == {}


def test_claim_is_gpu_util_times_total_on_each_chosen_gpu(tmp_path):
    settings = load_settings(docker_host=f"unix://{tmp_path}/none.sock", hf_cache_dir=tmp_path)
    model = make_cached_model(settings)
    b = VllmDockerBackend(settings)
    claim = b.claim(model, FP16, estimate_of(model.model_id, FP16, 8 * GIB), snapshot_with(gpu(0), gpu(1)))
    # 4 GiB per GPU / 24 GiB + 0.05 = 0.2167 -> 0.22 of each GPU
    assert claim.blockers == ()
    assert claim.detail["gpu_util"] == pytest.approx(0.22)
    assert claim.bytes_by_device == {"gpu:0": int(0.22 * 24 * GIB), "gpu:1": int(0.22 * 24 * GIB)}
    one = b.claim(model, FP16.with_(gpu_ids=(1,)), estimate_of(model.model_id, FP16, 8 * GIB),
                  snapshot_with(gpu(0), gpu(1)))
    assert set(one.bytes_by_device) == {"gpu:1"} and one.detail["gpu_util"] == pytest.approx(0.39)


def test_claim_blockers_are_messages_with_codes(tmp_path):
    settings = load_settings(docker_host=f"unix://{tmp_path}/none.sock", hf_cache_dir=tmp_path)
    model = make_cached_model(settings)
    b = VllmDockerBackend(settings)
    est = estimate_of(model.model_id, FP16, GIB)

    def codes(profile, *gpus, needed=GIB):
        c = b.claim(model, profile, estimate_of(model.model_id, profile, needed), snapshot_with(*gpus))
        return [m.code for m in c.blockers]

    assert codes(FP16.with_(precision=Precision.INT8), gpu()) == ["backend.precision_unsupported"]
    assert codes(FP16.with_(precision=Precision.FP4), gpu()) == ["backend.precision_unsupported"]
    assert codes(FP16) == ["backend.no_gpu"]
    assert codes(FP16.with_(gpu_ids=(3,)), gpu(0)) == ["backend.gpu_missing"]
    assert codes(FP16, dataclasses.replace(gpu(), status=DeviceStatus.LOST, free_bytes=None)) == [
        "backend.gpu_memory_unknown"]
    over = b.claim(model, FP16, estimate_of(model.model_id, FP16, 23 * GIB), snapshot_with(gpu(free_gib=24)))
    assert [m.code for m in over.blockers] == ["backend.over_util_cap"]
    assert "MEMCTL_VLLM_GPU_UTIL_MAX" in over.blockers[0].text and over.blockers[0].args["cap"] == 0.95
    assert b.claim(model, FP16, est, snapshot_with(gpu())).blockers == ()


@pytest.mark.parametrize("cfg,family,parser", [
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "qwen", "hermes"),
    ({"model_type": "qwen3"}, "qwen", "hermes"),
    ({"model_type": "llama", "vocab_size": 128256}, "llama3", "llama3_json"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "mistral", "mistral"),
    ({"model_type": "llama", "vocab_size": 32016}, None, None),  # CodeLlama: no tool format
    ({"model_type": "gpt2"}, None, None),
])
def test_claim_names_the_tool_parser_of_the_model_family(tmp_path, cfg, family, parser):
    settings = load_settings(docker_host=f"unix://{tmp_path}/none.sock", hf_cache_dir=tmp_path)
    model = dataclasses.replace(make_cached_model(settings), architecture=None)
    write_config(model, **cfg)
    claim = VllmDockerBackend(settings).claim(model, FP16, estimate_of(model.model_id, FP16, GIB),
                                              snapshot_with(gpu()))
    assert claim.detail["family"] == family and claim.detail["tool_parser"] == parser
    assert [m.code for m in claim.notes] == ([] if parser else ["backend.tools_not_parsed"])


def test_a_hostile_config_means_unknown_family_not_a_crash(tmp_path):
    settings = load_settings(docker_host=f"unix://{tmp_path}/none.sock", hf_cache_dir=tmp_path)
    model = dataclasses.replace(make_cached_model(settings), architecture=None)
    for text in ("[" * 5000 + "]" * 5000, "not json", '{"model_type": 5}', "[]", '{"model_type": "qwen2", "x": 1e400}'):
        with open(os.path.join(model.path, "config.json"), "w") as fh:
            fh.write(text)
        claim = VllmDockerBackend(settings).claim(model, FP16, estimate_of(model.model_id, FP16, GIB),
                                                  snapshot_with(gpu()))
        assert claim.detail["tool_parser"] is None and claim.notes[0].code == "backend.tools_not_parsed"


def test_check_model_flags_a_missing_snapshot_and_an_unservable_precision(tmp_path):
    settings = load_settings(docker_host=f"unix://{tmp_path}/none.sock", hf_cache_dir=tmp_path)
    model = make_cached_model(settings)
    b = VllmDockerBackend(settings)
    assert b.check_model(model, FP16) == ()
    gone = dataclasses.replace(model, path=str(tmp_path / "nope"))
    assert [m.code for m in b.check_model(gone, FP16.with_(precision=Precision.INT8))] == [
        "backend.model_missing", "backend.precision_unsupported"]


def test_memory_is_checked_before_docker_is_touched(tmp_path):
    # A dead engine: if start() reached Docker it would raise DockerUnavailableError instead.
    hub = tmp_path / "hub"
    hub.mkdir()
    settings = load_settings(docker_host=f"unix://{tmp_path}/none.sock", hf_cache_dir=hub)
    model = make_cached_model(settings)
    backend = VllmDockerBackend(settings, fake_probe((24, 5)))  # the probe says: 5 GiB free now
    claim = backend.claim(model, FP16, estimate_of(model.model_id, FP16, 8 * GIB), snapshot_with(gpu()))
    with pytest.raises(InsufficientMemoryError) as err:
        backend.start(model, FP16, claim)
    assert "only 5.00 GiB is free" in err.value.message
    for profile, needed, gpus, error, words in [
        (FP16, 23 * GIB, [gpu(free_gib=24)], InsufficientMemoryError, "MEMCTL_VLLM_GPU_UTIL_MAX"),
        (FP16, GIB, [], ContainerError, "needs a GPU"),
        (FP16.with_(gpu_ids=(3,)), GIB, [gpu(0)], ContainerError, "GPU 3"),
        (FP16, GIB, [dataclasses.replace(gpu(), status=DeviceStatus.LOST, free_bytes=None)],
         InsufficientMemoryError, "unknown"),
        (FP16.with_(precision=Precision.INT8), GIB, [gpu()], QuantizationUnavailableError, "int8"),
    ]:
        c = backend.claim(model, profile, estimate_of(model.model_id, profile, needed), snapshot_with(*gpus))
        with pytest.raises(error, match=words):
            backend.start(model, profile, c)


def test_construction_does_not_connect(tmp_path):
    VllmDockerBackend(load_settings(docker_host=f"unix://{tmp_path}/none.sock"))  # no error


def test_no_gpu_makes_it_unavailable_with_a_code(tmp_path):
    from memory_controller.probe import DeviceProbe

    snap = DeviceProbe(nvml_module_name="no_such_nvml_module").snapshot()
    av = VllmDockerBackend(load_settings(docker_host=f"unix://{tmp_path}/none.sock")).availability(snap)
    assert not av.ok and av.reason.code == "backend.no_gpu" and "no_such_nvml_module" in av.reason.args["detail"]


# --------------------------------------------------------------------------- daemon faults


def test_daemon_down_is_reported_in_plain_words_and_start_raises(tmp_path):
    settings = load_settings(docker_host=f"unix://{tmp_path}/docker.sock", hf_cache_dir=tmp_path)
    backend = VllmDockerBackend(settings, fake_probe())
    av = backend.availability(snapshot_with(gpu()))
    assert not av.ok and av.reason.code == "backend.docker_unavailable"
    assert "not running" in av.reason.args["detail"] and str(tmp_path) in av.reason.args["detail"]
    with pytest.raises(DockerUnavailableError, match="not running"):
        backend.list_managed()
    assert backend.deployments() == []  # never raises
    model = make_cached_model(settings)
    claim = backend.claim(model, FP16, estimate_of(model.model_id, FP16, GIB), snapshot_with(gpu()))
    with pytest.raises(DockerUnavailableError):
        backend.start(model, FP16, claim)
    with pytest.raises(DockerUnavailableError):
        backend.stop("memctl-vllm-org-tiny-llama")


def test_unreachable_docker_host_is_reported():
    port = free_port()  # nothing listens there
    snap = snapshot_with(gpu())
    av = VllmDockerBackend(load_settings(docker_host=f"tcp://127.0.0.1:{port}")).availability(snap)
    assert not av.ok and "connection refused" in av.reason.args["detail"]
    av = VllmDockerBackend(load_settings(docker_host="tcp://no-such-host.invalid:2375")).availability(snap)
    assert not av.ok and "cannot reach" in av.reason.args["detail"]


def test_availability_is_cached_for_a_few_seconds(tmp_path, monkeypatch):
    backend = VllmDockerBackend(load_settings(docker_host=f"unix://{tmp_path}/docker.sock"))
    snap = snapshot_with(gpu())
    pings = []
    real_ping = backend.access.ping
    monkeypatch.setattr(backend.access, "ping", lambda: pings.append(1) or real_ping())
    first = backend.availability(snap)
    for _ in range(50):
        assert backend.availability(snap) == first
    assert len(pings) == 1  # Docker was asked once


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
    assert backend.availability(snapshot_with(gpu())).ok
    assert backend.docker_problem(refresh=True) is None
    # Make sure the socket is not world-accessible (dockerd creates it 0660 root:docker).
    assert os.stat(docker_host[len("unix://"):]).st_mode & 0o007 == 0
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody and ask
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            problem = backend.docker_problem(refresh=True)
            os.write(w, json.dumps([problem is None, str(problem) if problem else None]).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    ok, reason = json.loads(os.read(r, 65536) or b"[true, null]")
    os.close(r)
    assert not ok and "permission denied" in reason and "docker group" in reason



@pytest.mark.parametrize("tag,nf4", [("v0.27.1", True), ("v0.11.0", True), ("v0.28.0", False), ("v0.33.0", False),
                                     ("latest", False), ("my-custom-build", True)])
def test_nf4_is_offered_only_by_images_that_still_quantize_in_flight(tmp_path, tag, nf4):
    # vLLM removed in-flight bitsandbytes in v0.28.0 (quantization/bitsandbytes.py is in the 0.27.1 wheel,
    # not in 0.28.0 or 0.33.0): --quantization bitsandbytes would fail at start.
    settings = load_settings(docker_host=f"unix://{tmp_path}/none.sock", hf_cache_dir=tmp_path, vllm_tag=tag)
    b = VllmDockerBackend(settings)
    assert (Precision.NF4 in b.capabilities.precisions) is nf4
    assert b.capabilities.fit_ladder == ((Precision.NF4,) if nf4 else ())
    model = make_cached_model(settings)
    nf4_profile = FP16.with_(precision=Precision.NF4)
    claim = b.claim(model, nf4_profile, estimate_of(model.model_id, nf4_profile, GIB), snapshot_with(gpu()))
    assert [m.code for m in claim.blockers] == ([] if nf4 else ["backend.precision_unsupported"])
    if not nf4:
        assert "v0.28" in claim.blockers[0].text and claim.blockers[0].args["image_tag"] == tag
        assert [m.code for m in b.check_model(model, nf4_profile)] == ["backend.precision_unsupported"]
        with pytest.raises(QuantizationUnavailableError):
            b.start(model, nf4_profile, claim)


def test_the_default_image_is_vllm_v0_33_0_without_in_flight_nf4():
    settings = load_settings()
    assert settings.vllm_tag == "v0.33.0"
    assert Precision.NF4 not in VllmDockerBackend(settings).capabilities.precisions


def test_an_image_refusing_the_quantization_gets_a_plain_words_cause():
    key, words = classify_failure(["vllm serve: error: argument --quantization/-q: invalid choice: 'bitsandbytes'"])
    assert key == "quantization_unsupported" and "v0.27" in words
