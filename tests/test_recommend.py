"""The guide's table and indicator, tested at the exact byte edges."""

from __future__ import annotations

import pytest

from memory_controller.backend import Availability
from memory_controller.probe.devices import DeviceProbe
from memory_controller.recommend import band_for, level_for, recommend
from memory_controller.settings import load_settings
from memory_controller.types import Level, Precision, msg
from tests.fake_pynvml import GIB, scenario

S = load_settings()


def rec(name: str, **kw):
    snap = DeviceProbe(scenario(name).module()).snapshot()
    kw.setdefault("cpu_backends", {"transformers"})
    return recommend(snap, bands=S.bands, green_min_bytes=S.green_min_bytes,
                     yellow_min_bytes=S.yellow_min_bytes, cpu_half_precision=S.cpu_half_precision, **kw)


@pytest.mark.parametrize(
    ("free_bytes", "band", "mode", "precision", "ctx", "batch"),
    [
        (24 * GIB, "vllm_full", "vllm", Precision.FP16, 2048, 4),
        (8 * GIB, "vllm_full", "vllm", Precision.FP16, 2048, 4),
        (8 * GIB - 1, "vllm_limited", "vllm", Precision.FP16, 1024, 2),
        (6 * GIB, "vllm_limited", "vllm", Precision.FP16, 1024, 2),
        (6 * GIB - 1, "transformers_fp16", "transformers", Precision.FP16, 1024, 1),
        (4 * GIB, "transformers_fp16", "transformers", Precision.FP16, 1024, 1),
        (4 * GIB - 1, "transformers_int8", "transformers", Precision.INT8, 512, 1),
        (0, "transformers_int8", "transformers", Precision.INT8, 512, 1),
    ],
)
def test_gpu_table_at_exact_byte_edges(free_bytes, band, mode, precision, ctx, batch):
    r = rec(f"free_bytes={free_bytes}")
    assert r.band == band
    assert (r.profile.mode, r.profile.precision, r.profile.context_tokens, r.profile.batch) == (
        mode, precision, ctx, batch)
    assert r.profile.device == "cuda" and r.profile.gpu_ids == (0,)
    assert r.free_bytes == free_bytes


@pytest.mark.parametrize(
    ("free_bytes", "level"),
    [
        (4 * GIB, Level.GREEN),
        (4 * GIB - 1, Level.YELLOW),
        (2 * GIB, Level.YELLOW),
        (2 * GIB - 1, Level.RED),
        (0, Level.RED),
        (None, Level.RED),
    ],
)
def test_indicator_edges(free_bytes, level):
    assert level_for(free_bytes, S.green_min_bytes, S.yellow_min_bytes) is level
    assert level.emoji in "🟢🟡🔴"


def test_no_gpu_recommends_transformers_on_cpu_from_host_memory_and_says_why_not_vllm():
    r = rec("library_missing")
    assert r.device_key == "host"
    assert r.profile.mode == "transformers" and r.profile.device == "cpu"
    assert r.profile.precision is not Precision.FP16  # mapped for the CPU
    assert not r.preferred_available
    assert "no NVIDIA GPU" in r.preferred_reason


def test_docker_missing_on_a_big_gpu_falls_back_to_transformers_with_a_note():
    down = Availability(False, msg("backend.docker_unavailable", "Docker is not available: daemon down"))
    r = rec("free_gib=20", availability={"vllm": down, "transformers": Availability(True)})
    assert r.profile.mode == "transformers"
    assert r.band == "transformers_fp16"
    assert not r.preferred_available and "daemon down" in r.preferred_reason
    assert any("vllm_full" in n.text for n in r.notes)
    assert any(n.code == "rec.backend_unavailable_fallback" for n in r.notes)


def test_best_gpu_is_chosen_unless_one_is_asked_for():
    assert rec("two_gpus").device_key == "gpu:1"
    r0 = rec("two_gpus", device_key="gpu:0")
    assert r0.device_key == "gpu:0" and r0.band == "vllm_full"  # exactly 8 GiB free


def test_lost_gpu_is_never_recommended():
    assert rec("one_gpu_lost").device_key == "gpu:0"


def test_fit_seam_can_lower_the_profile():
    def fit(profile, free_bytes):
        return profile.with_(context_tokens=256), (msg("fit.context", "context lowered", tokens=256),)

    r = rec("free_gib=20", fit=fit)
    assert r.profile.context_tokens == 256 and "context lowered" in [n.text for n in r.notes]
    r2 = rec("free_gib=20", fit=lambda p, f: None)
    assert r2.level is Level.RED


def test_band_for_with_custom_table_from_settings():
    s = load_settings(profiles=[
        {"name": "big", "min_free_gib": 10, "mode": "vllm", "precision": "bf16", "context_tokens": 8192, "batch": 8},
        {"name": "small", "min_free_gib": 0, "mode": "transformers", "precision": "nf4", "context_tokens": 256,
         "batch": 1},
    ])
    assert band_for(10 * GIB, s.bands).name == "big"
    assert band_for(10 * GIB - 1, s.bands).name == "small"
