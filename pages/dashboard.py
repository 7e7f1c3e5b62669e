"""The dashboard page: the sidebar "🔧 Управление режимами и памятью" and the main monitoring area.

Layout follows the user's guide (seeds/memory-control-guide.ru.md). Parts live in their own
modules: sidebar (backend, model, profile, plan, buttons), memory_panel (the live fragment),
ui_ops (operations on the controller's runner), deployments, rec_card, history. This file only
reads the state once and hands it to them.
"""

from __future__ import annotations

import time
from typing import Any

import streamlit as st

from memory_controller.errors import MemctlError
from pages import (
    cluster_export,
    deployments,
    history,
    holders_view,
    ide_section,
    memory_panel,
    rec_card,
    sidebar,
    ui_ops,
)
from pages import ui_common as ui


def main() -> None:
    ctl = ui.controller()
    try:
        page(ctl)
    except MemctlError as exc:
        if not ui.owner_trouble(exc):
            raise
        # the owner this dashboard acts through stopped answering: say it, act on nothing behind its back
        st.title(ui.tr()("app.title"))
        ui.ownership_line()
        ui.error_box(exc)


def page(ctl: Any) -> None:
    ui_ops.mark_seen(ctl)
    t = ui.tr()
    snap = ctl.devices()
    ui.remember_devices(snap)
    selectable = list(snap.gpus) if snap.gpus else [snap.host]
    keys = [d.key for d in selectable]
    sidebar._restore("device_key")
    if st.session_state.get("device_key") not in keys:
        best = snap.most_free_gpu() or selectable[0]
        sidebar.set_field("device_key", best.key)
    availability = {bid: ctl.availability(bid, snap) for bid in ctl.backend_ids()}
    catalog = ui.run_safely(ctl.models)
    models = tuple(catalog.models) if catalog is not None else ()
    running = ui.run_safely(ctl.deployments) or []

    with st.sidebar:
        st.header(t("sidebar.title"))
        if len(selectable) > 1:
            st.selectbox(t("sidebar.device"), keys, key="device_key", on_change=sidebar._keep, args=("device_key",),
                         format_func=lambda k: ui.device_label(snap.device(k)))
        else:
            st.caption(ui.device_label(selectable[0]))
        dev = snap.device(st.session_state["device_key"]) or snap.host
        live_box = st.container()  # filled by the live panel on every tick
        st.divider()
        chosen = sidebar.sidebar(ctl, snap, dev, models, running, availability)
        st.divider()
        ui.language_switch()

    available = None if chosen.plan is None else chosen.plan.free_bytes_after_unload
    st.title(t("app.title"))
    ui.ownership_line()
    rec_card.environment_notice(ctl, snap, availability)
    ui_ops.op_panel(ctl, snap.has_gpu)
    memory_panel.live_panel(ctl, dev.key, live_box, float(ctl.settings.poll_interval_s))
    rec_card.recommendation_card(ctl, snap, dev, chosen.rec)
    rec_card.model_context_line(ctl, chosen.model, chosen.profile, available)
    deployments.deployments_section(ctl, running, ui_ops.busy(ctl), snap.has_gpu)
    ide_section.ide_section(ctl, snap, chosen.model.model_id if chosen.model is not None else None)
    cluster_export.cluster_export(ctl, snap, chosen.model.model_id if chosen.model is not None else None)
    deployments.cached_section(catalog, sidebar.models_for(chosen.backend_id, models, set(availability)),
                               chosen.plans, chosen.profile is not None)
    if snap.gpus:  # on the host the live panel lists the processes; there is no GPU memory to name
        holders_view.holders_section(ctl, snap)
    history.log_section(ctl, snap.has_gpu)
    memory_panel.warm_chart_libraries()
    t0 = st.session_state.pop("_perf_t0", None)
    if t0 is not None:  # read by bench/bench_ui.py: the whole script run, app.py's first line to here
        st.session_state["_perf_full_run_s"] = time.perf_counter() - t0


main()
