"""Estimator: header-only byte arithmetic checked against real loads, exact edges, speed, no torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memory_controller import estimate as est
from memory_controller.catalog import resolve_model
from memory_controller.errors import MemctlError, ModelLoadError
from memory_controller.settings import load_settings
from memory_controller.types import CachedModel, Precision, Profile
from memory_controller.units import MIB
from tests import model_factory as mf
from tests.fixtures_models import TINY_ID, TINY_UNTIED_ID

# Fixtures hf_cache, hf_settings, bad_hf_cache, bad_models, bad_settings, big_model come from
# tests/fixtures_models.py, registered as a plugin in tests/conftest.py.


ROOT = Path(__file__).resolve().parent.parent


def _profile(precision: Precision = Precision.BF16, context: int = 1024, batch: int = 1, device: str = "cpu",
             double_quant: bool = False) -> Profile:
    return Profile("transformers", precision, context, batch, double_quant=double_quant, device=device)


def _local(path: Path) -> CachedModel:
    return CachedModel(str(path), None, 0, True, True, "LlamaForCausalLM", str(path), "local_dir")


@pytest.fixture(scope="module")
def backend(hf_settings):
    from backends.transformers import TransformersBackend

    be = TransformersBackend(hf_settings)
    yield be
    be.stop_all()


CASES = [
    (Precision.FP32, False), (Precision.BF16, False), (Precision.FP16, False), (Precision.INT8, False),
    (Precision.NF4, False), (Precision.NF4, True), (Precision.FP4, False),
]


@pytest.mark.parametrize("model_id", [TINY_ID, TINY_UNTIED_ID])
@pytest.mark.parametrize(("precision", "double_quant"), CASES, ids=[f"{p.value}{'-dq' if d else ''}" for p, d in CASES])
def test_weights_estimate_is_within_1pct_of_what_the_loaded_model_holds(model_id, precision, double_quant,
                                                                         hf_settings, backend):
    from backends.transformers.memory import model_footprint_bytes

    model = resolve_model(model_id, hf_settings)
    profile = _profile(precision, double_quant=double_quant)
    estimate = est.estimate(model, profile, hf_settings)
    backend.start(model, profile, None)
    try:
        real = model_footprint_bytes(backend._entries[model_id].model)
        if precision is Precision.FP32:
            params = sum(p.numel() for p in backend._entries[model_id].model.parameters())
            assert estimate.parameters == params
    finally:
        backend.stop(model_id)
    assert abs(estimate.weights_bytes - real) <= 0.01 * real, (estimate.weights_bytes, real)


@pytest.mark.parametrize("model_id", [TINY_ID, TINY_UNTIED_ID])
@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
def test_kv_cache_formula_matches_the_cache_a_real_forward_pass_builds(model_id, precision, hf_settings):
    import torch
    from transformers import AutoModelForCausalLM

    model = resolve_model(model_id, hf_settings)
    spec = est.read_model_spec(model.path)
    dtype = torch.float32 if precision is Precision.FP32 else torch.bfloat16
    lm = AutoModelForCausalLM.from_pretrained(model.path, dtype=dtype, local_files_only=True)
    tokens, batch = 37, 3
    with torch.inference_mode():
        out = lm(torch.ones(batch, tokens, dtype=torch.long), use_cache=True)
    real = sum(layer.keys.nbytes + layer.values.nbytes for layer in out.past_key_values.layers)
    assert est.kv_cache_bytes(spec, tokens, batch, est.dense_bytes_per_element(precision)) == real


def test_kv_cache_honours_grouped_query_attention_and_an_explicit_head_dim(hf_settings):
    tied = est.read_model_spec(resolve_model(TINY_ID, hf_settings).path)
    untied = est.read_model_spec(resolve_model(TINY_UNTIED_ID, hf_settings).path)
    assert (tied.num_layers, tied.num_kv_heads, tied.head_dim) == (2, 2, 16)  # 4 query heads, 2 KV heads
    assert (untied.num_kv_heads, untied.head_dim) == (1, 32)  # head_dim given, not hidden/heads = 16
    assert est.kv_cache_bytes(tied, 1000, 3, 2) == 2 * 2 * 2 * 16 * 1000 * 3 * 2
    assert est.kv_cache_bytes(untied, 1000, 3, 4) == 2 * 2 * 1 * 32 * 1000 * 3 * 4
    assert est.kv_cache_bytes(tied, 0, 3, 2) == 0
    with pytest.raises(MemctlError):
        est.kv_cache_bytes(tied, -1, 1, 2)


def test_breakdown_adds_up_and_the_cuda_context_counts_only_on_cuda(hf_settings):
    model = resolve_model(TINY_ID, hf_settings)
    cpu = est.estimate(model, _profile(Precision.FP16, device="cpu"), hf_settings)
    gpu = est.estimate(model, _profile(Precision.FP16, device="cuda"), hf_settings)
    assert cpu.cuda_context_bytes == 0
    assert gpu.cuda_context_bytes == hf_settings.cuda_context_reserve_bytes
    for e in (cpu, gpu):
        assert e.total_bytes == e.weights_bytes + e.kv_cache_bytes + e.activation_bytes + e.cuda_context_bytes
        assert e.source == "safetensors_headers" and e.model_id == TINY_ID
    assert gpu.total_bytes - cpu.total_bytes == hf_settings.cuda_context_reserve_bytes
    two = est.estimate(model, _profile(Precision.FP16, device="cuda").with_(gpu_ids=(0, 1)), hf_settings)
    assert two.cuda_context_bytes == 2 * hf_settings.cuda_context_reserve_bytes


def test_activation_allowance_is_a_fraction_of_weights_and_kv_with_a_floor(hf_cache):
    model = resolve_model(TINY_ID, load_settings(hf_cache_dir=hf_cache))
    frac = load_settings(hf_cache_dir=hf_cache, activation_overhead_fraction=0.5, activation_overhead_min_mib=0)
    e = est.estimate(model, _profile(), frac)
    spec = est.read_model_spec(model.path)
    prefill = est.prefill_bytes(spec, e.profile.context_tokens, e.profile.batch, e.profile.precision)
    assert e.activation_bytes == max(int(0.5 * (e.weights_bytes + e.kv_cache_bytes)), prefill)
    floor = load_settings(hf_cache_dir=hf_cache, activation_overhead_fraction=0.5, activation_overhead_min_mib=64)
    assert est.estimate(model, _profile(), floor).activation_bytes == 64 * MIB


def test_quantised_profiles_need_less_and_keep_16bit_kv(hf_settings):
    model = resolve_model(TINY_UNTIED_ID, hf_settings)
    w = {p: est.estimate(model, _profile(p), hf_settings) for p in Precision}
    assert w[Precision.FP32].weights_bytes > w[Precision.BF16].weights_bytes > w[Precision.INT8].weights_bytes
    assert w[Precision.INT8].weights_bytes > w[Precision.NF4].weights_bytes == w[Precision.FP4].weights_bytes
    assert w[Precision.INT8].kv_cache_bytes == w[Precision.BF16].kv_cache_bytes == w[Precision.FP32].kv_cache_bytes // 2


def test_tied_head_stored_twice_is_counted_once(tmp_path):
    shape = mf.LlamaShape(hidden_size=128, intermediate_size=256, layers=3, heads=4, kv_heads=2, vocab_size=5000)
    once = est.read_model_spec(mf.write_sparse_llama(tmp_path / "once", shape))
    twice = est.read_model_spec(mf.write_sparse_llama(tmp_path / "twice", shape, store_tied_head=True))
    assert len(twice.tensors) == len(once.tensors) + 1
    for p in (Precision.FP32, Precision.NF4):
        assert est.weights_bytes(twice, p) == est.weights_bytes(once, p)
    untied = est.read_model_spec(mf.write_sparse_llama(tmp_path / "untied", mf.LlamaShape(**{
        **shape.__dict__, "tie": False})))
    # the untied head stays 16-bit under nf4: 5000 x 128 x 2 bytes more than the tied model
    assert est.weights_bytes(untied, Precision.NF4)[0] - est.weights_bytes(once, Precision.NF4)[0] == 5000 * 128 * 2


def test_sparse_factory_writes_the_same_tensors_as_save_pretrained(hf_settings, tmp_path):
    real = est.read_model_spec(resolve_model(TINY_UNTIED_ID, hf_settings).path)
    sparse = est.read_model_spec(mf.write_sparse_llama(tmp_path / "m", mf.TINY_UNTIED))
    assert sorted((t.name, t.shape) for t in real.tensors) == sorted((t.name, t.shape) for t in sparse.tensors)


def test_max_context_is_exact_at_the_byte_edge(hf_settings):
    model = resolve_model(TINY_ID, hf_settings)
    for profile in (_profile(Precision.BF16, batch=2), _profile(Precision.NF4, device="cuda")):
        for ctx in (1, 700, 1500):
            need = est.estimate(model, profile.with_(context_tokens=ctx), hf_settings).total_bytes
            assert est.max_context_that_fits(model, need, profile, hf_settings) == ctx
            assert est.max_context_that_fits(model, need - 1, profile, hf_settings) == ctx - 1


def test_max_context_is_zero_when_the_weights_do_not_fit_and_capped_by_the_model(hf_settings):
    model = resolve_model(TINY_ID, hf_settings)
    profile = _profile(Precision.BF16)
    one = est.estimate(model, profile.with_(context_tokens=1), hf_settings).total_bytes
    assert est.max_context_that_fits(model, one - 1, profile, hf_settings) == 0
    assert est.max_context_that_fits(model, 0, profile, hf_settings) == 0
    assert est.max_context_that_fits(model, 1 << 40, profile, hf_settings) == 2048  # max_position_embeddings


def test_model_without_safetensors_falls_back_to_file_sizes_and_says_so(bad_settings, bad_models, hf_settings):
    model = resolve_model(bad_models["bin_only"], bad_settings)
    e = est.estimate(model, _profile(Precision.BF16), bad_settings)
    assert e.source == "weight_files"
    assert any("weight-file sizes" in n for n in e.notes)
    same_shape = est.estimate(resolve_model(TINY_ID, hf_settings), _profile(Precision.BF16), hf_settings)
    assert abs(e.weights_bytes - same_shape.weights_bytes) <= 0.03 * same_shape.weights_bytes


@pytest.mark.parametrize(("kind", "words"), [
    ("truncated", "truncated"), ("corrupt_header", "corrupt"), ("no_weights", "no weight files"),
    ("bad_config", "not valid JSON"),
])
def test_broken_model_files_raise_a_load_error_naming_the_problem(kind, words, bad_settings, bad_models):
    model = resolve_model(bad_models[kind], bad_settings)
    with pytest.raises(ModelLoadError) as info:
        est.estimate(model, _profile(), bad_settings)
    assert words in info.value.message and info.value.hint


def test_invalid_profile_is_rejected(hf_settings):
    model = resolve_model(TINY_ID, hf_settings)
    with pytest.raises(MemctlError):
        est.estimate(model, _profile(batch=0), hf_settings)
    with pytest.raises(MemctlError):
        est.estimate(model, _profile(device="tpu"), hf_settings)


def test_spec_cache_notices_a_changed_config(hf_settings, tmp_path):
    src = Path(resolve_model(TINY_ID, hf_settings).path)
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    before = est.estimate(_local(dst), _profile(), hf_settings)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_key_value_heads"] = 4
    (dst / "config.json").write_text(json.dumps(cfg, indent=4))
    after = est.estimate(_local(dst), _profile(), hf_settings)
    assert after.kv_cache_bytes == 2 * before.kv_cache_bytes


def test_a_half_billion_parameter_layout_is_estimated_from_headers_and_cached(tmp_path, hf_settings, monkeypatch):
    """Reads the headers only (the weight bytes are a sparse hole) and re-estimates from the cache.
    How long it takes is measured in bench/bench_transformers.py (part 4), not asserted here."""
    from memory_controller.estimate import spec as spec_module

    path = mf.write_sparse_llama(tmp_path / "half-b", mf.BENCH_05B)
    model = _local(path)
    profile = _profile(Precision.NF4, context=4096)
    est.clear_spec_cache()
    reads: list[object] = []
    real = spec_module._read_spec
    monkeypatch.setattr(spec_module, "_read_spec", lambda *a: reads.append(a) or real(*a))
    e = est.estimate(model, profile, hf_settings)
    assert len(est.read_model_spec(path).tensors) > 300
    assert 0.45e9 < e.parameters < 0.5e9
    est.estimate(model, profile, hf_settings)
    assert len(reads) == 1  # cached by path and mtime
    (path / "config.json").write_text((path / "config.json").read_text() + " ")
    os.utime(path / "config.json", (1, 1))
    est.estimate(model, profile, hf_settings)
    assert len(reads) == 2  # a changed file is read again


def test_catalog_estimator_cli_and_backend_import_without_torch(hf_cache):
    code = (
        "import sys, json\n"
        "import memory_controller.catalog as c, memory_controller.estimate as e, memctl_cli.models\n"
        "import backends.transformers\n"
        "from memory_controller.settings import load_settings\n"
        "from memory_controller.types import Profile, Precision\n"
        f"s = load_settings(hf_cache_dir={str(hf_cache)!r})\n"
        f"m = c.resolve_model({TINY_ID!r}, s)\n"
        "x = e.estimate(m, Profile('transformers', Precision.NF4, 512, 1), s)\n"
        "heavy = [k for k in ('torch', 'transformers', 'bitsandbytes', 'accelerate') if k in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'total': x.total_bytes}))\n"
    )
    env = {**os.environ, **mf.hf_env(hf_cache)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["heavy"] == [] and data["total"] > 0
