""""Процессы, занимающие память": every process the driver reports on a GPU, named by the controller
(``ctl.holders()`` → ``memory_controller.holders.holder_rows``), with a 🗑️ per model of another holder (unloaded
through ``ctl.holder_source(source).unload(name)``) and Ollama's own list of loaded models when it answers. memctl
never stops anything else: the other rows carry the advice of the guide's "Решение проблем".
Also what an emergency clear left behind (``report.remaining``), per GPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import streamlit as st

from memory_controller.errors import MemctlError
from memory_controller.holders import holder_rows
from memory_controller.types import Message, Outcome
from pages import ui_common as ui

OLLAMA_RESULT_KEY = "_ollama_unload_result"
OLLAMA = "ollama"  # the holder source whose loaded models the page lists (the ``ollama`` backend's)


def kind_label(kind: str) -> str:
    t = ui.tr()
    return t(f"holders.kind_{kind}") if t.has(f"holders.kind_{kind}") else kind


def advice_text(code: str | None, text: str | None, args: Mapping[str, Any] | None = None) -> str:
    """A holder's advice in the user's language (its Message code), else the core's words."""
    if not code:
        return text or ""
    return ui.sentence(ui.render(Message(code, dict(args or {}), text or "")))


def _row_advice(h: Any) -> str:
    adv = getattr(h, "advice", None)
    return advice_text(getattr(adv, "code", None), getattr(adv, "text", None), getattr(adv, "args", None))


def holders_table(holders: list[Any]) -> None:
    """Device, PID, name, kind, user, memory, advice: one row per process (largest first per device)."""
    t = ui.tr()
    if not holders:
        st.caption(t("holders.none"))
        return
    rows = holder_rows(holders)
    lines = [f"| {t('holders.device')} | PID | {t('holders.name')} | {t('holders.kind')} | {t('holders.user')} | "
             f"{t('holders.memory')} | {t('holders.advice')} |", "|---|---|---|---|---|---|---|"]
    for h, row in zip(holders, rows, strict=True):
        name = row["name"] + (f" — {row['detail']}" if row["detail"] and row["kind"] != "process" else "")
        lines.append(f"| {ui.device_key_label(row['device'])} | {row['pid'] if row['pid'] is not None else '—'} | "
                     f"{ui.cell(name)} | {kind_label(row['kind'])} | {ui.cell(row['user'] or '—')} | "
                     f"{ui.gib(row['bytes'])} | {ui.cell(_row_advice(h))} |")
    st.markdown("\n".join(lines))


def _unload_held(source_id: str, name: str) -> None:
    ctl = ui.controller()
    client = ctl.holder_source(source_id)
    try:
        if client is None:
            raise MemctlError(f"no {source_id} client", "check its settings in the config file",
                              code=f"{source_id}.down", args={"host": "?"})
        st.session_state[OLLAMA_RESULT_KEY] = client.unload(name)
    except MemctlError as exc:
        st.session_state[OLLAMA_RESULT_KEY] = exc


def _ollama_result() -> None:
    res = st.session_state.pop(OLLAMA_RESULT_KEY, None)
    if res is None:
        return
    if isinstance(res, BaseException):
        ui.error_box(res)
        return
    show = {Outcome.SUCCESS: st.success, Outcome.WARNING: st.warning, Outcome.ERROR: st.error}[res.outcome]
    show(f"{ui.outcome_emoji(res.outcome)} {ui.render(res.message)}")  # starts with a model name: as it is


def holders_section(ctl: Any, snap: Any, *, unload_buttons: bool = True) -> None:
    """The table, the 🗑️ per model of another holder and Ollama's loaded models (the dashboard and the
    diagnostic page)."""
    t = ui.tr()
    st.subheader(t("holders.title"))
    _ollama_result()
    if not snap.gpus:  # the host's own processes, as the dashboard's live panel lists them
        st.caption(t("holders.no_gpu"))
        host_processes(snap.host)
    else:
        holders = ui.run_safely(lambda: ctl.holders(snap)) or []
        holders_table(holders)
        freeable = [(h, m) for h in holders if h.freeable_by not in (None, "memctl") for m in h.models]
        busy = ctl.current_operation() is not None
        for h, model in freeable if unload_buttons else ():
            source = ctl.holder_source(h.freeable_by) if h.freeable_by != OLLAMA else None
            label = (t("holders.unload_ollama", model=model, size=ui.gib(h.bytes)) if h.freeable_by == OLLAMA
                     else t("holders.unload_from", source=source.label if source else h.freeable_by, model=model,
                            size=ui.gib(h.bytes)))
            st.button(label, key=f"{h.freeable_by}_unload::{model}", on_click=_unload_held,
                      args=(h.freeable_by, model), disabled=busy)
    ollama_models(ctl)


