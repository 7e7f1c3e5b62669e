"""What real coding agents hit against memctl (issue: serve real coding agents), through a real uvicorn and the
official ``openai`` client or raw httpx, as the agents send it: no ``max_tokens`` (aider), over-context
requests for a model that is not loaded (Kilo), retries after an emergency clear (Continue), tools for a
template that does not render them, broken model files, a budget that fits nothing, and the statuses their
retry policies read."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from memory_controller.scheduler import DEFAULT_MAX_OUTPUT_TOKENS
from memory_controller.types import Precision, Profile
from tests import model_factory as mf
from tests.fixtures_models import TINY_ID, TINY_UNTIED_ID
from tests.test_openai_api import DEAD_DOCKER, TOOLS, _serve

USER = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def agent_settings(hf_settings, tmp_path):
    return hf_settings.model_copy(update={"state_dir": tmp_path / "state", "docker_host": DEAD_DOCKER,
                                          "serve_heartbeat_s": 0.1, "host_memory_budget_bytes": 4096})


@pytest.fixture
def srv(agent_settings):
    yield from _serve(agent_settings)


def _apply(srv, model: str, context: int) -> None:
    srv.ctl.apply("inmem", model, Profile(mode="inmem", precision=Precision.NF4, context_tokens=context,
                                             batch=1, device="cuda"))


def _wait(cond, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# --------------------------------------------------------------------------- 1. no max_tokens
def test_a_request_without_max_tokens_on_a_64k_context_streams_an_answer(agent_settings, tmp_path):
    """aider sends no max_tokens: the answer may take what the context leaves, capped by the default."""
    hub = tmp_path / "hub"
    mf.build_into_cache(hub, "long-llama", mf.LlamaShape(max_position_embeddings=65536))
    model = f"{mf.TEST_ORG}/long-llama"
    for s in _serve(agent_settings.model_copy(update={"hf_cache_dir": hub})):
        _apply(s, model, 65536)
        stream = s.client.chat.completions.create(model=model, messages=USER, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == "echo: hello there"
        asked = s.backend.requests[-1].max_new_tokens
        assert asked == DEFAULT_MAX_OUTPUT_TOKENS  # not 65536 minus the prompt: never out of a backend's range
        r = s.client.chat.completions.create(model=model, messages=USER)  # not streamed: the same
        assert r.choices[0].message.content == "echo: hello there"


def test_without_max_tokens_a_short_context_gives_the_answer_what_it_leaves(srv):
    _apply(srv, TINY_ID, 2048)
    srv.client.chat.completions.create(model=TINY_ID, messages=USER)
    asked = srv.backend.requests[-1]
    assert asked.max_new_tokens == 2048 - srv.backend.prompt_tokens(None, asked)


# --------------------------------------------------------------------------- 2. admission before loading
def test_an_over_context_request_for_a_model_not_loaded_is_400_and_nothing_is_loaded_or_evicted(srv):
    _apply(srv, TINY_ID, 2048)
    starts, history = srv.backend.starts, len(srv.ctl.history(100))
    long_prompt = [{"role": "user", "content": "w " * 200_000}]
    for stream in (True, False):
        with pytest.raises(openai.BadRequestError) as err:
            srv.client.chat.completions.create(model=TINY_UNTIED_ID, messages=long_prompt, stream=stream)
        assert err.value.body["code"] == "context_length_exceeded"
        assert "context of" in err.value.body["message"]
    assert srv.running() == [TINY_ID]  # what the IDE used is still there
    assert srv.backend.starts == starts and len(srv.ctl.history(100)) == history
    # the same request for the loaded model: the same status and code
    with pytest.raises(openai.BadRequestError) as err:
        srv.client.chat.completions.create(model=TINY_ID, messages=long_prompt, stream=True)
    assert err.value.body["code"] == "context_length_exceeded"


def test_a_refused_streamed_request_is_plain_json_not_an_event_stream(srv):
    """Kilo compacts only on a real 400; a 200 with an error event is printed raw."""
    _apply(srv, TINY_ID, 2048)
    r = httpx.post(srv.base_url + "/chat/completions", timeout=30, json={
        "model": TINY_UNTIED_ID, "stream": True, "messages": [{"role": "user", "content": "w " * 200_000}]})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "context_length_exceeded"


# --------------------------------------------------------------------------- 3. the pause
def test_after_an_emergency_clear_a_retry_does_not_load_the_model_until_the_user_resumes(srv):
    srv.ctl.ensure_deployment(TINY_ID)
    srv.ctl.emergency_clear()
    starts = srv.backend.starts
    r = httpx.post(srv.base_url + "/chat/completions", timeout=30,
                   json={"model": TINY_ID, "messages": USER, "stream": True})
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
    body = r.json()["error"]
    assert body["code"] == "serving_paused" and "memctl serve resume" in body["message"]
    assert srv.running() == [] and srv.backend.starts == starts
    assert srv.ctl.serving_pause()["reason"] == "emergency_clear"
    listed = {m["id"]: m for m in httpx.get(srv.base_url + "/models", timeout=30).json()["data"]}
    assert listed[TINY_ID]["memctl"]["paused"]["reason"] == "emergency_clear"

    assert srv.ctl.resume_serving() is True
    r = srv.client.chat.completions.create(model=TINY_ID, messages=USER)
    assert r.choices[0].message.content == "echo: hello there" and srv.running() == [TINY_ID]


def test_an_explicit_unload_pauses_that_model_until_the_user_loads_one(srv):
    srv.ctl.ensure_deployment(TINY_ID)
    srv.ctl.unload(TINY_ID)
    with pytest.raises(openai.InternalServerError) as err:  # max_retries=0: the 503 itself
        srv.client.chat.completions.create(model=TINY_ID, messages=USER)
    assert err.value.status_code == 503 and err.value.body["code"] == "serving_paused"
    assert srv.running() == []
    srv.ctl.ensure_deployment(TINY_UNTIED_ID)  # the user loads a model: the pause is over
    assert srv.ctl.serving_pause() is None
    r = srv.client.chat.completions.create(model=TINY_ID, messages=USER)
    assert r.choices[0].message.content == "echo: hello there"


def test_requests_queued_behind_a_stream_get_the_pause_not_404_when_it_is_cleared(srv):
    srv.ctl.ensure_deployment(TINY_ID)
    srv.backend.token_delay_s = 0.2
    results: list[httpx.Response] = []

    def ask() -> None:
        results.append(httpx.post(srv.base_url + "/chat/completions", timeout=30,
                                  json={"model": TINY_ID, "messages": [{"role": "user", "content": "w " * 50}]}))
    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    assert _wait(lambda: srv.service.status().get(TINY_ID, {}).get("queued", 0) >= 2)
    srv.ctl.emergency_clear()
    for t in threads:
        t.join(30)
    assert sorted(r.status_code for r in results) == [503, 503, 503]
    assert {r.json()["error"]["code"] for r in results} <= {"serving_paused", "generation_cancelled"}
    assert all("retry-after" in r.headers for r in results)
    assert srv.ctl.in_flight() == {} and srv.service.status() == {}


def test_a_non_streamed_client_that_goes_away_stops_its_generation(srv):
    srv.ctl.ensure_deployment(TINY_ID)
    srv.backend.token_delay_s = 0.2
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.base_url + "/chat/completions", timeout=0.5,
                   json={"model": TINY_ID, "messages": [{"role": "user", "content": "w " * 200}]})
    assert _wait(lambda: srv.ctl.in_flight() == {})  # long before the 40 s answer would have ended
    srv.backend.token_delay_s = 0
    r = srv.client.chat.completions.create(model=TINY_ID, messages=USER)  # its turn was given back
    assert r.choices[0].message.content == "echo: hello there"


# --------------------------------------------------------------------------- 4. tools
def test_tools_for_a_template_that_does_not_render_them_are_400_and_shown_in_models_and_status(srv):
    srv.backend.no_tools.add(TINY_UNTIED_ID)
    with pytest.raises(openai.BadRequestError) as err:
        srv.client.chat.completions.create(model=TINY_UNTIED_ID, messages=USER, tools=TOOLS)
    assert err.value.body["code"] == "tools_not_supported" and TINY_UNTIED_ID in err.value.body["message"]
    assert srv.running() == []  # refused before loading
    listed = {m["id"]: m for m in httpx.get(srv.base_url + "/models", timeout=30).json()["data"]}
    assert listed[TINY_UNTIED_ID]["memctl"]["tools"] is False and listed[TINY_ID]["memctl"]["tools"] is True
    srv.ctl.ensure_deployment(TINY_UNTIED_ID)
    with pytest.raises(openai.BadRequestError) as err:  # loaded: the same answer
        srv.client.chat.completions.create(model=TINY_UNTIED_ID, messages=USER, tools=TOOLS)
    assert err.value.body["code"] == "tools_not_supported"
    assert srv.service.status()[TINY_UNTIED_ID]["tools"] is False
    r = srv.client.chat.completions.create(model=TINY_UNTIED_ID, messages=USER, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.content == "echo: hello there"  # "none": the tools are not used


# --------------------------------------------------------------------------- 5. the truth about models
def test_a_model_with_truncated_weights_is_listed_broken_and_refused_with_the_fix(bad_settings, tmp_path):
    settings = bad_settings.model_copy(update={"state_dir": tmp_path / "state",
                                               "docker_host": "unix:///nonexistent/memctl.sock"})
    for s in _serve(settings):
        listed = {m["id"]: m for m in httpx.get(s.base_url + "/models", timeout=60).json()["data"]}
        truncated = next(m for k, m in listed.items() if k.endswith("/truncated"))
        assert truncated["memctl"]["state"] == "broken" and truncated["max_model_len"] is None
        assert "truncated" in truncated["memctl"]["reason"] and "download" in truncated["memctl"]["reason"]
        r = httpx.post(s.base_url + "/chat/completions", timeout=30,
                       json={"model": truncated["id"], "messages": USER})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "model_not_servable" and "download it again" in error["message"]
        assert s.running() == []


def test_with_a_budget_that_fits_nothing_no_model_is_listed_with_a_made_up_context(agent_settings):
    for s in _serve(agent_settings, gpu_total_bytes=24 * 1024**3):
        s.gpu.used_bytes = s.gpu.total_bytes  # nothing is free
        listed = httpx.get(s.base_url + "/models", timeout=60).json()["data"]
        assert listed and all(m["memctl"]["state"] == "does_not_fit" for m in listed)
        assert all(m["max_model_len"] is None and m["memctl"]["reason"] for m in listed)


# --------------------------------------------------------------------------- 6. retries
def test_statuses_tell_clients_what_a_retry_can_fix(srv):
    with pytest.raises(openai.NotFoundError):
        srv.client.chat.completions.create(model="nobody/nothing", messages=USER)
    srv.gpu.used_bytes = srv.gpu.total_bytes
    r = httpx.post(srv.base_url + "/chat/completions", timeout=30, json={"model": TINY_ID, "messages": USER})
    assert r.status_code == 422 and "retry-after" not in r.headers  # memory: waiting does not help
    srv.gpu.used_bytes = 1024**3
    srv.ctl.ensure_deployment(TINY_ID)
    srv.ctl.emergency_clear()
    r = httpx.post(srv.base_url + "/chat/completions", timeout=30, json={"model": TINY_ID, "messages": USER})
    assert r.status_code == 503 and r.headers["retry-after"].isdigit()  # the pause: it ends when the user acts


def test_a_load_failing_with_requests_queued_answers_each_with_the_cause_and_leaves_nothing_queued(srv):
    srv.backend.fail_on_start.add(TINY_UNTIED_ID)
    srv.backend.start_gate = gate = threading.Event()
    results: list[httpx.Response] = []

    def ask() -> None:
        results.append(httpx.post(srv.base_url + "/chat/completions", timeout=30,
                                  json={"model": TINY_UNTIED_ID, "messages": USER}))
    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    assert _wait(lambda: srv.service.status().get(TINY_UNTIED_ID, {}).get("queued") == 3)
    gate.set()  # the load fails now, with all three waiting on it
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [400, 400, 400]
    assert all("told to fail" in r.json()["error"]["message"] for r in results)
    assert srv.backend.starts == 0 and srv.ctl.in_flight() == {} and srv.service.status() == {}
    loads = [r for r in srv.ctl.history(10) if r.kind == "apply"]
    assert len(loads) == 1 and loads[0].params.get("on_demand") is True  # one load for the three requests
