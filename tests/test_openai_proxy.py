"""The server proxies HTTP deployments: the openai client -> memctl -> a fake vLLM container on the
private Docker engine (tests/fake_vllm: streamed chat, a scripted tool call, usage)."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator

import httpx
import openai
import pytest

from memory_controller.types import Precision, Profile
from tests.fake_vllm.backend import FakeVllmHttpBackend
from tests.fixtures_docker import free_port
from tests.fixtures_models import TINY_ID, TINY_UNTIED_ID
from tests.test_openai_api import DEAD_DOCKER, TOOLS, Served, _serve

pytestmark = pytest.mark.docker

GPU = Profile(mode="fakevllm", precision=Precision.FP16, context_tokens=512, batch=1, device="cuda")


def last_request(port: int) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/fake/last_request", timeout=5) as resp:
        return json.loads(resp.read())


@pytest.fixture
def proxied(hf_settings, tmp_path, docker_client, fake_vllm_image, user_network) -> Iterator[Served]:
    settings = hf_settings.model_copy(update={"state_dir": tmp_path / "state", "docker_host": DEAD_DOCKER,
                                              "serve_heartbeat_s": 0.1, "host_memory_budget_bytes": 4096})

    def make(s, ledger):
        return FakeVllmHttpBackend(s, docker_client, fake_vllm_image, free_port, user_network, ledger=ledger)

    yield from _serve(settings, make_backend=make)


def port_of(served: Served, model_id: str) -> int:
    dep = next(d for d in served.ctl.deployments() if d.model_id == model_id)
    return int(dep.endpoint.rsplit(":", 1)[1].split("/")[0])


def test_streamed_chat_passes_through_with_usage_and_the_request_reaches_the_engine(proxied):
    proxied.ctl.apply("fakevllm", TINY_ID, GPU)
    stream = proxied.client.chat.completions.create(
        model=TINY_ID, stream=True, stream_options={"include_usage": True}, max_completion_tokens=3,
        temperature=0.2, messages=[{"role": "user", "content": "hello big wide world"}])
    text, finishes, usage = "", [], None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert text == "echo: hello big" and finishes == ["length"]
    assert usage.completion_tokens == 3
    sent = last_request(port_of(proxied, TINY_ID))
    assert sent["model"] == TINY_ID and sent["max_completion_tokens"] == 3 and sent["temperature"] == 0.2
    assert sent["stream_options"] == {"include_usage": True}


def test_tool_call_from_the_engine_reaches_the_client_as_tool_call_deltas(proxied):
    proxied.ctl.apply("fakevllm", TINY_ID, GPU)
    stream = proxied.client.chat.completions.create(
        model=TINY_ID, stream=True, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False,
        messages=[{"role": "user", "content": 'call read_file {"path": "a.py"}'}])
    name, args, finishes = "", "", []
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or ():
                name += tc.function.name or ""
                args += tc.function.arguments or ""
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert (name, json.loads(args), finishes) == ("read_file", {"path": "a.py"}, ["tool_calls"])
    sent = last_request(port_of(proxied, TINY_ID))
    assert sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is False and sent["tools"] == TOOLS


def test_non_streamed_chat_and_completions_pass_through(proxied):
    proxied.ctl.apply("fakevllm", TINY_ID, GPU)
    r = proxied.client.chat.completions.create(model=TINY_ID, messages=[{"role": "user", "content": "a b"}])
    assert r.choices[0].message.content == "echo: a b"
    r = proxied.client.completions.create(model=TINY_ID, prompt="x y z", max_tokens=2)
    assert r.choices[0].text == "z y" and r.choices[0].finish_reason == "length"


def test_request_for_another_model_starts_its_container_on_demand(proxied):
    proxied.ctl.apply("fakevllm", TINY_ID, GPU)
    with httpx.stream("POST", proxied.base_url + "/chat/completions", json={
        "model": TINY_UNTIED_ID, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            timeout=60) as r:
        assert r.status_code == 200 and r.headers["x-accel-buffering"] == "no"
        lines = [line for line in r.iter_lines() if line]
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                   for line in lines if line.startswith("data: {"))
    assert text == "echo: hi" and lines[-1] == "data: [DONE]"
    assert [d.model_id for d in proxied.ctl.deployments()] == [TINY_UNTIED_ID]


def test_emergency_clear_during_a_proxied_stream_ends_it_with_an_error(proxied, docker_client,
                                                                         fake_vllm_image):
    proxied.backend.image = fake_vllm_image.rsplit(":", 1)[0] + ":slow-tokens"  # 0.2 s per token
    proxied.ctl.apply("fakevllm", TINY_ID, GPU)
    stream = proxied.client.chat.completions.create(
        model=TINY_ID, stream=True, messages=[{"role": "user", "content": " ".join(["w"] * 40)}])
    got, clearing = "", None
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            got += chunk.choices[0].delta.content or "" if chunk.choices else ""
            if got and clearing is None:
                clearing = threading.Thread(target=proxied.ctl.emergency_clear, daemon=True)
                clearing.start()
    clearing.join(20)
    assert got.startswith("echo:") and got.count("w") < 40  # cut off mid-answer: not all 40 words echoed
    assert "generation stopped" in str(err.value.message)
    assert proxied.ctl.deployments() == []


# --------------------------------------------------------------------------- the real vLLM backend
@pytest.fixture
def proxied_vllm(vllm_settings, hf_cache, tmp_path, user_network) -> Iterator[tuple]:
    """The server over the real vLLM backend (backends/vllm) starting the fake image on a bridge network."""
    from memory_controller import MemoryController
    from server.openai_api import OpenAIService
    from tests.fake_pynvml import scenario
    from tests.fixtures_docker import with_changes
    from tests.test_openai_api import start_uvicorn

    settings = with_changes(vllm_settings, hf_cache_dir=hf_cache, state_dir=tmp_path / "state",
                            vllm_network=user_network,
                            backends={"vllm": vllm_settings.backends["vllm"].model_dump()})  # vLLM alone, its options kept
    ctl = MemoryController(settings, nvml=scenario("one_gpu").module())
    service = OpenAIService(ctl, settings)
    from fastapi import FastAPI

    app = FastAPI()
    app.include_router(service.router)
    server, thread, port = start_uvicorn(app)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
    try:
        yield ctl, client, settings
    finally:
        client.close()
        server.should_exit = True
        thread.join(10)
        ctl.emergency_clear()


VLLM_GPU = Profile(mode="vllm", precision=Precision.FP16, context_tokens=512, batch=2, device="cuda", gpu_ids=(0,))


def _tool_call_roundtrip(ctl, client, settings) -> None:
    stream = client.chat.completions.create(
        model=TINY_ID, stream=True, tools=TOOLS, tool_choice="auto",
        messages=[{"role": "user", "content": 'call read_file {"path": "b.py"}'}])
    name, args = "", ""
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or ():
                name += tc.function.name or ""
                args += tc.function.arguments or ""
    assert (name, json.loads(args)) == ("read_file", {"path": "b.py"})
    (dep,) = ctl.deployments()
    assert dep.backend_id == "vllm" and dep.model_id == TINY_ID and dep.endpoint
    sent = last_request(settings.vllm_port)
    assert sent["tools"] == TOOLS


def test_tool_call_streamed_back_through_the_real_vllm_backend(proxied_vllm):
    ctl, client, settings = proxied_vllm
    ctl.apply("vllm", TINY_ID, VLLM_GPU)
    _tool_call_roundtrip(ctl, client, settings)


def test_on_demand_load_through_the_real_vllm_backend(proxied_vllm):
    ctl, client, settings = proxied_vllm
    _tool_call_roundtrip(ctl, client, settings)