def host_processes(dev: Any, title: str | None = None) -> None:
    """The processes holding the host's RAM (largest first, as the probe lists them), each with what to
    do: this memctl process is named as such; any other is the user's to close (memctl never stops it)."""
    t = ui.tr()
    procs = list(getattr(dev, "processes", None) or ())
    if title:
        st.markdown(f"**{title}**")
    if not procs:
        st.caption(t("live.no_processes"))
        return
    me = os.getpid()
    rows = [f"| PID | {t('live.process')} | {t('live.process_memory')} | {t('holders.advice')} |", "|---|---|---|---|"]
    for p in procs:
        advice = t("holders.self") if p.pid == me else ui.render(
            Message("holder.advice.process", {"pid": p.pid}, f"another program (PID {p.pid})"))
        rows.append(f"| {p.pid} | {ui.cell(p.name) or '—'} | {ui.gib(p.used_bytes)} | {ui.cell(advice)} |")
    st.markdown("\n".join(rows))


def ollama_models(ctl: Any) -> None:
    """Ollama's own list (``/api/ps``) when it answers: name, memory in VRAM, unloads itself in."""
    t = ui.tr()
    client = ctl.holder_source(OLLAMA)
    models = client.loaded() if client is not None else None
    if models is None:
        st.caption(t("holders.ollama_silent"))
        return
    if not models:
        st.caption(t("holders.ollama_empty"))
        return
    lines = [f"| {t('holders.ollama_model')} | {t('holders.memory')} | {t('holders.ollama_expires')} |", "|---|---|---|"]
    for m in models:
        left = m.expires_in_s()
        lines.append(f"| {ui.cell(m.name)} | {ui.gib(m.size_vram)} | {ui.fmt_duration(left) if left and left > 0 else '—'} |")
    st.markdown(f"**{t('holders.ollama_title')}**\n\n" + "\n".join(lines))


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, Mapping) else getattr(obj, key, default)


def remaining_lines(remaining: list[Any]) -> list[str]:
    """What still holds memory after an emergency clear, per GPU, each holder with its advice.
    Takes ``DeviceHolders`` values (local) or their JSON (through the owner's client)."""
    t = ui.tr()
    lines = []
    for dev in remaining:
        key = str(_get(dev, "device_key", "?"))
        holders = list(_get(dev, "holders", ()) or ())
        parts = []
        for h in holders:
            adv = _get(h, "advice")
            advice = advice_text(_get(adv, "code"), _get(adv, "text"), _get(adv, "args")) if adv else ""
            parts.append(t("holders.remaining_row", name=_get(h, "name", "?"), pid=_get(h, "pid") or "—",
                           kind=kind_label(str(_get(h, "kind", ""))), size=ui.gib(_get(h, "bytes")), advice=advice))
        rest = _get(dev, "unattributed_bytes")
        if rest:
            parts.append(t("holders.unattributed", size=ui.gib(rest)))
        if parts:
            lines.append(f"**{ui.device_key_label(key)}**\n" + "\n".join(f"- {p}" for p in parts))
    return lines


def emergency_remaining(report: Any) -> None:
    """The emergency clear's verdict and, per GPU, every holder left with its advice."""
    verdict = getattr(report, "verdict", None)
    if verdict is not None:
        text = ui.sentence(ui.render(verdict))
        (st.info if verdict.code != "emergency.still_held" else st.warning)(text)
    for line in remaining_lines(list(getattr(report, "remaining", None) or [])):
        st.markdown(line)


def emergency_confirm_text(ctl: Any) -> str:
    """What the emergency clear will do, in order, for the confirmation dialog: Ollama's models
    included when its ``emergency_unload`` option is on (named when Ollama answers)."""
    t = ui.tr()
    steps = [t("emergency.does_models"), t("emergency.does_cancel"), t("emergency.does_clear")]
    client = ctl.holder_source(OLLAMA)
    if client is not None and client.unloads_in_emergency:
        loaded = client.loaded()
        names = ", ".join(m.name for m in loaded) if loaded else None
        steps.insert(1, t("emergency.does_ollama_named", models=names) if names else t("emergency.does_ollama"))
    owner = ui.owner_info()
    if owner is not None:
        steps.insert(1, t("emergency.does_owner", pid=owner.pid))
    steps.append(t("emergency.does_report"))
    return (f"🚨 {t('emergency.confirm_intro')}\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1))
            + f"\n\n{t('emergency.confirm_question')}")
