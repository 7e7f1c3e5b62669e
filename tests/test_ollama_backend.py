"""The ``ollama`` backend against the stand-in Ollama (tests/fake_ollama.py) serving real GGUF files.

The estimator reads real GGUF files written with ``gguf``'s writer (the blob in the models folder, or
``/api/show``'s ``model_info`` when the folder is not readable); the stand-in holds what a load takes on
the fake NVML GPU by its own accounting, so a fit that is wrong shows up as a spill in ``/api/ps``.
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest

from backends.ollama import OllamaBackend, OllamaClient, base_of, create, derived_name, sizing
from backends.ollama.gguf_spec import read_gguf, spec_from_folder, spec_from_metadata
from memctl_cli.main import main as memctl_main
from memory_controller import MemoryController
from memory_controller.errors import InsufficientMemoryError, MemctlError, ModelLoadError, SettingsError
from memory_controller.probe import DeviceProbe
from memory_controller.settings import load_settings
from memory_controller.types import Precision, Profile
from tests.fake_ollama import FakeOllama, write_gguf
from tests.fake_pynvml import GIB, FakeGpu, FakeNvml

MIB = 1024**2
# Shapes of real models (the weights are a few MiB: the KV and graph figures depend on the metadata only).
LLAMA3_8B = {"layers": 32, "heads": 32, "kv_heads": 8, "embd": 4096, "context": 8192, "vocab": 128256}
BIG = {"layers": 48, "heads": 64, "kv_heads": 8, "embd": 8192, "context": 131072, "vocab": 32000, "weight_mib": 16}
CODELLAMA = {"layers": 32, "heads": 32, "kv_heads": 32, "embd": 4096, "context": 16384, "vocab": 32016, "weight_mib": 8}


@pytest.fixture(autouse=True)
def _ollama_env(monkeypatch):
    for k in ("OLLAMA_HOST", "OLLAMA_MODELS", "OLLAMA_KV_CACHE_TYPE", "OLLAMA_FLASH_ATTENTION", "OLLAMA_NUM_PARALLEL"):
        monkeypatch.delenv(k, raising=False)


def _spec(tmp_path, name="m", **shape):
    meta, tensor_bytes, quant = read_gguf(write_gguf(tmp_path / f"{name}.gguf", **shape))
    return spec_from_metadata(meta, source="gguf_blob", weights_bytes=tensor_bytes, quantization=quant)


# ----------------------------------------------------------------------------------------- the estimator
def test_kv_matches_a_published_ollama_figure_for_llama3_8b_at_8192_f16(tmp_path):
    # Ollama/llama.cpp log for Llama 3 8B, num_ctx 8192, f16 cache: "KV self size = 1024.00 MiB,
    # K (f16): 512.00 MiB, V (f16): 512.00 MiB".
    spec = _spec(tmp_path, **LLAMA3_8B)
    kv = sizing.kv_bytes(spec, 8192)
    assert abs(kv - 1024 * MIB) / (1024 * MIB) < 0.002
    # and the formula: 2 x layers x kv_heads x head_dim x num_ctx x parallel x 2 bytes
    assert kv == 2 * 32 * 8 * 128 * 8192 * 1 * 2


def test_kv_and_graph_match_an_ollama_server_log_with_two_slots(tmp_path):
    # Ollama 0.9.6's log for Meta-Llama-3-8B-Instruct Q4_0 with OLLAMA_CONTEXT_LENGTH=4096 and two slots
    # (a public docker-compose log): "kv_size = 8192 ... KV self size = 1024.00 MiB" and
    # "memory.graph.full=560.0 MiB".
    spec = _spec(tmp_path, **LLAMA3_8B)
    kv = sizing.KvConfig(parallel=2)
    assert abs(sizing.kv_bytes(spec, 4096, kv) - 1024 * MIB) / (1024 * MIB) < 0.002
    assert abs(sizing.graph_bytes(spec, 4096, 2) - 560 * MIB) / (560 * MIB) < 0.002


@pytest.mark.parametrize(("kv_type", "fa", "k_num", "k_den", "v_num", "v_den"), [
    ("q8_0", True, 34, 32, 34, 32),
    ("q4_0", True, 18, 32, 18, 32),
    ("q8_0", False, 34, 32, 2, 1),  # V stays f16 without flash attention
])
def test_quantised_kv_bytes_per_element(tmp_path, kv_type, fa, k_num, k_den, v_num, v_den):
    spec = _spec(tmp_path, **LLAMA3_8B)
    elements = 32 * 8 * 128 * 4096  # one of K or V, parallel 2 x 2048
    got = sizing.kv_bytes(spec, 2048, sizing.KvConfig(kv_type, fa, parallel=2))
    assert got == elements * k_num // k_den + elements * v_num // v_den


def test_sliding_window_and_hybrid_layers_are_counted_as_the_metadata_says(tmp_path):
    # gemma-style: 6 layers, a 1024-token window on every layer but each 3rd; layers 4 and 5 carry no KV
    spec = _spec(tmp_path, arch="gemma3", layers=6, heads=8, kv_heads=[4, 4, 4, 4, 0, 0], embd=1024,
                 context=131072, head_dim=256, sliding_window=1024, swa_pattern=3)
    assert [spec.is_swa(i) for i in range(6)] == [True, True, False, True, True, False]
    n = 32768
    window_cells = 1024 + 512  # min(ctx, pad256(window + ubatch))
    per_cell = 4 * 256 * 2 * 2  # kv_heads x head_dim x (K + V) x f16
    want = per_cell * (window_cells * 3 + n * 1)  # layers 0, 1, 3 slide; layer 2 is global; 4, 5 hold nothing
    assert sizing.kv_bytes(spec, n) == want
    # a per-layer pattern (array of bools) is honoured as written
    spec2 = _spec(tmp_path, "p", arch="gemma3", layers=4, heads=8, kv_heads=2, embd=1024, context=8192,
                  head_dim=128, sliding_window=512, swa_pattern=[True, False, True, False])
    assert [spec2.is_swa(i) for i in range(4)] == [True, False, True, False]


def test_weights_come_from_the_blob_and_max_context_fits_the_free_memory(tmp_path):
    spec = _spec(tmp_path, **BIG)
    assert spec.weights_bytes == 16 * MIB and spec.context_length == 131072
    free = 6 * GIB
    n = sizing.max_context(spec, free)
    assert n % 1024 == 0 and 2048 <= n < 131072
    assert sizing.size(spec, n).total_bytes <= free < sizing.size(spec, n + 1024).total_bytes
    assert sizing.max_context(spec, 100 * MIB) == 0  # not even the floor fits


def test_quantised_kv_is_suggested_when_it_would_reach_the_ide_minimum(tmp_path):
    spec = _spec(tmp_path, **LLAMA3_8B | {"context": 131072})
    free = 4 * GIB
    assert sizing.max_context(spec, free) < 32768
    advice = sizing.quantised_kv_advice(spec, free, sizing.KvConfig(), 32768)
    assert advice is not None and advice[0] in ("q8_0", "q4_0") and advice[1] >= 32768


def test_api_show_metadata_gives_the_same_kv_as_the_blob(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", **BIG)
    meta, weights, _q = read_gguf(path)
    from_show = spec_from_metadata(json.loads(json.dumps(meta, default=list)), source="api_show", weights_bytes=weights)
    from_blob = spec_from_metadata(meta, source="gguf_blob", weights_bytes=weights)
    assert sizing.kv_bytes(from_show, 32768) == sizing.kv_bytes(from_blob, 32768)


def test_a_linked_or_mismatched_blob_is_not_read(tmp_path):
    with FakeOllama(models_dir=tmp_path / "models") as fake:
        fake.install("gpt-oss:20b", write_gguf(tmp_path / "a.gguf", **BIG))
        blob = fake.installed["gpt-oss:20b"].path
        assert spec_from_folder("gpt-oss:20b", [tmp_path / "models"]) is not None
        data = blob.read_bytes()
        blob.unlink()
        other = tmp_path / "elsewhere.gguf"
        other.write_bytes(data)
        os.symlink(other, blob)  # a link is not a regular file: not followed
        assert spec_from_folder("gpt-oss:20b", [tmp_path / "models"]) is None
        blob.unlink()
        blob.write_bytes(data + b"x")  # the size differs from the manifest's
        assert spec_from_folder("gpt-oss:20b", [tmp_path / "models"]) is None


def test_derived_names():
    assert derived_name("gpt-oss:20b", 32768) == "gpt-oss:20b-memctl-32k"
    assert derived_name("llama3", 8192) == "llama3:latest-memctl-8k"
    assert derived_name("hf.co/org/repo:Q4_K_M", 1536) == "hf.co/org/repo:Q4_K_M-memctl-1536"
    assert base_of("gpt-oss:20b-memctl-32k") == "gpt-oss:20b" and base_of("gpt-oss:20b") is None


# ----------------------------------------------------------------------------------------- the backend
@pytest.fixture
def stand_in(tmp_path):
    """A 24 GiB GPU (16 GiB free), a stand-in Ollama with two real GGUF models: a big one with tools and
    codellama:7b without."""
    gpu = FakeGpu(total_bytes=24 * GIB, used_bytes=8 * GIB)
    fake = FakeOllama(models_dir=tmp_path / "models", gpu=gpu, unload_delay_s=0.05, memory_delay_s=0.05)
    with fake:
        fake.install("gpt-oss:20b", write_gguf(tmp_path / "a.gguf", **BIG), quantization="MXFP4")
        fake.install("codellama:7b", write_gguf(tmp_path / "b.gguf", **CODELLAMA), tools=False)
        yield SimpleNamespace(fake=fake, gpu=gpu, nvml=FakeNvml([gpu]), tmp=tmp_path)


def _backend(s, dirs=None) -> OllamaBackend:
    settings = SimpleNamespace(state_dir=s.tmp / "state", ide_min_context=32768, operation_timeout_s=60,
                               step_timeout_s=5)
    probe = DeviceProbe(s.nvml.module())
    return OllamaBackend(settings, probe, OllamaClient("http://" + s.fake.host),
                         dirs=[s.tmp / "models"] if dirs is None else dirs)


def _gpu_profile(ctx: int) -> Profile:
    return Profile(mode="ollama", precision=Precision.FP16, context_tokens=ctx, batch=1)  # type: ignore[arg-type]


def test_lists_installed_models_with_their_facts(stand_in):
    b = _backend(stand_in)
    by = {m.name: m for m in b.installed()}
    assert set(by) == {"gpt-oss:20b", "codellama:7b"}
    assert by["gpt-oss:20b"].tools and not by["codellama:7b"].tools
    assert by["gpt-oss:20b"].trained_context == 131072 and by["codellama:7b"].trained_context == 16384
    assert by["gpt-oss:20b"].quantization == "MXFP4" and by["gpt-oss:20b"].spec.source == "gguf_blob"
    # without the folder, /api/show's model_info gives the same KV
    shown = {m.name: m for m in _backend(stand_in, dirs=[]).installed()}
    assert shown["gpt-oss:20b"].spec.source == "api_show"
    assert sizing.kv_bytes(shown["gpt-oss:20b"].spec, 8192) == sizing.kv_bytes(by["gpt-oss:20b"].spec, 8192)


def test_start_creates_the_tag_loads_it_fully_on_the_gpu_and_stop_unloads_it(stand_in):
    b = _backend(stand_in)
    model = b.resolve_model("gpt-oss:20b")
    snap = b.probe.snapshot()
    n = b.max_context_that_fits(model, snap.gpus[0].free_bytes - GIB, _gpu_profile(4096))  # room for the unknown
    profile = _gpu_profile(n)
    est = b.estimate(model, profile)
    dep = b.start(model, profile, b.claim(model, profile, est, snap))
    assert dep.handle == derived_name("gpt-oss:20b", n) and dep.model_id == "gpt-oss:20b"
    assert dep.endpoint == f"http://{stand_in.fake.host}/v1" and dep.detail["served_name"] == dep.handle
    create = next(body for (m, path, body) in stand_in.fake.requests if path == "/api/create")
    assert create["from"] == "gpt-oss:20b" and create["parameters"] == {"num_ctx": n}
    loaded = {m.name: m for m in b.client.ps()}[dep.handle]
    assert loaded.size_vram == loaded.size and loaded.context_length == n
    # the stand-in measured more than the formulas (its overhead): kept, and used next time
    assert b.calibration.delta("gpt-oss:20b") == stand_in.fake.overhead_bytes
    assert b.estimate(model, profile).total_bytes == est.total_bytes + stand_in.fake.overhead_bytes
    note = next(n for n in b.claim(model, profile, est, b.probe.snapshot()).notes if n.code == "ollama.calibrated")
    assert note.args["delta"] == "+96 MiB"  # shown beside the plan
    report = b.stop(dep.handle)
    assert report.freed_bytes == loaded.size and b.deployments() == []
    assert b.stop(dep.handle).already_gone


@pytest.mark.parametrize("mode", ["spill", "die", "refuse", "wrong_ctx"])
def test_a_failed_load_leaves_nothing_loaded_and_no_new_tag(stand_in, mode):
    b = _backend(stand_in)
    model = b.resolve_model("codellama:7b")
    snap = b.probe.snapshot()
    profile = _gpu_profile(8192)
    est = b.estimate(model, profile)
    used = stand_in.gpu.used_bytes
    stand_in.fake.load_mode = mode
    expected = {"spill": InsufficientMemoryError, "die": MemctlError, "refuse": MemctlError,
                "wrong_ctx": ModelLoadError}[mode]
    with pytest.raises(expected):
        b.start(model, profile, b.claim(model, profile, est, snap))
    assert stand_in.fake.models == []
    assert derived_name("codellama:7b", 8192) not in stand_in.fake.installed


    for _ in range(40):  # the stand-in gives memory back a moment after the unload
        if stand_in.gpu.used_bytes == used:
            break
        time.sleep(0.05)
    assert stand_in.gpu.used_bytes == used


def test_a_spill_is_remembered_so_the_next_fit_is_smaller(stand_in):
    b = _backend(stand_in)
    model = b.resolve_model("gpt-oss:20b")  # limited by memory, not by its trained context
    free = b.probe.snapshot().gpus[0].free_bytes
    before = b.max_context_that_fits(model, free, _gpu_profile(4096))
    stand_in.fake.overhead_bytes = 2 * GIB  # Ollama takes far more than the formulas say
    profile = _gpu_profile(before)
    with pytest.raises(InsufficientMemoryError, match="on the CPU"):
        b.start(model, profile, b.claim(model, profile, b.estimate(model, profile), b.probe.snapshot()))
    after = b.max_context_that_fits(model, free, _gpu_profile(4096))
    assert before < 131072 and after < before
    assert stand_in.fake.models == []


def test_no_gpu_fits_against_host_memory(stand_in):
    stand_in.fake.gpu = None
    b = _backend(stand_in)
    model = b.resolve_model("codellama:7b")
    cpu = Profile(mode="ollama", precision=Precision.FP16, context_tokens=4096, batch=1, device="cpu")  # type: ignore[arg-type]
    est = b.estimate(model, cpu)
    assert est.cuda_context_bytes == 0
    snap = b.probe.snapshot()
    claim = b.claim(model, cpu, est, snap)
    assert set(claim.bytes_by_device) == {"host"}
    dep = b.start(model, cpu, claim)
    assert dep.device == "cpu" and dep.memory_bytes == {"host": dep.detail["size"]}
    b.stop(dep.handle)


def test_holder_view_leaves_memctls_own_tags_out(stand_in):
    b = _backend(stand_in)
    model = b.resolve_model("codellama:7b")
    p = _gpu_profile(4096)
    dep = b.start(model, p, b.claim(model, p, b.estimate(model, p), b.probe.snapshot()))
    assert [m.name for m in b.client.ps()] == [dep.handle]
    assert b.holder_client.loaded(max_age_s=0) == []
    b.stop(dep.handle)


# ----------------------------------------------------------------------------------------- through memctl
def _settings(s, **extra):
    return load_settings(ollama_host=s.fake.host, state_dir=str(s.tmp / "state"), **extra)  # the old flat name


def test_memctl_ollama_fit_json_lists_both_models_with_a_context_that_stays_on_the_gpu(stand_in, monkeypatch, capsys):
    monkeypatch.setenv("OLLAMA_MODELS", str(stand_in.tmp / "models"))
    monkeypatch.setenv("MEMCTL_OLLAMA_HOST", stand_in.fake.host)
    monkeypatch.setenv("MEMCTL_NVML_MODULE", "tests.fake_pynvml")
    monkeypatch.setenv("MEMCTL_FAKE_NVML", json.dumps({"gpus": [{"total_gib": 24, "used_gib": 8}]}))
    assert memctl_main(["ollama", "fit", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert set(rows) == {"gpt-oss:20b", "codellama:7b"}
    for r in rows.values():
        assert r["fits"] and r["num_ctx"] >= 2048 and r["device"] == "gpu:0", (r.get("blockers"), r.get("notes"))
        assert r["needed_bytes"] <= r["free_bytes"]
    assert rows["codellama:7b"]["tools"] is False and rows["gpt-oss:20b"]["tools"] is True
    assert any("no tool calling" in n for n in rows["codellama:7b"]["notes"])  # marked in the plan too
    assert rows["codellama:7b"]["num_ctx"] <= 16384  # never above the trained context


def test_fit_apply_creates_the_tag_and_ps_shows_it_fully_on_the_gpu(stand_in, capsys):
    settings = _settings(stand_in)
    probe = DeviceProbe(stand_in.nvml.module())
    ctl = MemoryController(settings, probe=probe, backends={"ollama": create(settings, probe)})
    from memctl_cli.ollama import cmd_ollama_fit

    args = SimpleNamespace(model="gpt-oss:20b", apply=True, json=True)
    assert cmd_ollama_fit(args, ctl) == 0
    out = json.loads(capsys.readouterr().out)
    applied, fitted = out["applied"], out["models"][0]
    # the first fit goes to the edge; the stand-in takes 96 MiB the formulas do not know, so it spills,
    # is rolled back (its tag deleted) and the calibrated plan a step lower holds
    if applied["derived_tag"] != fitted["derived_tag"]:
        assert applied["stepped_down_from"] == [fitted["num_ctx"]] and applied["num_ctx"] < fitted["num_ctx"]
        assert fitted["derived_tag"] not in stand_in.fake.installed
    ps = {m.name: m for m in OllamaClient("http://" + stand_in.fake.host).ps()}
    entry = ps[applied["derived_tag"]]
    assert entry.size_vram == entry.size and entry.context_length == applied["num_ctx"]
    assert applied["derived_tag"] in stand_in.fake.installed


def test_ollama_host_is_the_default_host_and_memctls_setting_wins(monkeypatch):
    from backends.ollama import OllamaOptions, host_setting

    for k in ("MEMCTL_OLLAMA_HOST", "OLLAMA_HOST", "MEMCTL_EMERGENCY_UNLOADS_OLLAMA"):
        monkeypatch.delenv(k, raising=False)
    default = load_settings()
    assert default.backend_options("ollama", OllamaOptions).host is None
    assert host_setting(default, {"OLLAMA_HOST": "0.0.0.0:11500"}) == "0.0.0.0:11500"
    assert host_setting(default, {}) == "127.0.0.1:11434"
    assert host_setting(load_settings(ollama_host="gpu-box:11434"), {"OLLAMA_HOST": "x:1"}) == "gpu-box:11434"
    monkeypatch.setenv("MEMCTL_OLLAMA_HOST", "127.0.0.1:11434")  # set to the default: still memctl's setting
    assert host_setting(load_settings(), {"OLLAMA_HOST": "x:1"}) == "127.0.0.1:11434"


def test_ollamas_settings_are_the_backends_own_options_with_the_old_names_as_aliases(monkeypatch, tmp_path):
    from backends.ollama import OllamaOptions
    from memory_controller.settings import settings_warnings

    for k in ("MEMCTL_OLLAMA_HOST", "MEMCTL_EMERGENCY_UNLOADS_OLLAMA"):
        monkeypatch.delenv(k, raising=False)
    assert load_settings().backend_options("ollama", OllamaOptions).emergency_unload is True
    # the flat keys of a config file written before the backend owned them
    cfg = tmp_path / "config.toml"
    cfg.write_text('ollama_host = "gpu-box:11500"\nemergency_unloads_ollama = false\n')
    monkeypatch.setenv("MEMCTL_CONFIG_FILE", str(cfg))
    opts = load_settings().backend_options("ollama", OllamaOptions)
    assert (opts.host, opts.emergency_unload) == ("gpu-box:11500", False)
    # the table itself, and the variables over it
    cfg.write_text('[backends.ollama]\nfactory = "backends.ollama:create"\nhost = "a:1"\nemergency_unload = false\n')
    monkeypatch.setenv("MEMCTL_EMERGENCY_UNLOADS_OLLAMA", "true")
    monkeypatch.setenv("MEMCTL_OLLAMA_HOST", "b:2")
    s = load_settings()
    opts = s.backend_options("ollama", OllamaOptions)
    assert (opts.host, opts.emergency_unload) == ("b:2", True)
    assert not [w for w in settings_warnings() if "OLLAMA" in w]  # both variables are known names
    assert create(s).holder_client.unloads_in_emergency is True
    monkeypatch.setenv("MEMCTL_EMERGENCY_UNLOADS_OLLAMA", "maybe")
    with pytest.raises(SettingsError, match="emergency_unload"):
        load_settings()
    # the core's settings have no field of Ollama's
    assert not [f for f in type(s).model_fields if "ollama" in f]


def test_a_hostile_manifest_is_not_read(tmp_path):
    with FakeOllama(models_dir=tmp_path / "models") as fake:
        fake.install("gpt-oss:20b", write_gguf(tmp_path / "a.gguf", **BIG))
        manifest = tmp_path / "models" / "manifests" / "registry.ollama.ai" / "library" / "gpt-oss" / "20b"
        good = manifest.read_bytes()
        for bad in (b"[" * 100_000, b"{not json", json.dumps({"layers": [{"mediaType": "x"}] * 3}).encode(),
                    json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                            "digest": "sha256:../../etc/passwd", "size": 10}]}).encode(),
                    b" " * (2 * 1024 * 1024)):
            manifest.write_bytes(bad)
            assert spec_from_folder("gpt-oss:20b", [tmp_path / "models"]) is None
        manifest.write_bytes(good)
        assert spec_from_folder("gpt-oss:20b", [tmp_path / "models"]) is not None


def test_ollama_down_means_nothing_of_it_runs_and_it_is_not_offered(tmp_path):
    settings = SimpleNamespace(state_dir=tmp_path / "state", ide_min_context=32768)
    b = OllamaBackend(settings, None, OllamaClient("http://127.0.0.1:9"), dirs=[])  # nothing listens there
    assert b.list_managed() == [] and b.deployments() == [] and b.list_models() == []
    avail = b.availability()
    assert not avail.ok and avail.reason.code == "backend.not_running"
    assert b.resolve_model("gpt-oss:20b") is None


def test_an_ollama_model_is_not_exported_for_a_cluster_engine(stand_in):
    from backends.vllm import create as vllm_backend
    from memory_controller import clusterfit

    settings = _settings(stand_in)
    probe = DeviceProbe(stand_in.nvml.module())
    ctl = MemoryController(settings, probe=probe, backends={"ollama": create(settings, probe),
                                                            "vllm": vllm_backend(settings, probe)})
    assert "production-stack" in clusterfit.exporters(ctl)
    with pytest.raises(clusterfit.BadExportRequestError, match="not a checkpoint"):
        ctl.export("production-stack", "gpt-oss:20b", gpu_bytes=80 * GIB)


def test_a_projector_blob_is_counted_with_the_weights(tmp_path):
    with FakeOllama(models_dir=tmp_path / "models") as fake:
        fake.install("llava:7b", write_gguf(tmp_path / "a.gguf", **CODELLAMA))
        root = tmp_path / "models"
        proj = b"\0" * (3 * MIB)
        digest = __import__("hashlib").sha256(proj).hexdigest()
        (root / "blobs" / f"sha256-{digest}").write_bytes(proj)
        manifest = root / "manifests" / "registry.ollama.ai" / "library" / "llava" / "7b"
        doc = json.loads(manifest.read_text())
        doc["layers"].append({"mediaType": "application/vnd.ollama.image.projector", "digest": f"sha256:{digest}",
                              "size": len(proj)})
        manifest.write_text(json.dumps(doc))
        spec = spec_from_folder("llava:7b", [root])
        assert spec.projector_bytes == 3 * MIB and spec.weights_bytes == 8 * MIB
        assert sizing.size(spec, 4096).weights_bytes == 11 * MIB


def test_a_model_ollama_cannot_describe_does_not_hide_the_others(stand_in):
    b = _backend(stand_in, dirs=[])
    stand_in.fake.fail["/api/show"] = "malformed"
    models = {m.name: m for m in b.installed(fresh=True)}
    assert set(models) == {"gpt-oss:20b", "codellama:7b"}
    assert all(m.spec is None and "JSON" in (m.spec_error or "") for m in models.values())
    plan_blockers = b.check_model(b.cached(models["codellama:7b"]), _gpu_profile(4096))
    assert plan_blockers and plan_blockers[0].code == "ollama.no_metadata"


def test_one_config_line_registers_the_backend_and_it_implements_the_protocol(tmp_path):
    from memory_controller.backend import Backend
    from memory_controller.registry import BackendRegistry

    settings = load_settings(state_dir=str(tmp_path / "state"))
    assert settings.backends["ollama"].factory == "backends.ollama:create"
    b = BackendRegistry({"ollama": settings.backends["ollama"].factory}, settings, None).get("ollama")
    assert isinstance(b, Backend) and b.id == "ollama" and b.capabilities.serves_http
    assert not b.capabilities.generates_in_process and b.capabilities.label == "Ollama"


def test_the_holder_view_leaves_out_memctls_own_tags_and_names_ollamas_processes(stand_in):
    b = _backend(stand_in)
    model = b.resolve_model("codellama:7b")
    p = _gpu_profile(4096)
    dep = b.start(model, p, b.claim(model, p, b.estimate(model, p), b.probe.snapshot()))
    view = b.holder_client
    assert (view.source, view.label, view.base_url) == ("ollama", "Ollama", b.client.base_url)
    assert view.loaded(max_age_s=0) == [] and view.ps() == []  # its own tag is a deployment, not another holder's
    assert [d.handle for d in b.list_managed()] == [dep.handle]
    assert view.role(["/usr/local/bin/ollama", "serve"], "ollama") == "server"
    assert view.role(["/usr/lib/ollama/ollama_llama_server", "--model", "x"], None) == "runner"
    assert view.role([], "ollama") == "runner" and view.role(["python", "ollama.py"], "python") is None
    b.stop(dep.handle)
    assert b.list_managed() == []
