"""Transformers backend on real tiny models: load, generate, unload and reclaim, quantised loads, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from backends.transformers_backend import (
    TransformersBackend,
    model_footprint_bytes,
    process_private_bytes,
    process_resident_bytes,
)
from memory_controller import estimate as est
from memory_controller.catalog import resolve_model
from memory_controller.errors import (
    MemctlError,
    ModelLoadError,
    ModelNotFoundError,
    OperationCancelledError,
    QuantizationUnavailableError,
)
from memory_controller.types import LoadedModel, Mode, Outcome, Precision, Profile
from tests.fixtures_models import BIG_ID, TINY_ID, TINY_UNTIED_ID

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000


def _profile(precision: Precision = Precision.BF16, device: str = "cpu", double_quant: bool = False) -> Profile:
    return Profile(Mode.TRANSFORMERS, precision, 256, 1, double_quant=double_quant, device=device)


@pytest.fixture
def backend(hf_settings):
    be = TransformersBackend(hf_settings)
    yield be
    be.unload_all()


@pytest.fixture
def tiny(hf_settings):
    return resolve_model(TINY_ID, hf_settings)


def test_load_generate_unload_round_trip(backend, tiny, hf_settings):
    events = []
    lm = backend.load(tiny, _profile(Precision.BF16), progress=events.append)
    assert isinstance(lm, LoadedModel)
    assert (lm.model_id, lm.backend, lm.device, lm.state) == (TINY_ID, "transformers", "cpu", "ready")
    assert lm.footprint_bytes == est.estimate(tiny, _profile(Precision.BF16), hf_settings).weights_bytes
    assert backend.loaded() == [lm] and backend.is_loaded(TINY_ID)

    text = backend.generate(TINY_ID, "def add(a, b):", max_new_tokens=6)
    assert isinstance(text, str) and text
    assert backend.generate(TINY_ID, "def add(a, b):", max_new_tokens=6) == text  # greedy is deterministic
    sampled = backend.generate(TINY_ID, "def add(a, b):", max_new_tokens=6, temperature=0.8, top_p=0.9)
    assert isinstance(sampled, str)

    report = backend.unload(TINY_ID)
    assert report.model_id == TINY_ID and report.expected_bytes == lm.footprint_bytes
    assert report.verdict is Outcome.SUCCESS
    assert report.freed_bytes + report.still_held_bytes == report.expected_bytes
    assert backend.loaded() == [] and not backend.is_loaded(TINY_ID)
    with pytest.raises(ModelNotFoundError):
        backend.generate(TINY_ID, "hi")


def test_progress_reports_every_stage_in_order_with_growing_fractions(backend, tiny):
    events = []
    backend.load(tiny, _profile(), progress=events.append)
    stages = [e.stage for e in events]
    firsts = [s for i, s in enumerate(stages) if s not in stages[:i]]
    assert firsts == ["config", "weights", "placing", "warm-up", "ready"]
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(e.elapsed_s is not None and e.elapsed_s >= 0 for e in events)


def test_a_failing_progress_callback_does_not_break_the_load(backend, tiny):
    def broken(_event):
        raise RuntimeError("display went away")

    backend.load(tiny, _profile(), progress=broken)
    assert backend.is_loaded(TINY_ID)


@pytest.mark.parametrize("stage", ["config", "weights", "placing", "warm-up"])
def test_cancel_at_a_stage_boundary_leaves_nothing_loaded(backend, tiny, stage):
    seen: list[str] = []
    with pytest.raises(OperationCancelledError) as info:
        backend.load(tiny, _profile(), progress=lambda e: seen.append(e.stage), cancel=lambda: stage in seen)
    assert "nothing is left loaded" in info.value.message
    assert backend.loaded() == []
    backend.load(tiny, _profile())  # and the backend is still usable
    assert backend.is_loaded(TINY_ID)


def test_loading_twice_is_refused_and_keeps_the_first(backend, tiny):
    first = backend.load(tiny, _profile())
    with pytest.raises(ModelLoadError) as info:
        backend.load(tiny, _profile(Precision.FP32))
    assert "already loaded" in info.value.message
    assert backend.loaded() == [first]


def test_two_models_load_side_by_side_and_unload_all_reports_each(backend, tiny, hf_settings):
    untied = resolve_model(TINY_UNTIED_ID, hf_settings)
    backend.load(tiny, _profile())
    backend.load(untied, _profile(Precision.FP32))
    assert {m.model_id for m in backend.loaded()} == {TINY_ID, TINY_UNTIED_ID}
    reports = backend.unload_all()
    assert sorted(r.model_id for r in reports) == [TINY_ID, TINY_UNTIED_ID]
    assert all(r.verdict is Outcome.SUCCESS for r in reports)
    assert backend.loaded() == [] and backend.unload_all() == []


def test_loaded_answers_at_once_while_a_load_runs(backend, tiny):
    reached, gate = threading.Event(), threading.Event()

    def progress(event):
        if event.stage == "weights":
            reached.set()
            gate.wait(20)

    worker = threading.Thread(target=backend.load, args=(tiny, _profile()), kwargs={"progress": progress})
    worker.start()
    try:
        assert reached.wait(20)
        t0 = time.perf_counter()
        assert backend.loaded() == [] and not backend.is_loaded(TINY_ID)
        assert time.perf_counter() - t0 < 0.1
    finally:
        gate.set()
        worker.join(30)
    assert backend.is_loaded(TINY_ID)


def test_concurrent_loads_of_one_model_yield_one_model(backend, tiny):
    results: list[object] = []

    def run():
        try:
            results.append(backend.load(tiny, _profile()))
        except ModelLoadError as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(isinstance(r, LoadedModel) for r in results) == 1
    assert sum(isinstance(r, ModelLoadError) for r in results) == 2
    assert len(backend.loaded()) == 1


@pytest.mark.parametrize(("precision", "double_quant"), [(Precision.INT8, False), (Precision.NF4, True),
                                                         (Precision.FP4, False)])
def test_quantised_loads_generate_and_unload(backend, hf_settings, precision, double_quant):
    model = resolve_model(TINY_UNTIED_ID, hf_settings)
    profile = _profile(precision, double_quant=double_quant)
    lm = backend.load(model, profile)
    assert lm.footprint_bytes == est.estimate(model, profile, hf_settings).weights_bytes
    assert isinstance(backend.generate(TINY_UNTIED_ID, "for i in", max_new_tokens=3), str)
    assert backend.unload(TINY_UNTIED_ID).verdict is Outcome.SUCCESS


def test_disk_offload_with_max_memory_loads_and_generates(backend, tiny, tmp_path):
    lm = backend.load(tiny, _profile(Precision.FP32), device_map="auto", max_memory={"cpu": 100_000},
                      offload_folder=str(tmp_path / "offload"))
    assert "disk" in lm.device
    assert lm.footprint_bytes < est.read_model_spec(tiny.path).weight_file_bytes  # weights stay on disk
    assert isinstance(backend.generate(TINY_ID, "def", max_new_tokens=2), str)
    assert backend.unload(TINY_ID).verdict is Outcome.SUCCESS


@pytest.mark.parametrize(("kind", "words"), [
    ("truncated", "truncated"), ("corrupt_header", "corrupt"), ("no_weights", "no weight files"),
    ("unknown_arch", "does not know"), ("bad_config", "not valid JSON"),
])
def test_broken_models_fail_with_a_clear_message_and_leave_nothing_loaded(kind, words, bad_settings, bad_models):
    backend = TransformersBackend(bad_settings)
    model = resolve_model(bad_models[kind], bad_settings)
    with pytest.raises(ModelLoadError) as info:
        backend.load(model, _profile())
    assert words in info.value.message and info.value.hint
    assert backend.loaded() == []


def test_model_with_only_a_pytorch_bin_still_loads(bad_settings, bad_models):
    backend = TransformersBackend(bad_settings)
    model = resolve_model(bad_models["bin_only"], bad_settings)
    lm = backend.load(model, _profile())
    assert lm.footprint_bytes > 0
    assert backend.unload(model.model_id).verdict is Outcome.SUCCESS


def test_unknown_models_cannot_be_unloaded_or_used(backend):
    with pytest.raises(ModelNotFoundError):
        backend.unload("memctl-test/never-loaded")
    with pytest.raises(ModelNotFoundError):
        backend.generate("memctl-test/never-loaded", "hi")


@pytest.mark.parametrize("kwargs", [
    {"max_new_tokens": 0}, {"max_new_tokens": 10_000}, {"temperature": -1.0}, {"top_p": 0.0}, {"prompt": ""},
])
def test_generate_rejects_bad_arguments(backend, tiny, kwargs):
    backend.load(tiny, _profile())
    args = {"prompt": "hi", **kwargs}
    with pytest.raises(MemctlError):
        backend.generate(TINY_ID, **args)


def test_quantisation_on_cuda_without_a_gpu_is_refused_before_loading(backend, tiny):
    assert not backend.cuda_available()
    with pytest.raises(QuantizationUnavailableError) as info:
        backend.load(tiny, _profile(Precision.NF4, device="cuda"))
    assert "CUDA" in info.value.message
    assert backend.loaded() == []


def test_missing_bitsandbytes_is_said_before_loading(backend, tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when absent
    with pytest.raises(QuantizationUnavailableError) as info:
        backend.load(tiny, _profile(Precision.INT8))
    assert "bitsandbytes" in info.value.message and "install" in info.value.hint
    assert backend.loaded() == []
    backend.check_quantization(Precision.BF16, "cpu")  # unquantised precisions never need it


def test_cuda_profile_without_a_gpu_is_refused_before_loading(backend, tiny):
    with pytest.raises(ModelLoadError) as info:
        backend.load(tiny, _profile(Precision.FP16, device="cuda"))
    assert "CUDA" in info.value.message
    with pytest.raises(ModelLoadError):
        backend.load(tiny, _profile(), device_map="cuda:0")
    assert backend.loaded() == []


@pytest.mark.parametrize("kwargs", [
    {"device_map": "gpu0"}, {"device_map": "cpu; rm -rf /"}, {"max_memory": {"cpu": "lots"}},
    {"max_memory": {}}, {"max_memory": {-1: 10}}, {"offload_folder": "/proc/no-such/offload"},
])
def test_invalid_placement_arguments_are_refused(backend, tiny, kwargs):
    with pytest.raises(ModelLoadError):
        backend.load(tiny, _profile(), **kwargs)
    assert backend.loaded() == []


def test_fp16_on_cpu_is_loaded_literally(backend, tiny):
    import torch

    backend.load(tiny, _profile(Precision.FP16))
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


@pytest.mark.slow
def test_unload_gives_private_memory_back_on_a_100mb_model(big_model):
    backend = TransformersBackend(big_model.settings)
    model = resolve_model(BIG_ID, big_model.settings)
    profile = _profile(Precision.FP32)  # bf16 file -> fp32 copies: every byte is private memory
    start = process_private_bytes()
    backend.load(model, profile)
    backend.unload(BIG_ID)
    first_load_overhead = process_private_bytes() - start  # imports, kernels, thread pools: measured apart

    before = process_private_bytes()
    lm = backend.load(model, profile)
    during = process_private_bytes()
    report = backend.unload(BIG_ID)
    after = process_private_bytes()

    model_bytes = lm.footprint_bytes
    tolerance = max(50 * MB, 0.05 * model_bytes)
    assert model_bytes >= 100 * MB
    assert during - before >= 0.5 * model_bytes  # the weights really were private memory
    assert after - before <= tolerance, (after - before, first_load_overhead)
    assert report.measure == "rss_anon" and report.verdict is Outcome.SUCCESS
    assert report.expected_bytes == model_bytes and report.freed_bytes >= model_bytes - tolerance
    assert "came back" in report.message


@pytest.mark.slow
def test_unload_of_a_memory_mapped_model_measures_the_mapped_pages(big_model):
    backend = TransformersBackend(big_model.settings)
    model = resolve_model(BIG_ID, big_model.settings)
    anon0, file0 = process_resident_bytes()
    lm = backend.load(model, _profile(Precision.BF16))  # same dtype as the file: weights stay mapped
    anon1, file1 = process_resident_bytes()
    assert file1 - file0 >= 0.9 * lm.footprint_bytes  # touched during warm-up: resident now
    assert anon1 - anon0 < 0.5 * lm.footprint_bytes
    report = backend.unload(BIG_ID)
    anon2, file2 = process_resident_bytes()
    assert report.measure == "rss_anon+rss_file" and report.verdict is Outcome.SUCCESS
    assert file1 - file2 >= 0.9 * lm.footprint_bytes


@pytest.mark.slow
def test_out_of_memory_during_load_frees_partial_state_and_says_needed_vs_free(big_model):
    """A real allocation failure: the load runs under RLIMIT_DATA in a child process."""
    code = f"""
