"""Transformers backend on real tiny models, through the Backend protocol: start, deployments, stop and
its measured ReleaseReport, claim blockers, check_model, quantised loads, bad input."""

from __future__ import annotations

import sys
import threading

import pytest

from backends.transformers import TransformersBackend, checks, create
from backends.transformers.memory import model_footprint_bytes, process_private_bytes
from memory_controller import estimate as est
from memory_controller.backend import Backend, DeploymentState, GenerationRequest, InProcessGenerator
from memory_controller.catalog import resolve_model
from memory_controller.errors import (
    MemctlError,
    ModelLoadError,
    ModelNotFoundError,
    OperationCancelledError,
    QuantizationUnavailableError,
)
from memory_controller.probe import DeviceProbe
from memory_controller.types import Outcome, Precision, Profile
from tests.fixtures_models import TINY_ID, TINY_UNTIED_ID

MB = 1_000_000


def _profile(precision: Precision = Precision.BF16, device: str = "cpu", double_quant: bool = False) -> Profile:
    return Profile("transformers", precision, 256, 1, double_quant=double_quant, device=device)


def start(be: TransformersBackend, model, profile: Profile, **kwargs):
    """start() as the controller calls it: with the claim made from the estimate and a snapshot."""
    claim = be.claim(model, profile, est.estimate(model, profile, be.settings), SNAPSHOT())
    return be.start(model, profile, claim, **kwargs)


def SNAPSHOT():  # noqa: N802 - a probe of this machine (no NVML here: host only)
    return DeviceProbe().snapshot()


