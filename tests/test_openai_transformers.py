"""The server on the real Transformers backend (CPU) with tiny chat models of the three tool-call families
(tests/model_factory.build_chat_cache: real chat templates with tools, random weights).

Random weights write no real tool call, so this checks what the backend decides: the prompt is templated
with the tools and the history (assistant tool calls, tool results) for each family, token counts and
the context guard use the real tokenizer, streaming ends with usage, and every request gets an answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests import model_factory as mf
from tests.test_openai_api import TOOLS, Served, _serve

if not hasattr(mf, "build_chat_cache"):
    pytest.skip("tests/model_factory.build_chat_cache (tiny chat models of the three families) is not here yet",
                allow_module_level=True)

FAMILIES = ("qwen", "llama3", "mistral")


PLAIN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _plain_chat_model(hub) -> str:
    """A chat model whose template ignores ``tools`` (as many base-model templates do)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(dir=hub.parent) as tmp:
        out = mf.build_chat_model(Path(tmp), "qwen", seed=30)
        jinja = Path(tmp) / "chat_template.jinja"
        if jinja.exists():
            jinja.write_text(PLAIN_TEMPLATE)
        cfg_path = Path(tmp) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        if "chat_template" in cfg:
            cfg["chat_template"] = PLAIN_TEMPLATE
            cfg_path.write_text(json.dumps(cfg))
        del out
        mf.add_to_hf_cache(Path(tmp), hub, f"{mf.TEST_ORG}/tiny-plain-chat")
    return f"{mf.TEST_ORG}/tiny-plain-chat"


@pytest.fixture(scope="module")
def chat_hub(tmp_path_factory) -> tuple:
    hub = tmp_path_factory.mktemp("hf_chat") / "hub"
    ids = mf.build_chat_cache(hub)
    ids["plain"] = _plain_chat_model(hub)
    return hub, ids


@pytest.fixture
def served_tf(chat_hub, tmp_path) -> Iterator[Served]:
    from backends.transformers import create
    from memory_controller.settings import load_settings

    hub, _ = chat_hub
    settings = load_settings(hf_cache_dir=hub, local_model_dirs=[]).model_copy(update={
        "state_dir": tmp_path / "state", "docker_host": "unix:///nonexistent.sock", "serve_heartbeat_s": 0.2})

    def make(s, ledger):  # noqa: ARG001 - the real backend measures memory itself
        return create(s, None)

    yield from _serve(settings, gpu_total_bytes=None, make_backend=make)  # CPU only


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_chat_with_tools_and_tool_history_on_each_family(served_tf, chat_hub, family):
    model = chat_hub[1][family]
    messages = [
        {"role": "system", "content": "You are a coding assistant."},
        {"role": "user", "content": "Read the file."},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "abcDEF123", "type": "function", "function": {
            "name": "read_file", "arguments": json.dumps({"path": "src/main.py"})}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "def main(): pass"},
        {"role": "user", "content": "List the functions."},
    ]
    stream = served_tf.client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, tool_choice="auto", parallel_tool_calls=True,
        max_completion_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True})
    finishes, usage = [], None
    for chunk in stream:
        usage = chunk.usage or usage
        finishes += [c.finish_reason for c in chunk.choices if c.finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length", "tool_calls")
    assert usage is not None and 0 < usage.completion_tokens <= 8
    # the tools are in the prompt: it is longer than without them
    r = served_tf.client.chat.completions.create(model=model, messages=messages, max_completion_tokens=1)
    assert usage.prompt_tokens > r.usage.prompt_tokens


def test_context_guard_counts_with_the_real_tokenizer(served_tf, chat_hub):
    model = chat_hub[1]["qwen"]
    dep = served_tf.ctl.ensure_deployment(model)
    ctx = dep.context_tokens
    with pytest.raises(openai.BadRequestError) as err:
        served_tf.client.chat.completions.create(model=model, max_tokens=ctx,
                                                 messages=[{"role": "user", "content": "hello"}])
    assert str(ctx) in err.value.body["message"]


def test_completions_for_autocomplete(served_tf, chat_hub):
    model = chat_hub[1]["llama3"]
    r = httpx.post(served_tf.base_url + "/completions", json={"model": model, "prompt": "def add(a, b):",
                                                              "max_tokens": 5, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] <= 5


def test_tools_for_a_template_that_ignores_them_are_refused_before_loading(served_tf, chat_hub):
    plain, qwen = chat_hub[1]["plain"], chat_hub[1]["qwen"]
    with pytest.raises(openai.BadRequestError) as err:
        served_tf.client.chat.completions.create(model=plain, messages=[{"role": "user", "content": "hi"}],
                                                 tools=TOOLS, max_tokens=2)
    assert err.value.body["code"] == "tools_not_supported" and plain in err.value.body["message"]
    assert served_tf.running() == []
    listed = {m["id"]: m for m in httpx.get(served_tf.base_url + "/models", timeout=60).json()["data"]}
    assert listed[plain]["memctl"]["tools"] is False and listed[qwen]["memctl"]["tools"] is True
    r = served_tf.client.chat.completions.create(model=plain, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=2)  # without tools it is served
    assert r.usage.completion_tokens <= 2


def test_an_over_context_request_is_refused_with_the_real_tokenizer_before_loading(served_tf, chat_hub):
    qwen = chat_hub[1]["qwen"]
    ctx = served_tf.ctl.plan(served_tf.ctl.serving_backend_id(), qwen, purpose="ide").profile.context_tokens
    with pytest.raises(openai.BadRequestError) as err:
        served_tf.client.chat.completions.create(model=qwen, stream=True, max_tokens=1,
                                                 messages=[{"role": "user", "content": "hi " * ctx}])
    assert err.value.body["code"] == "context_length_exceeded" and str(ctx) in err.value.body["message"]
    assert served_tf.running() == []
