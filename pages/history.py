"""The operation log (read back from disk: survives restarts) and its write problems, shown until a
write succeeds again."""

from __future__ import annotations

from typing import Any

import streamlit as st

from pages import ui_common as ui
from pages import ui_ops

ADVICE_BY_KIND = {"apply": "model_not_loading", "emergency_clear": "container_not_stopping"}


def _acknowledge() -> None:
    ui.controller().acknowledge_log_errors()


def log_problems(ctl: Any) -> None:
    """A failed log write is the user's business: their history is not being kept. Write failures
    (``ctl.log_write_errors()``) stay until a write succeeds or the user presses OK."""
    t = ui.tr()
    write_errors = list(ctl.log_write_errors())
    problems = [p for p in ctl.log_warnings() if p not in write_errors]
    if write_errors:
        st.warning(t("log.write_failed"), icon="⚠️")
        with st.expander(t("error.details")):
            st.code("\n".join(write_errors), language=None)
        st.button(t("log.acknowledge"), key="log_ack", on_click=_acknowledge)
    if problems:
        st.warning(t("log.read_problems"), icon="⚠️")
        with st.expander(t("error.details")):
            st.code("\n".join(problems), language=None)


def log_section(ctl: Any, has_gpu: bool) -> None:
    t = ui.tr()
    st.subheader(t("log.title"))
    log_problems(ctl)
    records = ui.run_safely(lambda: ctl.history(20)) or []
    if not records:
        st.caption(t("log.empty"))
        return
    for r in records:
        took = ui.fmt_duration((r.ended_at or r.started_at) - r.started_at)
        kind = t(f"log.kind_{r.kind}") if t.has(f"log.kind_{r.kind}") else r.kind
        what = r.params.get("model") or r.params.get("name") or ""
        label = f"{ui.outcome_emoji(r.outcome)} {ui.fmt_time(r.started_at)} · {kind} {what} · {took}"
        with st.expander(label):
            ui_ops.memory_change_caption(r)
            ui_ops.steps_table(r.steps, has_gpu)
            if r.error:
                st.error(f"❌ **{t('log.failed')}**")
                st.code(r.error, language=None)
                ui.advice_block(ADVICE_BY_KIND.get(r.kind))
