"""IDE settings: what Roo Code's Import and Continue's config.yaml loader need, with the served context."""

from __future__ import annotations

import json

import pytest
import yaml

from memory_controller.ide import (
    aider_metadata,
    aider_settings,
    continue_config,
    kilo_config,
    max_output_tokens,
    roo_settings,
)

URL = "http://127.0.0.1:8765/v1"


@pytest.mark.parametrize(
    ("window", "want"),
    [(1, 1), (4, 1), (5, 1), (512, 102), (2048, 409), (32768, 6553), (40960, 8192), (40965, 8192),
     (131072, 8192)],
)
def test_max_output_tokens_is_at_most_a_fifth_of_the_window_and_8192(window, want):
    assert max_output_tokens(window) == want
    assert max_output_tokens(window) <= max(1, window // 5)


def test_max_output_tokens_refuses_an_empty_window():
    with pytest.raises(ValueError, match="at least 1"):
        max_output_tokens(0)


def test_roo_settings_has_what_roo_import_validates():
    data = json.loads(json.dumps(roo_settings(URL, "Qwen/Qwen2.5-Coder-7B-Instruct", 32768)))
    profiles = data["providerProfiles"]
    name = profiles["currentApiConfigName"]
    assert isinstance(name, str) and name
    cfg = profiles["apiConfigs"][name]
    assert cfg["apiProvider"] == "openai"
    assert cfg["openAiBaseUrl"] == URL
    assert cfg["openAiModelId"] == "Qwen/Qwen2.5-Coder-7B-Instruct"
    assert isinstance(cfg["openAiApiKey"], str) and cfg["openAiApiKey"]
    info = cfg["openAiCustomModelInfo"]
    assert info["contextWindow"] == 32768
    assert info["maxTokens"] == max_output_tokens(32768) <= 0.2 * 32768
    # required by Roo's model info schema
    assert isinstance(info["supportsPromptCache"], bool)
    assert info["supportsImages"] is False
    # Roo's prompt budget stays positive
    assert info["contextWindow"] * 0.9 - info["maxTokens"] > 0


def test_roo_settings_carries_the_key_when_given():
    cfg = roo_settings(URL, "m", 4096, api_key="sk-local")["providerProfiles"]["apiConfigs"]["memctl"]
    assert cfg["openAiApiKey"] == "sk-local"


def test_continue_config_parses_and_carries_the_served_context():
    text = continue_config(URL, 'org/we:ird "name"', 20480, api_key="k#1: x")
    data = yaml.safe_load(text)
    assert data["name"] and data["version"]
    (model,) = data["models"]
    assert model["provider"] == "openai"
    assert model["model"] == 'org/we:ird "name"'
    assert model["apiBase"] == URL
    assert model["apiKey"] == "k#1: x"
    assert model["roles"] == ["chat", "edit", "apply", "autocomplete"]
    assert model["defaultCompletionOptions"] == {"contextLength": 20480, "maxTokens": max_output_tokens(20480)}


def test_continue_config_without_key_has_no_key():
    model = yaml.safe_load(continue_config(URL, "m", 4096))["models"][0]
    assert "apiKey" not in model


@pytest.mark.parametrize(("url", "model", "window"), [("127.0.0.1:8765", "m", 10), (URL, "", 10), (URL, "m", 0)])
def test_bad_input_is_refused(url, model, window):
    with pytest.raises(ValueError):
        roo_settings(url, model, window)
    with pytest.raises(ValueError):
        continue_config(url, model, window)


def test_continue_config_declares_tool_use_only_where_tools_are_parsed():
    with_tools = yaml.safe_load(continue_config(URL, "m", 32768, tools=True))["models"][0]
    assert with_tools["capabilities"] == ["tool_use"]
    assert "capabilities" not in yaml.safe_load(continue_config(URL, "m", 32768))["models"][0]


def test_kilo_config_is_an_openai_compatible_provider_with_limits_and_tool_call_per_model():
    cfg = kilo_config(URL, [("org/a", 65536, True), ("org/b:x", 4096, False)], api_key=None)
    json.loads(json.dumps(cfg))  # plain JSON
    provider = cfg["provider"]["memctl"]
    assert provider["npm"] == "@ai-sdk/openai-compatible" and provider["options"]["baseURL"] == URL
    a, b = provider["models"]["org/a"], provider["models"]["org/b:x"]
    assert a["limit"] == {"context": 65536, "output": max_output_tokens(65536)} and a["tool_call"] is True
    assert b["tool_call"] is False and b["limit"]["context"] + 0 >= b["limit"]["output"] * 5
    assert cfg["model"] == "memctl/org/a"
    with pytest.raises(ValueError):
        kilo_config(URL, [])


def test_aider_files_carry_the_served_context_and_a_max_tokens():
    meta = aider_metadata("org/m", 32768)["openai/org/m"]
    out = max_output_tokens(32768)
    assert meta["max_input_tokens"] + meta["max_output_tokens"] == 32768 and meta["max_tokens"] == out
    (entry,) = yaml.safe_load(aider_settings("org/m", 32768))
    assert entry["name"] == "openai/org/m" and entry["extra_params"] == {"max_tokens": out}


def test_tool_support_is_read_from_the_template_files_alone(tmp_path):
    import os

    from backends.transformers.checks import template_renders_tools

    assert template_renders_tools(tmp_path) is None  # no template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert template_renders_tools(tmp_path) is False
    (tmp_path / "chat_template.jinja").write_text("{% if tools %}{{ tools | tojson }}{% endif %}{{ messages }}")
    assert template_renders_tools(tmp_path) is True
    (tmp_path / "chat_template.jinja").unlink()
    os.mkfifo(tmp_path / "chat_template.jinja")  # never opened: it would block
    assert template_renders_tools(tmp_path) is False
def test_small_window_advice_fits_the_cause():
    """Issue 20.6: at the model's own maximum more memory would not help; below it, memory is the cause."""
    from memory_controller.ide import small_window_advice

    assert small_window_advice(32768, 32768, 2048) is None
    assert small_window_advice(2048, 32768, 2048).code == "ide.window_model_max"
    assert small_window_advice(4096, 32768, 131072).code == "ide.window_memory"
    assert small_window_advice(4096, 32768, None).code == "ide.window_memory"