import json, resource, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
import torch, transformers  # imported before the limit: only the load itself is starved
from transformers import AutoConfig, AutoModelForCausalLM
from backends.transformers_backend import TransformersBackend, process_private_bytes
from memory_controller.catalog import resolve_model
from memory_controller.errors import InsufficientMemoryError
from memory_controller.settings import load_settings
from memory_controller.types import Mode, Precision, Profile
s = load_settings(hf_cache_dir=Path({str(big_model.hub_dir)!r}))
be = TransformersBackend(s)
m = resolve_model({BIG_ID!r}, s)
profile = Profile(Mode.TRANSFORMERS, Precision.FP32, 256, 1, device="cpu")
be.load(m, profile)  # the first load's one-time overhead (imports, thread pools) is measured apart
be.unload(m.model_id)
before = process_private_bytes()
data = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmData")][0]
resource.setrlimit(resource.RLIMIT_DATA, (data + 100 * 2**20, resource.RLIM_INFINITY))
out = {{}}
try:
    be.load(m, profile)
    out["error"] = None
except InsufficientMemoryError as exc:
    out.update(error=type(exc).__name__, message=exc.message, needed=exc.needed_bytes, free=exc.free_bytes,
               context=exc.__context__ is not None)
finally:
    resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
out["loaded"] = len(be.loaded())
out["held"] = process_private_bytes() - before
print(json.dumps(out))
"""
    env = {**os.environ, **big_model.env()}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] == "InsufficientMemoryError", out
    assert "needs about" in out["message"] and "was free" in out["message"]
    assert out["needed"] >= 250 * MB and out["free"] is not None and out["free"] < out["needed"]
    assert out["context"] is False  # raised outside the except block: no traceback keeps the partial model
    assert out["loaded"] == 0
    assert out["held"] < 50 * MB, out


def test_footprint_counts_tied_weights_once(backend, tiny):
    backend.load(tiny, _profile(Precision.FP32))
    model = backend._entries[TINY_ID].model
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    naive = sum(p.nbytes for _n, p in model.named_parameters(remove_duplicate=False))
    assert model_footprint_bytes(model) < naive
