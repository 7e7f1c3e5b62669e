"""The dashboard shows Ollama as a third mode when it answers: its own models with the same verdicts,
plan and Apply; the stand-in Ollama (tests/fake_ollama.py) serves real GGUF files on the fake GPU."""

from __future__ import annotations

import sys

import pytest

from tests.fake_ollama import FakeOllama, write_gguf
from tests.ui_harness import APP, app_factory, buttons, controller, settle, texts  # noqa: F401

SPEC = '{"gpus": [{"total_gib": 24, "used_gib": 2}]}'
SMALL = {"layers": 4, "heads": 8, "kv_heads": 2, "embd": 512, "context": 32768, "vocab": 32000, "weight_mib": 4}


@pytest.fixture
def with_ollama(app_factory, hf_cache, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "models"))
    for k in ("OLLAMA_HOST", "OLLAMA_KV_CACHE_TYPE", "OLLAMA_FLASH_ATTENTION", "OLLAMA_NUM_PARALLEL"):
        monkeypatch.delenv(k, raising=False)
    fake = FakeOllama(models_dir=tmp_path / "models", unload_delay_s=0.05, memory_delay_s=0.05).start()
    fake.install("qwen-coder:small", write_gguf(tmp_path / "a.gguf", **SMALL))
    try:
        at = app_factory(APP, SPEC, hub=hf_cache, MEMCTL_OLLAMA_HOST=fake.host)
        fake.gpu = sys.modules["tests.fake_pynvml"]._ACTIVE.gpus[0]  # loads land on the dashboard's GPU
        yield at, fake
    finally:
        fake.stop()


def test_ollama_is_a_mode_with_its_own_models_and_apply_loads_the_derived_tag(with_ollama):
    at, fake = with_ollama
    mode = at.radio(key="f_mode")
    assert "Ollama" in mode.options  # the backend's label, beside the others
    mode.set_value("ollama").run()
    options = at.selectbox(key="f_model").options
    assert len(options) == 1 and options[0].startswith("qwen-coder:small")  # checkpoints are not offered here
    assert options[0].endswith("✅")  # its verdict from the same plans
    buttons(at)["btn_apply"].click().run()
    settle(at)
    loaded = fake._ps()[1]["models"]
    assert [m["name"] for m in loaded] == ["qwen-coder:small-memctl-32k"]
    assert loaded[0]["size_vram"] == loaded[0]["size"]
    assert "qwen-coder:small" in texts(at)
