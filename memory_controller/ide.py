"""IDE settings for the memctl server (pure): a Roo Code (and ZooCode) settings export, a Continue
config.yaml, Kilo Code's kilo.json and aider's model metadata and settings.

Each carries exactly the context the server enforces (``context_window``), the one output rule
:func:`max_output_tokens`, and tool use only where the server honours it (``tools``: the model's template
renders tools and its calls are parsed). Roo Code's "Import" validates the file with its own schema
(``providerProfiles``: ``currentApiConfigName`` + ``apiConfigs.<name>``; the model info needs
``contextWindow`` and ``supportsPromptCache``) and budgets ``contextWindow × 0.9 − maxTokens`` for the
prompt, with ``maxTokens`` at most 20% of the window.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .types import Message, msg

PROFILE_NAME = "memctl"
MAX_OUTPUT_FRACTION = 0.2  # Roo Code caps maxTokens at 20% of the window
MAX_OUTPUT_CAP_TOKENS = 8192  # beyond this a longer answer only takes room from the prompt


def max_output_tokens(context_window: int) -> int:
    """The largest answer an IDE is told to ask for: 20% of the window, at most 8192, at least 1.

    The one rule every IDE setting and the dashboard use, so prompt + answer stays within what the
    server enforces.
    """
    if context_window < 1:
        raise ValueError(f"context_window must be at least 1 token, got {context_window}")
    return max(1, min(int(context_window * MAX_OUTPUT_FRACTION), MAX_OUTPUT_CAP_TOKENS))


def model_max_positions(resolve: Callable[[str], Any] | None, model_id: str) -> int | None:
    """The model's own maximum context (``max_position_embeddings``), read through ``resolve`` (the catalog's);
    None when it cannot be read (no ``resolve``, as for a client of another process; an unreadable config)."""
    from .estimate import read_model_spec

    if resolve is None:
        return None
    try:
        return read_model_spec(resolve(model_id).path).max_position_embeddings
    except Exception:  # noqa: BLE001 - unknown: the advice then speaks of memory
        return None


def small_window_advice(window: int, minimum: int, model_max: int | None) -> Message | None:
    """What to do when the served window is below what an IDE assistant needs, fitting the cause:
    the model's own maximum (more memory would not help: pick a model with a longer context) or free
    memory (free some, or pick a smaller model). None when the window is large enough."""
    if window >= minimum:
        return None
    if model_max is not None and window >= model_max:
        return msg("ide.window_model_max",
                   f"the {window}-token context window is below the {minimum} tokens an IDE assistant needs, and it "
                   f"is the model's own maximum: more memory will not help; pick a model with a longer context",
                   window=window, minimum=minimum)
    return msg("ide.window_memory",
               f"the {window}-token context window is below the {minimum} tokens an IDE assistant needs: it may "
               "fail (\"Roo is having trouble\"); free memory, or pick a model that fits a longer context",
               window=window, minimum=minimum)


def _check(base_url: str, model_id: str, context_window: int) -> None:
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
    if not model_id:
        raise ValueError("model_id must not be empty")
    if context_window < 1:
        raise ValueError(f"context_window must be at least 1 token, got {context_window}")


def roo_settings(base_url: str, model_id: str, context_window: int, api_key: str | None = None) -> dict[str, Any]:
    """A Roo Code settings export (Settings → About → Import) with one "OpenAI Compatible" profile.

    ``base_url`` is the OpenAI base (``http://127.0.0.1:8765/v1``). Roo Code asks for a key even
    when the server needs none: a placeholder is written then. ``includeMaxTokens`` makes Roo send
    ``max_completion_tokens`` so the server's context check sees the real answer size.
    """
    _check(base_url, model_id, context_window)
    config: dict[str, Any] = {
        "id": "memctl-local",
        "apiProvider": "openai",
        "openAiBaseUrl": base_url,
        "openAiModelId": model_id,
        "openAiApiKey": api_key or "not-needed",
        "openAiStreamingEnabled": True,
        "includeMaxTokens": True,
        "openAiCustomModelInfo": {
            "contextWindow": context_window,
            "maxTokens": max_output_tokens(context_window),
            "supportsImages": False,
            "supportsPromptCache": False,
        },
    }
    return {"providerProfiles": {"currentApiConfigName": PROFILE_NAME, "apiConfigs": {PROFILE_NAME: config}}}


def continue_config(base_url: str, model_id: str, context_window: int, api_key: str | None = None, *,
                    tools: bool = False) -> str:
    """A Continue ``config.yaml`` with one model for chat, edit, apply and autocomplete; ``tools``: the server
    parses this model's tool calls, so Continue may use them (``capabilities: [tool_use]``, agent mode).

    Strings are written as JSON scalars (valid YAML), so no model id or URL can break the file.
    """
    _check(base_url, model_id, context_window)
    q = json.dumps
    lines = [
        f"name: {q('memctl')}",
        "version: 1.0.0",
        "schema: v1",
        "models:",
        f"  - name: {q('memctl ' + model_id)}",
        "    provider: openai",
        f"    model: {q(model_id)}",
        f"    apiBase: {q(base_url)}",
    ]
    if api_key:
        lines.append(f"    apiKey: {q(api_key)}")
    lines += [
        "    roles:",
        "      - chat",
        "      - edit",
        "      - apply",
        "      - autocomplete",
        "    defaultCompletionOptions:",
        f"      contextLength: {int(context_window)}",
        f"      maxTokens: {max_output_tokens(context_window)}",
    ]
    if tools:
        lines += ["    capabilities:", "      - tool_use"]
    return "\n".join(lines) + "\n"


KILO_PROVIDER = "memctl"


def kilo_config(base_url: str, models: list[tuple[str, int, bool]], api_key: str | None = None) -> dict[str, Any]:
    """Kilo Code's ``kilo.json`` (``./kilo.json`` or ``~/.config/kilo/kilo.json``): one
    ``@ai-sdk/openai-compatible`` provider at memctl's URL with each ``(model id, served context, tools)``.

    ``limit.context`` is the served context and ``limit.output`` the answer size that keeps prompt + answer
    within it (without it Kilo asks for 32,000 tokens); ``tool_call`` is true only where the server parses the
    model's tool calls. The first model is the default (``model: "memctl/<id>"``).
    """
    if not models:
        raise ValueError("kilo_config needs at least one model")
    entries: dict[str, Any] = {}
    for model_id, context_window, tools in models:
        _check(base_url, model_id, context_window)
        entries[model_id] = {"name": f"{model_id} (memctl)", "tool_call": bool(tools),
                             "limit": {"context": int(context_window), "output": max_output_tokens(context_window)}}
    return {
        "$schema": "https://app.kilo.ai/config.json",
        "provider": {KILO_PROVIDER: {
            "npm": "@ai-sdk/openai-compatible",
            "name": "memctl (local models)",
            "options": {"baseURL": base_url, "apiKey": api_key or "not-needed"},
            "models": entries,
        }},
        "model": f"{KILO_PROVIDER}/{models[0][0]}",
    }


def aider_model_name(model_id: str) -> str:
    """The name aider (litellm) knows the model by: ``openai/<id>`` at ``--openai-api-base``."""
    return f"openai/{model_id}"


def aider_metadata(model_id: str, context_window: int) -> dict[str, Any]:
    """aider's ``.aider.model.metadata.json`` (litellm's model-cost format) for the served context."""
    _check("http://x", model_id, context_window)
    out = max_output_tokens(context_window)
    return {aider_model_name(model_id): {
        "max_tokens": out, "max_input_tokens": int(context_window) - out, "max_output_tokens": out,
        "input_cost_per_token": 0.0, "output_cost_per_token": 0.0, "litellm_provider": "openai", "mode": "chat",
    }}


def aider_settings(model_id: str, context_window: int) -> str:
    """aider's ``.aider.model.settings.yml``: the model with a ``max_tokens`` aider sends (it sends none by
    default) so prompt + answer stay within the served context. JSON scalars: valid YAML."""
    _check("http://x", model_id, context_window)
    q = json.dumps
    return "\n".join([
        f"- name: {q(aider_model_name(model_id))}",
        "  edit_format: whole",
        "  use_repo_map: true",
        "  extra_params:",
        f"    max_tokens: {max_output_tokens(context_window)}",
    ]) + "\n"
