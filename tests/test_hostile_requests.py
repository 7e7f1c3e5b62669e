"""Bad requests against the OpenAI-compatible API (real uvicorn, real controller, in-memory backend): each is a
400 naming the field and what to send instead; no traceback reaches the log; the model keeps serving."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from tests.fixtures_models import TINY_ID
from tests.test_openai_api import DEAD_DOCKER, Served, _serve

TOOL = {"type": "function", "function": {"name": "read_file", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def served(hf_settings, tmp_path) -> Iterator[Served]:
    settings = hf_settings.model_copy(update={"state_dir": tmp_path / "state", "docker_host": DEAD_DOCKER,
                                              "serve_heartbeat_s": 0.1, "host_memory_budget_bytes": 4096})
    yield from _serve(settings)


def _chat(**fields) -> dict:
    return {"model": TINY_ID, "messages": USER, "max_tokens": 2, **fields}


# (body, the field the answer must name, words of the fix)
CHAT_CASES = [
    (_chat(seed=2**64), "seed", "less than or equal"),
    (_chat(seed=-(2**70)), "seed", "greater than or equal"),
    (_chat(max_tokens="10"), "max_tokens", "integer"),
    (_chat(stream="yes"), "stream", "boolean"),
    (_chat(temperature="0.5"), "temperature", "number"),
    (_chat(stream_options={"include_usage": "true"}), "stream_options.include_usage", "boolean"),
    (_chat(tools=[TOOL], tool_choice="sometimes"), "tool_choice", "'none', 'auto', 'required'"),
    (_chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "write_file"}}), "tool_choice",
     "not among the tools (read_file)"),
    (_chat(tool_choice={"type": "function", "function": {"name": "read_file"}}), "tool_choice", "none were sent"),
    (_chat(tool_choice="required"), "tool_choice", "needs tools"),
    (_chat(tools=[], tool_choice="required"), "tool_choice", "needs tools"),
    (_chat(tool_choice={"type": "function"}), "tool_choice", "must name a function"),
    (_chat(messages=[*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]},
        {"role": "tool", "content": "file"}]), "messages[2].tool_call_id", "which call it answers"),
    (_chat(messages=[*USER, {"role": "tool", "tool_call_id": 7, "content": "x"}]), "messages[1].tool_call_id",
     "which call"),
    (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "a string"}}]),
     "tools[0].function.parameters", "JSON Schema object"),
    (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]),
     "tools[0].function.parameters", "JSON Schema object"),
    (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": [1, 2]}}]),
     "tools[0].function.parameters", "JSON Schema object"),
    (_chat(tools=[{"type": "retrieval"}]), "tools[0]", "only function tools"),
    (_chat(tools=[{"type": "function", "function": {"parameters": {}}}]), "tools[0].function.name", "needs a name"),
    (_chat(logprobs=True), "logprobs", "not implemented"),
    (_chat(top_logprobs=5), "top_logprobs", "not implemented"),
    (_chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}), "response_format",
     "not implemented"),
    (_chat(response_format={"type": "json_object"}), "response_format", "not implemented"),
    (_chat(response_format="json"), "response_format", '{"type": "text"}'),
]

COMPLETION_CASES = [
    ({"model": TINY_ID, "prompt": "def f(", "suffix": "return 1"}, "suffix", "not implemented"),
    ({"model": TINY_ID, "prompt": "x", "echo": True}, "echo", "not implemented"),
    ({"model": TINY_ID, "prompt": "x", "best_of": 3}, "best_of", "not implemented"),
    ({"model": TINY_ID, "prompt": "x", "logprobs": 2}, "logprobs", "not implemented"),
    ({"model": TINY_ID, "prompt": "x", "max_tokens": "10"}, "max_tokens", "integer"),
    ({"model": TINY_ID, "prompt": "x", "seed": 2**64}, "seed", "less than or equal"),
]


def _check(served: Served, path: str, body: bytes, field: str, fix: str, caplog) -> None:
    with caplog.at_level(logging.INFO):
        r = httpx.post(served.base_url + path, content=body, headers={"Content-Type": "application/json"},
                       timeout=60)
    assert r.status_code == 400, (field, r.text[:300])
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert field in err["message"] and fix in err["message"], err["message"]
    assert "Traceback" not in caplog.text and "unexpected error" not in caplog.text
    assert served.running() == []  # nothing was loaded for a refused request


def test_bad_chat_fields_are_400s_naming_the_field(served, caplog):
    for body, field, fix in CHAT_CASES:
        _check(served, "/chat/completions", json.dumps(body).encode(), field, fix, caplog)
    ok = served.client.chat.completions.create(model=TINY_ID, messages=USER, max_tokens=2, seed=2**63 - 1)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_bad_completion_fields_are_400s_naming_the_field(served, caplog):
    for body, field, fix in COMPLETION_CASES:
        _check(served, "/completions", json.dumps(body).encode(), field, fix, caplog)
    ok = served.client.completions.create(model=TINY_ID, prompt="x", max_tokens=2, echo=False, logprobs=None)
    assert ok.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("raw,field", [
    (f'{{"model": "{TINY_ID}", "messages": [{{"role": "user", "content": "a\\ud800b"}}]}}', "messages[0].content"),
    (f'{{"model": "{TINY_ID}", "messages": [{{"role": "user", "content": [{{"type": "text", "text": "\\udfff"}}]}}]}}',
     "messages[0].content[0].text"),
    (f'{{"model": "{TINY_ID}", "messages": [{{"role": "user", "content": "x"}}], "stop": ["\\ud83d"]}}', "stop[0]"),
    (f'{{"model": "{TINY_ID}", "messages": [{{"role": "user", "content": "x"}}], "tools": [{{"type": "function", "function": '
     '{"name": "f\\udc00", "parameters": {"type": "object"}}}]}', "tools[0].function.name"),
])
def test_lone_surrogates_are_400s_naming_where(served, caplog, raw, field):
    _check(served, "/chat/completions", raw.encode(), field, "lone UTF-16 surrogate", caplog)


@pytest.mark.parametrize("where", ["content", "arguments", "parameters"])
def test_deep_nesting_is_a_400_without_the_http_layer(served, caplog, where):
    """The service alone (no middleware in front, as the tests' app is built) still refuses deep bodies."""
    deep = "[" * 5000 + "]" * 5000
    if where == "content":
        raw = f'{{"model": "{TINY_ID}", "messages": [{{"role": "user", "content": {deep}}}]}}'
    elif where == "arguments":
        raw = (f'{{"model": "{TINY_ID}", "messages": [{{"role": "user", "content": "x"}}, {{"role": "assistant", "tool_calls": '
               f'[{{"id": "a", "type": "function", "function": {{"name": "f", "arguments": {deep}}}}}]}}]}}')
    else:
        raw = (f'{{"model": "{TINY_ID}", "messages": [{{"role": "user", "content": "x"}}], "tools": [{{"type": "function", '
               f'"function": {{"name": "f", "parameters": {{"type": "object", "properties": {deep}}}}}}}]}}')
    _check(served, "/chat/completions", raw.encode(), "nested deeper", "flatter", caplog)
