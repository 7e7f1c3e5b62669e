"""Diagnostic page: ``streamlit run test_memory_controller.py`` (also the "🧪" page of app.py).

This file only frames the page: the model and backend to switch with, the buttons, and the
results; the checks live in pages/diagnostics.py. Not a pytest module (pytest collects only
tests/): the name is the one the user's guide gives.
"""

from __future__ import annotations

import time

import streamlit as st

from pages import diagnostics as diag
from pages import holders_view
from pages import ui_common as ui


def _request(names: tuple[str, ...]) -> None:
    st.session_state["diag_pending"] = list(names)
    st.session_state["diag_skipped"] = []
    st.session_state["diag_confirm_emergency"] = False


def _request_all() -> None:
    """Every check; the mode switch and the emergency clear only when their boxes are ticked."""
    run = tuple(n for n in diag.CHECKS if n not in diag.OPT_IN or st.session_state.get(diag.OPT_IN[n], False))
    _request(run)
    st.session_state["diag_skipped"] = [n for n in diag.CHECKS if n not in run]


def _confirm(value: bool) -> None:
    st.session_state["diag_confirm_emergency"] = value


def render() -> None:
    ctl = ui.controller()
    ui.init_language(ctl.settings.language)
    t = ui.tr()
    with st.sidebar:
        ui.language_switch()
    st.title(t("diag.title"))
    st.caption(t("diag.caption"))
    results: dict[str, diag.CheckResult] = st.session_state.setdefault(diag.RESULTS_KEY, {})
    catalog = ui.run_safely(ctl.models)
    ids = [m.model_id for m in catalog.models] if catalog is not None else []
    snap = ctl.devices()
    ui.remember_devices(snap)
    usable = [bid for bid in ctl.backend_ids() if ctl.availability(bid, snap).ok]
    c1, c2 = st.columns([3, 2])
    if ids:
        c1.selectbox(t("diag.model"), ids, key="diag_model")
    else:
        c1.warning(t("diag.no_models"))
    if usable:
        c2.radio(t("controls.mode"), usable, format_func=lambda b: ui.backend_label(ctl, b), key="diag_mode",
                 horizontal=True)
    else:
        c2.warning(t("controls.no_backends"))
    st.caption(t("diag.warning"))
    ui.run_safely(lambda: diag.acting_controller(ctl))  # says when the owner cannot be reached
    owner = ui.owner_info()
    if owner is not None:
        st.info(t("diag.via_owner", pid=owner.pid, url=owner.url))
    st.checkbox(t("diag.include_switch"), key="diag_include_switch")
    st.checkbox(t("diag.include_emergency"), key="diag_include_emergency")
    st.button(t("diag.run_all"), key="diag_run_all", type="primary", on_click=_request_all)
    row = st.container(horizontal=True)
    for name in diag.CHECKS:
        if name in diag.DESTRUCTIVE:  # asks first, as on the dashboard
            row.button(t(f"diag.check_{name}"), key=f"diag_run_{name}", on_click=_confirm, args=(True,))
        else:
            row.button(t(f"diag.check_{name}"), key=f"diag_run_{name}", on_click=_request, args=((name,),))
    if st.session_state.get("diag_confirm_emergency"):
        st.warning(holders_view.emergency_confirm_text(ctl))
        b1, b2, _rest = st.columns([2, 1, 3])
        b1.button(t("emergency.confirm"), key="diag_emergency_confirm", type="primary", width="stretch",
                  on_click=_request, args=(diag.DESTRUCTIVE,))
        b2.button(t("emergency.cancel"), key="diag_emergency_cancel", width="stretch", on_click=_confirm, args=(False,))

    pending = st.session_state.pop("diag_pending", None) or []
    for name in st.session_state.pop("diag_skipped", None) or []:
        box = t("diag.include_switch" if name == "switch" else "diag.include_emergency")
        results[name] = diag.CheckResult("skipped", 0.0, time.time(), [t("diag.skipped_opt_in", box=box)])
    if pending:
        live = st.empty()  # the running checks' progress; cleared once they end, the results show below
        with live.container():
            for name in pending:
                results[name] = diag.run_check(name, ctl, st.session_state.get("diag_model"),
                                               st.session_state.get("diag_mode"))
        live.empty()
    st.subheader(t("diag.results"))
    diag.render_results(results)
    holders_view.holders_section(ctl, snap, unload_buttons=False)


def _is_entrypoint() -> bool:
    """True when this file is the script given to ``streamlit run`` (not a page of app.py)."""
    from pathlib import Path

    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return ctx is not None and Path(ctx.main_script_path).resolve() == Path(__file__).resolve()


if _is_entrypoint():
    # Run on its own: declare the one page, so Streamlit does not list pages/*.py as legacy pages.
    st.set_page_config(page_title="memctl — тест", page_icon="🧪", layout="wide")
    st.navigation([st.Page(render, title="memctl", icon="🧪")], position="hidden").run()
else:
    render()
