""""🔌 Подключить IDE": what Roo Code or Continue needs to talk to the memctl server — base URL, model id,
key (only when the server listens beyond loopback), context window and max output tokens, each with a
copy button (``st.code``), plus downloads of the Roo Code settings file and the Continue config.

The numbers are the ones ``memctl ide`` prints: the context comes from ``server.served.served_context``
(the running deployment's context, else what ``ctl.plan(..., purpose="ide")`` would serve) and the
answer size from ``memory_controller.ide.max_output_tokens``.
"""

from __future__ import annotations

import ipaddress
import json
import time
from typing import Any

import streamlit as st

from memory_controller.errors import InsufficientMemoryError
from memory_controller.ide import (
    aider_metadata,
    aider_settings,
    continue_config,
    kilo_config,
    max_output_tokens,
    model_max_positions,
    roo_settings,
    small_window_advice,
)
from pages import ui_common as ui


def _fallback_base(settings: Any) -> str:
    host = settings.bind_address if settings.bind_address not in ("0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.serve_port}"


def api_key(settings: Any) -> str | None:
    """The /v1 key the IDE must send: only when the server listens beyond loopback and one is set."""
    if ipaddress.ip_address(settings.bind_address).is_loopback or settings.serve_api_key is None:
        return None
    return settings.serve_api_key.get_secret_value()


def model_for_ide(ctl: Any, selected: str | None) -> str | None:
    """The model the IDE is pointed at: the running one (the newest ready), else the selected model."""
    ready = [d for d in ctl.deployments() if getattr(d.state, "value", d.state) == "ready"]
    if ready:
        return max(ready, key=lambda d: d.started_at).model_id
    return selected


SERVED_TTL_S = 5.0  # a planned context is re-planned at most this often (a full rerun would cost ~30 ms)
FREE_STEP_BYTES = 256 * 1024**2


def _served(serving: Any, model_id: str, snap: Any) -> tuple[str, int, tuple[Any, ...], bool]:
    """``server.served.served_context`` (what `memctl ide` prints) and whether the server parses the model's tool
    calls, kept a few seconds per model, per what runs and per free memory (in 256 MiB steps): a change of any
    of them is planned again at once."""
    from server.served import served_context, tools_honoured

    running = tuple(sorted((d.handle, d.context_tokens) for d in serving.deployments()))
    free = tuple((d.key, (d.free_bytes or 0) // FREE_STEP_BYTES) for d in snap.devices)
    key = (id(serving), model_id, running, free)
    cached = st.session_state.get("_ide_served")
    now = time.monotonic()
    if cached is not None and cached[0] == key and now - cached[1] < SERVED_TTL_S:
        return cached[2]
    served = (*served_context(serving, model_id), tools_honoured(serving, model_id))
    st.session_state["_ide_served"] = (key, now, served)
    return served


def ide_section(ctl: Any, snap: Any, selected_model: str | None) -> None:
    t = ui.tr()
    serving = ctl  # the owner's client when another process owns the machine: it sees what runs
    with st.expander(t("ide.title"), expanded=False):
        url = ui.server_url()
        if url is None:
            url = _fallback_base(ctl.settings)
            st.warning(t("ide.no_server", url=url))
        model_id = ui.run_safely(lambda: model_for_ide(serving, selected_model))
        if not model_id:
            st.info(t("ide.no_model"))
            return
        try:
            served = _served(serving, model_id, snap)
        except InsufficientMemoryError:
            st.warning(t("ide.does_not_fit", model=model_id))
            return
        except Exception as exc:  # noqa: BLE001 - shown in words, never a traceback
            ui.error_box(exc, context=t("ide.cannot_serve", model=model_id))
            return
        model_id, window, notes, tools = served
        out = max_output_tokens(window)
        base = f"{url}/v1"
        key = api_key(ctl.settings)
        st.caption(t("ide.intro"))
        fields = [("ide.base_url", base), ("ide.model_id", model_id)]
        if key:
            fields.append(("ide.api_key", key))
        fields += [("ide.context_window", str(window)), ("ide.max_tokens", str(out))]
        for label, value in fields:
            st.markdown(f"**{t(label)}**")
            st.code(value, language=None)
        for note in notes:
            st.caption(f"ℹ️ {ui.sentence(ui.render(note))}")
        advice = small_window_advice(window, ctl.settings.ide_min_context, model_max_positions(getattr(ctl, "resolve", None), model_id))
        if advice is not None:  # fits the cause: the model's own maximum, or free memory (issue 20.6)
            st.warning(f"⚠️ {ui.sentence(ui.render(advice))}.")
        c1, c2 = st.columns(2)
        c1.download_button(t("ide.download_roo"), json.dumps(roo_settings(base, model_id, window, key), indent=2,
                                                             ensure_ascii=False),
                           file_name="memctl-roo-code-settings.json", mime="application/json", key="ide_roo")
        c2.download_button(t("ide.download_continue"), continue_config(base, model_id, window, key, tools=tools),
                           file_name="config.yaml", mime="application/x-yaml", key="ide_continue")
        c3, c4, c5 = st.columns(3)
        c3.download_button(t("ide.download_kilo"), json.dumps(kilo_config(base, [(model_id, window, tools)], key),
                                                              indent=2, ensure_ascii=False),
                           file_name="kilo.json", mime="application/json", key="ide_kilo")
        c4.download_button(t("ide.download_aider_meta"), json.dumps(aider_metadata(model_id, window), indent=2),
                           file_name=".aider.model.metadata.json", mime="application/json", key="ide_aider_meta")
        c5.download_button(t("ide.download_aider_settings"), aider_settings(model_id, window),
                           file_name=".aider.model.settings.yml", mime="application/x-yaml", key="ide_aider_set")
        st.caption(t("ide.how"))
        holder = serving if hasattr(serving, "serving_pause") else getattr(serving, "local", None)
        pause = ui.run_safely(holder.serving_pause) if hasattr(holder, "serving_pause") else None
        if pause:
            st.warning(t("ide.paused", reason=t(f"ide.paused_{pause.get('reason', 'unload')}")))
            if st.button(t("ide.resume"), key="ide_resume"):
                ui.run_safely(holder.resume_serving)
                st.rerun()
