"""IDE settings: what Roo Code's Import and Continue's config.yaml loader need, with the served context."""

from __future__ import annotations

import json

import pytest
import yaml

from memory_controller.ide import continue_config, max_output_tokens, roo_settings

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


def test_small_window_advice_fits_the_cause():
    """Issue 20.6: at the model's own maximum more memory would not help; below it, memory is the cause."""
    from memory_controller.ide import small_window_advice

    assert small_window_advice(32768, 32768, 2048) is None
    assert small_window_advice(2048, 32768, 2048).code == "ide.window_model_max"
    assert small_window_advice(4096, 32768, 131072).code == "ide.window_memory"
    assert small_window_advice(4096, 32768, None).code == "ide.window_memory"
