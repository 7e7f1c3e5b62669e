"""Serving Ollama models through memctl's OpenAI server: the openai client streams from the derived tag
through the generic proxy; a switch Transformers -> Ollama -> Transformers is one plan each way; a tools
request for a model without tools gets 400. The Transformers backend is the real one (CPU, the tiny
cached model); Ollama is the stand-in (tests/fake_ollama.py) on the CPU too (no GPU here).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import openai
import pytest
from fastapi import FastAPI

from backends.ollama import create as ollama_backend
from backends.ollama import derived_name
from memory_controller import MemoryController
from memory_controller.backend import DeploymentState
from memory_controller.probe import DeviceProbe
from memory_controller.types import Precision, Profile
from server.openai_api import OpenAIService
from tests.fake_ollama import FakeOllama, write_gguf
from tests.fake_pynvml import FakeNvml
from tests.fixtures_models import TINY_ID
from tests.test_openai_api import TOOLS, start_uvicorn

SMALL = {"layers": 4, "heads": 8, "kv_heads": 2, "embd": 512, "context": 32768, "vocab": 32000, "weight_mib": 4}
CPU_TF = Profile(mode="transformers", precision=Precision.FP32, context_tokens=256, batch=1, device="cpu")  # type: ignore[arg-type]


@pytest.fixture
def served(hf_settings, tmp_path, monkeypatch) -> Iterator[SimpleNamespace]:
    for k in ("OLLAMA_HOST", "OLLAMA_KV_CACHE_TYPE", "OLLAMA_FLASH_ATTENTION", "OLLAMA_NUM_PARALLEL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "models"))
    fake = FakeOllama(models_dir=tmp_path / "models", gpu=None, unload_delay_s=0.05, memory_delay_s=0.05).start()
    fake.install("qwen-coder:small", write_gguf(tmp_path / "a.gguf", **SMALL))
    fake.install("codellama:small", write_gguf(tmp_path / "b.gguf", **SMALL), tools=False)
    settings = hf_settings.model_copy(update={"state_dir": tmp_path / "state", "docker_host": "unix:///nonexistent.sock",
                                              "serve_heartbeat_s": 0.1}).with_backend_options("ollama", host=fake.host)
    probe = DeviceProbe(FakeNvml(init_error="LibraryNotFound").module())
    from backends.transformers import create as tf_backend

    ctl = MemoryController(settings, probe=probe, backends={"transformers": tf_backend(settings, probe),
                                                            "ollama": ollama_backend(settings, probe)})
    service = OpenAIService(ctl, settings)
    app = FastAPI()
    app.include_router(service.router)
    server, thread, port = start_uvicorn(app)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        yield SimpleNamespace(ctl=ctl, fake=fake, client=client)
    finally:
        client.close()
        service.close()
        server.should_exit = True
        thread.join(10)
        try:
            ctl.emergency_clear()
        finally:
            fake.stop()


def _running(ctl) -> dict[str, str]:
    return {d.model_id: d.backend_id for d in ctl.deployments() if d.state is DeploymentState.READY}


def test_models_list_includes_ollamas_models(served):
    ids = {m.id for m in served.client.models.list().data}
    assert {"qwen-coder:small", "codellama:small", TINY_ID} <= ids


def test_openai_client_streams_from_the_derived_tag_after_one_switch_plan_and_back(served):
    ctl = served.ctl
    ctl.apply("transformers", TINY_ID, CPU_TF)
    assert _running(ctl) == {TINY_ID: "transformers"}

    plan = ctl.plan("transformers", "qwen-coder:small", purpose="ide")  # a model Ollama lists goes to Ollama
    assert plan.backend_id == "ollama" and [d.model_id for d in plan.to_stop] == [TINY_ID]
    assert plan.profile.context_tokens == 32768 and plan.fits

    stream = served.client.chat.completions.create(
        model="qwen-coder:small", stream=True, messages=[{"role": "user", "content": "hi"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Hello from the stand-in Ollama."
    assert _running(ctl) == {"qwen-coder:small": "ollama"}  # the Transformers model was stopped by the plan
    tag = derived_name("qwen-coder:small", 32768)
    chat = next(body for (kind, name, body) in served.fake.requests if kind == "CHAT")
    assert chat["model"] == tag  # proxied to Ollama's /v1 under the derived tag
    switch = next(r for r in ctl.history(5) if r.kind == "apply" and r.params.get("model") == "qwen-coder:small")
    assert [s.name for s in switch.steps][:1] == ["unload"] and TINY_ID in switch.steps[0].message

    back = ctl.plan("ollama", TINY_ID, CPU_TF)  # a checkpoint asked of Ollama goes to Transformers
    assert back.backend_id == "transformers" and [d.handle for d in back.to_stop] == [tag]
    ctl.apply(back)
    assert _running(ctl) == {TINY_ID: "transformers"}
    assert [m.name for m in served.fake.models] == []


def test_a_tools_request_for_a_model_without_tools_gets_400(served):
    assert served.ctl.backend("ollama").info("codellama:small").tools is False
    with pytest.raises(openai.BadRequestError) as err:
        served.client.chat.completions.create(model="codellama:small", tools=TOOLS,
                                              messages=[{"role": "user", "content": "read a.py"}])
    assert "does not support tools" in str(err.value)
    assert served.fake.models == []  # refused before anything was loaded (or stopped)
    assert not [r for r in served.fake.requests if r[0] == "CHAT"]
    # without tools the same model answers
    out = served.client.chat.completions.create(model="codellama:small", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content == "Hello from the stand-in Ollama."


def test_ide_export_for_an_ollama_model_carries_its_fitted_context(served):
    from memory_controller.ide import roo_settings
    from server.served import served_context

    model_id, ctx, _notes = served_context(served.ctl, "qwen-coder:small")
    assert (model_id, ctx) == ("qwen-coder:small", 32768)
    cfg = roo_settings("http://127.0.0.1:8765/v1", model_id, ctx)
    info = next(iter(cfg["providerProfiles"]["apiConfigs"].values()))
    assert info["openAiModelId"] == "qwen-coder:small"
    assert info["openAiCustomModelInfo"]["contextWindow"] == 32768
