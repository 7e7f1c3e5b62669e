"""The live memory panel: the guide's four figures and colour (in the sidebar), the chart of used
memory, the processes holding memory, the operation that runs now.

Only this fragment reruns on the timer, so an idle tab costs one probe and one small message per
tick. The chart is a hand-written Vega-Lite spec with its rows inline (no altair/pandas/pyarrow in
the tick) and always a finite, non-empty domain: an empty or NaN series made Vega log
``Infinite extent for field "t"`` on every redraw. Its y axis spans the used memory's own range
(with the total named in the title), so a 0.75 GiB change on a 24 GiB device is plainly visible.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import streamlit as st

from memory_controller.types import DeviceKind, DeviceSnapshot
from memory_controller.units import GIB
from pages import holders_view, ui_ops
from pages import ui_common as ui

CHART_MAX_POINTS = 120  # per series: the browser redraws every tick, keep it light
MIN_SPAN_GIB = 1.0  # the y axis spans at least this much, so noise of a few MiB stays flat


_chart_ready = threading.Event()
_chart_started = threading.Lock()


def warm_chart_libraries() -> None:
    """Import pandas/pyarrow (Streamlit turns chart rows into Arrow; ~1.5 s cold) on a background
    thread once per process, after the first paint: neither the paint nor a tick waits for it."""
    if not _chart_started.acquire(blocking=False):
        return

    def load() -> None:
        try:
            import pandas  # noqa: F401
            import pyarrow  # noqa: F401
        finally:
            _chart_ready.set()

    threading.Thread(target=load, name="memctl-ui-chart-import", daemon=True).start()


def device_metrics(dev: DeviceSnapshot, ctl: Any) -> None:
    """The guide's four figures for one device, then the colour indicator."""
    t = ui.tr()
    total_key = "metrics.total_host" if dev.kind is DeviceKind.HOST else "metrics.total_gpu"
    util = "—" if dev.utilization_pct is None else f"{dev.utilization_pct:.0f}%"
    util_help = t("metrics.util_help_host") if dev.kind is DeviceKind.HOST else t("metrics.util_help_gpu")
    # One per row: in the sidebar's width two columns cut "23.54 GiB" to "23.5…".
    st.metric(t(total_key), ui.gib(dev.total_bytes))
    st.metric(t("metrics.used"), ui.gib(dev.used_bytes))
    st.metric(t("metrics.free"), ui.gib(dev.free_bytes))
    st.metric(t("metrics.util"), util, help=util_help)
    st.markdown(ui.level_badge(ctl.level(dev), ctl.settings))
    budget = getattr(ctl.settings, "host_memory_budget_bytes", None)
    if dev.kind is DeviceKind.HOST and budget is not None:
        # The configured budget is what limits (issue 20.8): not data that cannot be read.
        st.caption(f"ℹ️ {t('metrics.budget', budget=ui.gib(budget))}")
    elif dev.hint:
        st.caption(f"ℹ️ {t('metrics.partial')}")