def generate(be, dep, prompt: str, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0) -> str:
    req = GenerationRequest(prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    return "".join(c.text for c in be.generate_stream(dep, req, lambda: False))


@pytest.fixture
def backend(hf_settings):
    be = create(hf_settings, DeviceProbe())
    yield be
    be.stop_all()


@pytest.fixture
def tiny(hf_settings):
    return resolve_model(TINY_ID, hf_settings)


def test_the_backend_implements_the_protocol_and_importing_it_loads_no_torch(backend):
    import subprocess

    assert isinstance(backend, Backend) and isinstance(backend, InProcessGenerator)
    assert backend.id == "transformers"
    caps = backend.capabilities
    assert set(caps.precisions) == set(Precision) and caps.devices == ("cuda", "cpu")
    assert caps.fit_ladder == (Precision.INT8, Precision.NF4)
    assert (caps.serves_http, caps.generates_in_process, caps.needs_gpu) == (False, True, False)
    assert backend.availability(SNAPSHOT()).ok
    code = ("import sys, backends.transformers as t; t.create(None, None); "
            "print(sorted(m for m in ('torch', 'transformers', 'bitsandbytes', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_start_generate_stop_round_trip(backend, tiny, hf_settings):
    events = []
    dep = start(backend, tiny, _profile(Precision.BF16), progress=events.append)
    assert (dep.model_id, dep.handle, dep.backend_id, dep.device, dep.state) == (
        TINY_ID, TINY_ID, "transformers", "cpu", DeploymentState.READY)
    assert dep.endpoint is None and set(dep.memory_bytes) == {"host"}
    # fp32 file loaded as bf16: a converted copy, all private memory
    assert dep.footprint_bytes == est.estimate(tiny, _profile(Precision.BF16), hf_settings).weights_bytes
    assert dep.detail["mapped_bytes"] == 0 and dep.detail["tensor_bytes"] == dep.footprint_bytes
    assert backend.deployments() == [dep]

    text = generate(backend, dep, "def add(a, b):", max_new_tokens=6)
    assert isinstance(text, str) and text
    assert generate(backend, dep, "def add(a, b):", max_new_tokens=6) == text  # greedy is deterministic
    sampled = generate(backend, dep, "def add(a, b):", max_new_tokens=6, temperature=0.8, top_p=0.9)
    assert isinstance(sampled, str)
    assert backend.verify(dep).startswith("generated 1 token")

    report = backend.stop(TINY_ID)
    assert report.model_id == TINY_ID and report.expected_bytes == dep.footprint_bytes
    assert report.verdict is Outcome.SUCCESS and report.message.code == "release.freed"
    assert report.measure == "rss_anon"
    assert report.freed_bytes + report.still_held_bytes == report.expected_bytes
    assert report.message.args["freed_bytes"] == report.freed_bytes
    assert report.message.args["still_held_bytes"] == report.still_held_bytes
    assert backend.deployments() == []
    with pytest.raises(ModelNotFoundError):
        generate(backend, dep, "hi")


def test_stop_is_idempotent(backend, tiny):
    start(backend, tiny, _profile())
    assert backend.stop(TINY_ID).message.code == "release.freed"
    again = backend.stop(TINY_ID)
    assert again.already_gone and again.verdict is Outcome.SUCCESS
    assert (again.expected_bytes, again.freed_bytes, again.still_held_bytes) == (0, 0, 0)
    never = backend.stop("memctl-test/never-loaded")
    assert never.already_gone and never.handle == "memctl-test/never-loaded"


def test_progress_reports_every_stage_in_order_with_growing_fractions(backend, tiny):
    events = []
    start(backend, tiny, _profile(), progress=events.append)
    stages = [e.stage for e in events]
    firsts = [s for i, s in enumerate(stages) if s not in stages[:i]]
    assert firsts == ["config", "weights", "placing", "warm-up", "ready"]
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(e.elapsed_s is not None and e.elapsed_s >= 0 for e in events)


def test_a_failing_progress_callback_does_not_break_the_load(backend, tiny):
    def broken(_event):
        raise RuntimeError("display went away")

    start(backend, tiny, _profile(), progress=broken)
    assert [d.model_id for d in backend.deployments()] == [TINY_ID]


@pytest.mark.parametrize("stage", ["config", "weights", "placing", "warm-up"])
def test_cancel_at_a_stage_boundary_leaves_nothing_loaded(backend, tiny, stage):
    seen: list[str] = []
    with pytest.raises(OperationCancelledError) as info:
        start(backend, tiny, _profile(), progress=lambda e: seen.append(e.stage), cancel=lambda: stage in seen)
    assert "nothing is left loaded" in info.value.message
    assert backend.deployments() == []
    start(backend, tiny, _profile())  # and the backend is still usable
    assert [d.model_id for d in backend.deployments()] == [TINY_ID]


def test_loading_twice_is_refused_and_keeps_the_first(backend, tiny):
    first = start(backend, tiny, _profile())
    with pytest.raises(ModelLoadError) as info:
        start(backend, tiny, _profile(Precision.FP32))
    assert "already loaded" in info.value.message
    assert backend.deployments() == [first]


def test_two_models_load_side_by_side_and_stop_all_reports_each(backend, tiny, hf_settings):
    untied = resolve_model(TINY_UNTIED_ID, hf_settings)
    start(backend, tiny, _profile())
    start(backend, untied, _profile(Precision.FP32))
    assert {d.model_id for d in backend.deployments()} == {TINY_ID, TINY_UNTIED_ID}
    reports = backend.stop_all()
    assert sorted(r.model_id for r in reports) == [TINY_ID, TINY_UNTIED_ID]
    assert all(r.verdict is Outcome.SUCCESS for r in reports)
    assert backend.deployments() == [] and backend.stop_all() == []


def test_deployments_answer_at_once_while_a_load_runs(backend, tiny):
    reached, gate = threading.Event(), threading.Event()

    def progress(event):
        if event.stage == "weights":
            reached.set()
            gate.wait(20)

    worker = threading.Thread(target=start, args=(backend, tiny, _profile()), kwargs={"progress": progress})
    worker.start()
    try:
        assert reached.wait(20)
        answered: list = []
        reader = threading.Thread(target=lambda: answered.append(backend.deployments()))
        reader.start()
        reader.join(10)
        assert answered == [[]] and not gate.is_set()  # answered while the load is held at "weights"
    finally:
        gate.set()
        worker.join(30)
    assert [d.model_id for d in backend.deployments()] == [TINY_ID]


def test_concurrent_loads_of_one_model_yield_one_model(backend, tiny):
    results: list[object] = []

    def run():
        try:
            results.append(start(backend, tiny, _profile()))
        except ModelLoadError as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(not isinstance(r, ModelLoadError) for r in results) == 1
    assert sum(isinstance(r, ModelLoadError) for r in results) == 2
    assert len(backend.deployments()) == 1


@pytest.mark.parametrize(("precision", "double_quant"), [(Precision.INT8, False), (Precision.NF4, True),
                                                         (Precision.FP4, False)])
def test_quantised_loads_generate_and_stop(backend, hf_settings, precision, double_quant):
    model = resolve_model(TINY_UNTIED_ID, hf_settings)
    profile = _profile(precision, double_quant=double_quant)
    dep = start(backend, model, profile)
    assert dep.detail["tensor_bytes"] == est.estimate(model, profile, hf_settings).weights_bytes
    # bf16 tensors the quantiser leaves alone may stay mapped from the file: counted apart, once
    assert dep.footprint_bytes + dep.detail["mapped_bytes"] == dep.detail["tensor_bytes"]
    assert isinstance(generate(backend, dep, "for i in", max_new_tokens=3), str)
    assert backend.stop(TINY_UNTIED_ID).verdict is Outcome.SUCCESS


def test_disk_offload_with_max_memory_loads_and_generates(backend, tiny, tmp_path):
    dep = start(backend, tiny, _profile(Precision.FP32), device_map="auto", max_memory={"cpu": 100_000},
                offload_folder=str(tmp_path / "offload"))
    assert dep.device == "cpu+disk"
    assert dep.footprint_bytes < est.read_model_spec(tiny.path).weight_file_bytes  # weights stay on disk
    assert isinstance(generate(backend, dep, "def", max_new_tokens=2), str)
    assert backend.stop(TINY_ID).verdict is Outcome.SUCCESS


@pytest.mark.parametrize(("kind", "words"), [
    ("truncated", "truncated"), ("corrupt_header", "corrupt"), ("no_weights", "no weight files"),
    ("unknown_arch", "does not know"), ("bad_config", "not valid JSON"),
])
def test_broken_models_fail_with_a_clear_message_and_leave_nothing_loaded(kind, words, bad_settings, bad_models):
    backend = TransformersBackend(bad_settings)
    model = resolve_model(bad_models[kind], bad_settings)
    with pytest.raises(ModelLoadError) as info:
        backend.start(model, _profile(), None)
    assert words in info.value.message and info.value.hint
    assert backend.deployments() == []


def test_model_with_only_a_pytorch_bin_still_loads(bad_settings, bad_models):
    backend = TransformersBackend(bad_settings)
    model = resolve_model(bad_models["bin_only"], bad_settings)
    dep = backend.start(model, _profile(), None)
    assert dep.footprint_bytes > 0
    assert backend.stop(model.model_id).verdict is Outcome.SUCCESS


def test_unknown_models_cannot_be_used(backend, tiny):
    dep = start(backend, tiny, _profile())
    backend.stop(TINY_ID)
    with pytest.raises(ModelNotFoundError):
        generate(backend, dep, "hi")
    with pytest.raises(ModelNotFoundError):
        backend.prompt_tokens(dep, GenerationRequest(prompt="hi"))


@pytest.mark.parametrize("kwargs", [
    {"max_new_tokens": 0}, {"max_new_tokens": 100_000}, {"temperature": -1.0}, {"top_p": 0.0}, {"prompt": ""},
    {"prompt": None},
])
def test_generate_rejects_bad_arguments(backend, tiny, kwargs):
    dep = start(backend, tiny, _profile())
    args = {"prompt": "hi", **kwargs}
    with pytest.raises(MemctlError):
        backend.generate_stream(dep, GenerationRequest(**args), lambda: False)


def test_claim_is_the_estimate_on_the_target_device(backend, tiny, hf_settings):
    profile = _profile()
    estimate = est.estimate(tiny, profile, hf_settings)
    claim = backend.claim(tiny, profile, estimate, SNAPSHOT())
    assert dict(claim.bytes_by_device) == {"host": estimate.total_bytes} and claim.blockers == ()
    gpu = backend.claim(tiny, _profile(Precision.FP16, device="cuda"), estimate, SNAPSHOT())
    assert list(gpu.bytes_by_device) == ["gpu:0"]
    assert [b.code for b in gpu.blockers] == ["backend.no_gpu"]  # this machine has no GPU


def test_quantisation_on_cuda_without_a_gpu_is_refused_before_loading(backend, tiny):
    assert not checks.cuda_available()
    with pytest.raises(QuantizationUnavailableError) as info:
        backend.start(tiny, _profile(Precision.NF4, device="cuda"), None)
    assert "CUDA" in info.value.message
    assert backend.deployments() == []


def test_missing_bitsandbytes_is_said_before_loading(backend, tiny, hf_settings, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when absent
    profile = _profile(Precision.INT8)
    claim = backend.claim(tiny, profile, est.estimate(tiny, profile, hf_settings), SNAPSHOT())
    assert [b.code for b in claim.blockers] == ["quant.bitsandbytes_missing"]
    assert "bitsandbytes" in claim.blockers[0].text
    with pytest.raises(QuantizationUnavailableError) as info:
        backend.start(tiny, profile, claim)
    assert "bitsandbytes" in info.value.message and "install" in info.value.hint
    assert backend.deployments() == []
    checks.check_quantization(Precision.BF16, "cpu")  # unquantised precisions never need it


def test_cuda_profile_without_a_gpu_is_refused_before_loading(backend, tiny):
    with pytest.raises(ModelLoadError) as info:
        backend.start(tiny, _profile(Precision.FP16, device="cuda"), None)
    assert "CUDA" in info.value.message
    with pytest.raises(ModelLoadError):
        backend.start(tiny, _profile(), None, device_map="cuda:0")
    assert backend.deployments() == []


@pytest.mark.parametrize("kwargs", [
    {"device_map": "gpu0"}, {"device_map": "cpu; rm -rf /"}, {"max_memory": {"cpu": "lots"}},
    {"max_memory": {}}, {"max_memory": {-1: 10}}, {"offload_folder": "/proc/no-such/offload"},
])
def test_invalid_placement_arguments_are_refused(backend, tiny, kwargs):
    with pytest.raises(ModelLoadError):
        backend.start(tiny, _profile(), None, **kwargs)
    assert backend.deployments() == []


def test_check_model_names_a_missing_tokenizer_and_a_missing_chat_template(backend, tiny, chat_settings,
                                                                            chat_models):
    no_tok = resolve_model(chat_models["no_tokenizer"], chat_settings)
    assert [m.code for m in backend.check_model(no_tok, _profile())] == ["model.no_tokenizer"]
    assert [m.code for m in backend.check_model(tiny, _profile())] == ["model.no_chat_template"]
    assert "chat template" in backend.check_model(tiny, _profile())[0].text
    for family in ("qwen", "llama3", "mistral"):
        assert backend.check_model(resolve_model(chat_models[family], chat_settings), _profile()) == ()


def test_fp16_on_cpu_is_loaded_literally(backend, tiny):
    import torch

    start(backend, tiny, _profile(Precision.FP16))
    assert backend._entries[TINY_ID].model.dtype == torch.float16


def test_clear_caches_says_what_ran(backend):
    actions = backend.clear_caches()
    assert isinstance(actions["gc_collect"], int)
    assert actions["cuda_empty_cache"] is False and actions["cuda_ipc_collect"] is False
    assert actions["malloc_trim"] in (True, False, None)


def test_process_private_bytes_follows_real_allocations():
    before = process_private_bytes()
    block = bytearray(64 * MB)
    block[:: 4096] = b"x" * len(block[::4096])  # touch every page
    grown = process_private_bytes()
    del block
    assert grown - before >= 60 * MB
    assert process_private_bytes() < grown - 50 * MB


def test_footprint_counts_tied_weights_once(backend, tiny):
    start(backend, tiny, _profile(Precision.FP32))
    model = backend._entries[TINY_ID].model
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    naive = sum(p.nbytes for _n, p in model.named_parameters(remove_duplicate=False))
    assert model_footprint_bytes(model) < naive


def test_a_claim_for_a_quantised_profile_imports_no_torch(hf_settings):
    """The dashboard may draw a plan on its first paint: claim() must not pull torch in."""
    import subprocess

    code = ("import sys; from pathlib import Path; from backends.transformers import create; "
            "from memory_controller.settings import load_settings; from memory_controller.catalog import resolve_model; "
            "from memory_controller.probe import DeviceProbe; from memory_controller import estimate as est; "
            "from memory_controller.types import Precision, Profile; "
            f"s = load_settings(hf_cache_dir=Path({str(hf_settings.hf_cache_dir)!r}), local_model_dirs=[]); "
            f"m = resolve_model({TINY_ID!r}, s); p = Profile('transformers', Precision.NF4, 256, 1, device='cpu'); "
            "c = create(s, None).claim(m, p, est.estimate(m, p, s), DeviceProbe().snapshot()); "
            "print(c.blockers == (), 'torch' in sys.modules, 'bitsandbytes' in sys.modules)")
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(root),
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False", "False"]
