"""The OpenAI-compatible API through the official ``openai`` client against a real uvicorn on 127.0.0.1.

The controller is the real MemoryController; its backend is the in-memory one (tests/inmemory_backend.py:
deterministic "echo" generation and Qwen-style tool calls, memory booked on the fake NVML GPU), so the
server's own behaviour is what is tested: streaming, limits, errors, tools, on-demand loads, idle unload,
emergency clear.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from memory_controller import MemoryController
from memory_controller.backend import DeploymentState
from memory_controller.types import Precision, Profile, msg
from server.openai_api import OpenAIService
from tests.fake_pynvml import FakeGpu, FakeNvml
from tests.fixtures_models import TINY_ID, TINY_UNTIED_ID
from tests.inmemory_backend import InMemoryBackend

GIB = 1024**3
DEAD_DOCKER = "unix:///nonexistent/memctl-test-docker.sock"
TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    ctl: MemoryController
    backend: InMemoryBackend
    service: OpenAIService
    gpu: FakeGpu
    base_url: str
    client: openai.OpenAI

    def running(self) -> list[str]:
        return [d.model_id for d in self.ctl.deployments() if d.state is DeploymentState.READY]


def start_uvicorn(app: FastAPI) -> tuple[uvicorn.Server, threading.Thread, int]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    return server, thread, port


def _serve(settings, gpu_total_bytes: int | None = 24 * GIB,
           make_backend: Callable[..., InMemoryBackend] = InMemoryBackend) -> Iterator[Served]:
    """A real uvicorn on 127.0.0.1 serving OpenAIService over a MemoryController whose one backend is
    ``make_backend(settings, ledger=...)``, on a fake 24 GiB GPU (``gpu_total_bytes=None``: no GPU)."""
    gpu = FakeGpu(total_bytes=gpu_total_bytes or GIB, used_bytes=1 * GIB)
    nvml = FakeNvml([gpu]) if gpu_total_bytes else FakeNvml(init_error="LibraryNotFound")

    def ledger(device_key: str, delta: int) -> None:
        if device_key.startswith("gpu"):
            gpu.used_bytes += delta

    backend = make_backend(settings, ledger=ledger)
    ctl = MemoryController(settings, nvml=nvml.module(), backends={backend.id: backend})
    service = OpenAIService(ctl, settings)
    app = FastAPI()
    app.include_router(service.router)
    server, thread, port = start_uvicorn(app)
    base = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=30)
    try:
        yield Served(ctl, backend, service, gpu, base, client)
    finally:
        client.close()
        service.close()
        server.should_exit = True
        thread.join(10)
        try:
            ctl.emergency_clear()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass


@pytest.fixture
def base_settings(hf_settings, tmp_path):
    return hf_settings.model_copy(update={"state_dir": tmp_path / "state", "docker_host": DEAD_DOCKER,
                                          "serve_heartbeat_s": 0.1, "host_memory_budget_bytes": 4096})


@pytest.fixture
def served(base_settings) -> Iterator[Served]:
    yield from _serve(base_settings)


def _stream_text(stream) -> tuple[str, list, object]:
    text, finishes, usage = "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if getattr(choice, "delta", None) is not None and choice.delta.content:
                text += choice.delta.content
            if getattr(choice, "text", None):
                text += choice.text
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return text, finishes, usage


# --------------------------------------------------------------------------- models
def test_models_lists_cached_models_with_the_context_they_would_get(served):
    models = {m.id: m for m in served.client.models.list().data}
    assert {TINY_ID, TINY_UNTIED_ID} <= set(models)
    tiny = models[TINY_ID].model_dump()
    plan = served.ctl.plan(served.ctl.serving_backend_id(), TINY_ID, purpose="ide")
    assert tiny["max_model_len"] == plan.profile.context_tokens > 0
    assert tiny["loaded"] is False

    served.ctl.ensure_deployment(TINY_ID)
    tiny = {m.id: m for m in served.client.models.list().data}[TINY_ID].model_dump()
    dep = next(d for d in served.ctl.deployments() if d.model_id == TINY_ID)
    assert tiny["loaded"] is True and tiny["max_model_len"] == dep.context_tokens


# --------------------------------------------------------------------------- chat
def test_streamed_chat_gives_the_answer_then_usage_then_done(served):
    served.ctl.ensure_deployment(TINY_ID)
    with httpx.stream("POST", served.base_url + "/chat/completions", json={
        "model": TINY_ID, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hello there"}]}, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["x-accel-buffering"] == "no"
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2].removeprefix("data: "))
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3

    text, finishes, use = _stream_text(served.client.chat.completions.create(
        model=TINY_ID, messages=[{"role": "user", "content": "hello there"}], stream=True,
        stream_options={"include_usage": True}))
    assert text == "echo: hello there"
    assert finishes == ["stop"]
    assert use.completion_tokens == 3 and use.prompt_tokens > 0
    assert use.total_tokens == use.prompt_tokens + use.completion_tokens


def test_non_streamed_chat_honours_max_completion_tokens_and_stop(served):
    served.ctl.ensure_deployment(TINY_ID)
    r = served.client.chat.completions.create(model=TINY_ID, max_completion_tokens=2,
                                              messages=[{"role": "user", "content": "one two three four"}])
    assert r.choices[0].message.content == "echo: one"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    r = served.client.chat.completions.create(model=TINY_ID, max_tokens=10, stop=[" three"],
                                              messages=[{"role": "user", "content": "one two three four"}])
    assert r.choices[0].message.content == "echo: one two"
    assert r.choices[0].finish_reason == "stop"


def test_legacy_completions_answer_streamed_and_not(served):
    served.ctl.ensure_deployment(TINY_ID)
    r = served.client.completions.create(model=TINY_ID, prompt="a b c", max_tokens=2)
    assert r.choices[0].text == " c b" and r.choices[0].finish_reason == "length"
    text, finishes, _ = _stream_text(served.client.completions.create(model=TINY_ID, prompt="a b c",
                                                                      max_tokens=5, stream=True))
    assert text == " c b a" and finishes == ["stop"]


# --------------------------------------------------------------------------- errors
def test_unknown_model_is_404_in_openai_shape(served):
    with pytest.raises(openai.NotFoundError) as err:
        served.client.chat.completions.create(model="nobody/nothing", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"
    assert "nobody/nothing" in err.value.body["message"]
    assert served.running() == []


def test_prompt_plus_output_over_the_served_context_is_400_naming_both_numbers(served):
    dep = served.ctl.ensure_deployment(TINY_ID)
    ctx = dep.context_tokens
    with pytest.raises(openai.BadRequestError) as err:
        served.client.chat.completions.create(model=TINY_ID, max_completion_tokens=ctx,
                                              messages=[{"role": "user", "content": "hello"}])
    body = err.value.body
    assert body["code"] == "context_length_exceeded"
    assert str(ctx) in body["message"] and str(ctx) + " requested" in body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # the prompt alone fills the context
        served.client.chat.completions.create(model=TINY_ID,
                                              messages=[{"role": "user", "content": "w " * (ctx + 5)}])
    assert f"context of {ctx} tokens" in err.value.body["message"]
    assert served.running() == [TINY_ID]  # nothing was loaded, stopped or broken


def test_bad_fields_are_400_naming_the_field(served):
    r = httpx.post(served.base_url + "/chat/completions", json={"model": TINY_ID, "messages": [],
                                                                "temperature": 9}, timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["param"] in ("messages", "temperature")
    r = httpx.post(served.base_url + "/chat/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_a_model_that_cannot_fit_is_a_4xx_clients_do_not_retry_with_needed_and_free_once(served):
    """Waiting does not free memory: not a 503 (ai-sdk, litellm and cn retry every 5xx whatever
    x-should-retry says), and the numbers are said once."""
    small = Profile(mode="inmem", precision=Precision.NF4, context_tokens=64, batch=1, device="cuda")
    served.ctl.apply("inmem", TINY_ID, small)
    served.gpu.used_bytes = served.gpu.total_bytes  # another program took the rest of the GPU
    with pytest.raises(openai.UnprocessableEntityError) as err:
        served.client.chat.completions.create(model=TINY_UNTIED_ID, messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 422
    body = err.value.body
    assert body["code"] == "insufficient_memory"
    assert "needs" in body["message"] and "free" in body["message"]
    assert body["message"].count(" needs ") == 1
    assert served.running() == [TINY_ID]


def test_on_demand_off_answers_409_and_loads_nothing(base_settings):
    for s in _serve(base_settings.model_copy(update={"serve_on_demand": False})):
        with pytest.raises(openai.ConflictError) as err:
            s.client.chat.completions.create(model=TINY_ID, messages=[{"role": "user", "content": "x"}])
        assert "serve_on_demand" in err.value.body["message"]
        assert s.running() == []


# --------------------------------------------------------------------------- tools
def test_tool_call_is_parsed_and_streamed_as_tool_call_deltas(served):
    served.ctl.ensure_deployment(TINY_ID)
    stream = served.client.chat.completions.create(
        model=TINY_ID, stream=True, tools=TOOLS, tool_choice="auto", parallel_tool_calls=True,
        messages=[{"role": "user", "content": 'call read_file {"path": "src/main.py"}'}])
    calls: dict[int, dict] = {}
    finishes, content = [], ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or ():
                entry = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": None})
                entry["id"] = entry["id"] or tc.id
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert finishes == ["tool_calls"]
    assert "<tool_call>" not in content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("read_file", {"path": "src/main.py"})]
    assert calls[0]["id"]

    # the call and its result go back into the history, and the conversation continues
    r = served.client.chat.completions.create(model=TINY_ID, tools=TOOLS, messages=[
        {"role": "user", "content": "read it"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": calls[0]["id"], "type": "function", "function": {"name": "read_file", "arguments": calls[0]["arguments"]}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "print('hi')"},
        {"role": "user", "content": "thanks"}])
    assert r.choices[0].message.content == "echo: thanks" and r.choices[0].finish_reason == "stop"


def test_tool_choice_none_returns_text(served):
    served.ctl.ensure_deployment(TINY_ID)
    r = served.client.chat.completions.create(model=TINY_ID, tools=TOOLS, tool_choice="none",
                                              messages=[{"role": "user", "content": 'call read_file {"path": "x"}'}])
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content.startswith("echo: call read_file")


class UnknownFamilyBackend(InMemoryBackend):
    def model_family(self, deployment):
        return None


def test_unknown_family_accepts_tools_and_returns_the_text(base_settings):
    for s in _serve(base_settings, make_backend=UnknownFamilyBackend):
        s.ctl.ensure_deployment(TINY_ID)
        assert s.service.status()[TINY_ID]["tools_parsed"] is False  # `memctl ps` says tools are not parsed
        text, finishes, _ = _stream_text(s.client.chat.completions.create(
            model=TINY_ID, tools=TOOLS, stream=True,
            messages=[{"role": "user", "content": 'call read_file {"path": "x"}'}]))
        assert "<tool_call>" in text and '"read_file"' in text
        assert finishes == ["stop"]


def test_status_names_the_tool_parser(served):
    served.ctl.ensure_deployment(TINY_ID)
    assert served.service.status()[TINY_ID] == {"in_flight": 0, "queued": 0, "leases": 0, "idle_unload_in_s": None,
                                                "tool_parser": "qwen", "tools_parsed": True, "tools": True}


# --------------------------------------------------------------------------- models on demand
def test_request_for_a_second_model_switches_to_it_with_heartbeats_while_it_loads(served):
    served.ctl.ensure_deployment(TINY_ID)
    served.backend.start_delay_s = 0.5  # heartbeat every 0.1 s
    with httpx.stream("POST", served.base_url + "/chat/completions", json={
        "model": TINY_UNTIED_ID, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            timeout=30) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    heartbeats = [line for line in lines if line.startswith(":")]
    assert len(heartbeats) >= 2 and "loading" in heartbeats[0]
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                   for line in lines if line.startswith("data: {"))
    assert text == "echo: hi"
    assert served.running() == [TINY_UNTIED_ID]


def test_requests_for_two_models_at_once_are_all_answered_in_order(served):
    served.backend.start_delay_s = 0.2
    served.backend.token_delay_s = 0.01
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int, model: str) -> None:
        try:
            r = served.client.chat.completions.create(model=model,
                                                      messages=[{"role": "user", "content": f"n{i}"}])
            results[i] = r.choices[0].message.content
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i, TINY_ID if i % 2 == 0 else TINY_UNTIED_ID)) for i in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(60)
    assert errors == []
    assert results == {i: f"echo: n{i}" for i in range(4)}
    assert served.backend.starts <= 4


# --------------------------------------------------------------------------- idle unload
def test_idle_model_is_unloaded_after_the_setting_and_never_while_a_request_runs(base_settings):
    for s in _serve(base_settings.model_copy(update={"serve_idle_unload_s": 0.6})):
        s.ctl.ensure_deployment(TINY_ID)
        s.backend.token_delay_s = 0.4  # a 3-token answer takes 1.2 s > the idle time
        r = s.client.chat.completions.create(model=TINY_ID, messages=[{"role": "user", "content": "a b"}])
        assert r.choices[0].message.content == "echo: a b"  # not cut by the idle timer
        status = s.service.status().get(TINY_ID)  # None: a loaded machine let the 0.6 s pass already
        assert status is None or (status["in_flight"] == 0 and status["idle_unload_in_s"] <= 0.6)
        deadline = time.monotonic() + 60  # a wait, not a bound: the unload is asserted, not its speed
        while s.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.running() == []
        assert s.ctl.history(1)[0].kind == "unload"

        # a model loaded elsewhere (the dashboard) and never asked for is unloaded too
        s.ctl.ensure_deployment(TINY_UNTIED_ID)
        assert s.service.status()[TINY_UNTIED_ID]["idle_unload_in_s"] is not None
        deadline = time.monotonic() + 5
        while s.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.running() == []


# --------------------------------------------------------------------------- emergency clear
def test_emergency_clear_during_a_stream_ends_it_with_a_clean_error(served):
    served.ctl.ensure_deployment(TINY_ID)
    served.backend.token_delay_s = 0.3
    stream = served.client.chat.completions.create(
        model=TINY_ID, stream=True, messages=[{"role": "user", "content": "one two three four five six"}])
    got, clearing = "", None
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            got += chunk.choices[0].delta.content or "" if chunk.choices else ""
            if "one" in got and clearing is None:
                clearing = threading.Thread(target=served.ctl.emergency_clear, daemon=True)
                clearing.start()
    clearing.join(10)
    assert "emergency clear" in str(err.value.message)
    assert got.startswith("echo:") and "six" not in got
    deadline = time.monotonic() + 5
    while served.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.running() == []
    assert served.service.status().get(TINY_ID, {"in_flight": 0})["in_flight"] == 0


def test_client_that_goes_away_stops_the_generation(served):
    served.ctl.ensure_deployment(TINY_ID)
    served.backend.token_delay_s = 0.2
    with httpx.stream("POST", served.base_url + "/chat/completions", json={
        "model": TINY_ID, "stream": True, "messages": [{"role": "user", "content": " ".join(["w"] * 50)}]},
            timeout=30) as r:
        for line in r.iter_lines():
            if "echo:" in line:
                break  # hang up
    deadline = time.monotonic() + 5
    while served.ctl.in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.ctl.in_flight() == {}
    # the model's FIFO turn was given back: the next request is answered at once
    served.backend.token_delay_s = 0
    r = served.client.chat.completions.create(model=TINY_ID, messages=[{"role": "user", "content": "ok"}])
    assert r.choices[0].message.content == "echo: ok"


# --------------------------------------------------------------------------- security
def test_beyond_loopback_v1_needs_the_bearer_key(base_settings):
    settings = base_settings.model_copy(update={"bind_address": "0.0.0.0", "allow_non_loopback_bind": True,
                                                "serve_api_key": __import__("pydantic").SecretStr("s3cret")})
    for s in _serve(settings):
        r = httpx.get(s.base_url + "/models", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "s3cret" not in r.text
        r = httpx.get(s.base_url + "/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert r.status_code == 401
        ok = openai.OpenAI(base_url=s.base_url, api_key="s3cret", max_retries=0)
        assert TINY_ID in {m.id for m in ok.models.list().data}


def test_close_ends_a_running_stream_with_an_error_event(served):
    served.ctl.ensure_deployment(TINY_ID)
    served.backend.token_delay_s = 0.3
    stream = served.client.chat.completions.create(
        model=TINY_ID, stream=True, messages=[{"role": "user", "content": "one two three four five six"}])
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            if chunk.choices and "echo" in (chunk.choices[0].delta.content or ""):
                served.service.close()
    assert "server is stopping" in str(err.value.message)
    deadline = time.monotonic() + 5
    while served.ctl.in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.ctl.in_flight() == {}


class _NoTokenizerBackend(InMemoryBackend):
    def check_model(self, model, profile):
        return (msg("model.no_tokenizer", f"{model.model_id} has no tokenizer files in its folder; download "
                    "the tokenizer too", model=model.model_id),)


def test_a_model_that_cannot_be_served_for_a_non_memory_reason_is_400_naming_it(base_settings):
    for s in _serve(base_settings, make_backend=_NoTokenizerBackend):
        with pytest.raises(openai.BadRequestError) as err:
            s.client.chat.completions.create(model=TINY_ID, messages=[{"role": "user", "content": "x"}])
        body = err.value.body
        assert err.value.status_code == 400
        assert body["code"] == "model_not_servable" and body["type"] == "invalid_request_error"
        assert "no tokenizer files" in body["message"] and "pick another cached model" in body["message"]
        assert s.running() == []