def chart_rows(samples: list[tuple[float, tuple[int | None, int | None]]]) -> list[dict[str, Any]]:
    """``[{"t": ms, "gib": used}]`` of the samples whose used memory is known and finite, thinned to
    :data:`CHART_MAX_POINTS` (the newest kept)."""
    good = [(ts, used) for ts, (used, _free) in samples
            if used is not None and ts == ts and ts not in (float("inf"), float("-inf"))]
    step = max(1, -(-len(good) // CHART_MAX_POINTS))
    picked = good[::-1][::step][::-1]
    # "t" is a float: inline rows travel to the browser as Arrow, where an int64 column arrives as a
    # BigInt that Vega cannot read as a time (every point at NaN, the axis "NaN:NaN:NaN").
    return [{"t": float(round(ts * 1000)), "gib": round(used / GIB, 3)} for ts, used in picked]


def _iso(ms: float) -> str:
    """``ms`` since the epoch as an ISO 8601 UTC instant, the form Vega reads as a time domain."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def chart_spec(rows: list[dict[str, Any]], total_bytes: int | None, used_label: str) -> dict[str, Any] | None:
    """The Vega-Lite spec with its data inline, or None when there is not yet a series to draw
    (fewer than two points, or all at one instant): never an empty or non-finite domain."""
    if len(rows) < 2:
        return None
    t_lo, t_hi = rows[0]["t"], rows[-1]["t"]
    if t_hi <= t_lo:
        return None
    values = [r["gib"] for r in rows]
    lo, hi = min(values), max(values)
    span = max(hi - lo, MIN_SPAN_GIB)
    pad = span * 0.15
    y_lo = max(0.0, (lo + hi) / 2 - span / 2 - pad)
    total_gib = None if total_bytes is None else total_bytes / GIB
    y_hi = (lo + hi) / 2 + span / 2 + pad
    if total_gib is not None:
        y_hi = min(y_hi, total_gib)
        if y_hi <= y_lo:
            y_lo = max(0.0, y_hi - MIN_SPAN_GIB)
    layers: list[dict[str, Any]] = [{
        "mark": {"type": "area", "line": True, "opacity": 0.35, "color": "#e4572e", "interpolate": "step-after"},
        "encoding": {
            # The time domain as ISO instants: a numeric domain on a temporal scale is drawn as
            # NaN:NaN:NaN in the browser (issue 20.1); without a domain, Vega warns of an infinite
            # extent while the rows are still on their way.
            "x": {"field": "t", "type": "temporal", "title": None, "axis": {"format": "%H:%M:%S"},
                  "scale": {"domain": [_iso(t_lo), _iso(t_hi)]}},
            "y": {"field": "gib", "type": "quantitative", "title": used_label,
                  "scale": {"domain": [round(y_lo, 3), round(y_hi, 3)], "zero": False, "clamp": True}},
            "tooltip": [{"field": "t", "type": "temporal", "format": "%H:%M:%S"},
                        {"field": "gib", "type": "quantitative", "format": ".2f", "title": "GiB"}],
        },
    }]
    if total_gib is not None and y_hi >= total_gib - 1e-9:
        layers.append({"data": {"values": [{"total": round(total_gib, 3)}]},
                       "mark": {"type": "rule", "strokeDash": [4, 4], "color": "#555"},
                       "encoding": {"y": {"field": "total", "type": "quantitative"}}})
    return {"data": {"values": rows}, "height": 220, "layer": layers}


def chart(ctl: Any, dev: DeviceSnapshot) -> None:
    t = ui.tr()
    samples = [(ts, values[dev.key]) for ts, values in ctl.memory_history() if dev.key in values]
    spec = chart_spec(chart_rows(samples), dev.total_bytes, t("live.axis_used"))
    if spec is None or not _chart_ready.is_set():
        st.caption(t("live.collecting"))
        return
    st.caption(t("live.chart_caption", total=ui.gib(dev.total_bytes)))
    st.vega_lite_chart(spec, width="stretch")


def processes(dev: DeviceSnapshot) -> None:
    holders_view.host_processes(dev, ui.tr()("live.processes"))


def running_line(ctl: Any) -> None:
    """The operation holding the runner now, with its current stage (from the runner only)."""
    op = ui_ops.holder(ctl)
    if op is None:
        return
    t = ui.tr()
    ev = op.last_event
    kind = t(f"opkind.{op.kind}") if t.has(f"opkind.{op.kind}") else op.kind
    st.info(t("live.running", kind=kind, description=ui_ops.op_title(ctl, op), since=ui.fmt_time(op.started_at),
              step=ui.stage_label(ev.stage) if ev is not None else "…"))


def live_panel(ctl: Any, device_key: str, sidebar_box: Any, every_s: float) -> None:
    @st.fragment(run_every=every_s)
    def _live() -> None:
        t0 = time.perf_counter()
        ui_ops.rerun_if_changed(ctl)
        t = ui.tr()
        snap = ctl.devices()
        dev = snap.device(device_key) or snap.host
        with sidebar_box:
            device_metrics(dev, ctl)
        st.subheader(t("live.title"))
        st.caption(t("live.updated", time=ui.fmt_time(snap.taken_at), device=ui.device_label(dev),
                     every=f"{every_s:g}"))
        running_line(ctl)
        chart(ctl, dev)
        if dev.kind is DeviceKind.HOST:  # a GPU's processes are named in "Процессы, занимающие память" below
            processes(dev)
        st.session_state["_perf_live_panel_s"] = time.perf_counter() - t0

    _live()
