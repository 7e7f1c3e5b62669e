"""Diagnostic page: ``streamlit run test_memory_controller.py`` (also the "🧪" page of app.py).

As the user's guide promises ("Тестирование"), it shows the current memory status, runs a mode
switch end to end with a chosen cached model (apply → listed as loaded → unload with its report),
runs both clear functions, and shows the recommendation for a range of free-memory values; each
check is marked passed (✅), passed with a warning (⚠️), failed (❌) or skipped, with its time.

Not a pytest module (pytest collects only tests/): the name is the one the guide gives.
Checks run on the script thread on purpose: this page has no live panel to keep ticking.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from memory_controller.recommend import band_for, level_for, recommend
from memory_controller.types import (
    DeviceKind,
    DeviceSnapshot,
    Mode,
    NvmlStatus,
    Outcome,
    ProgressEvent,
    SystemSnapshot,
)
from memory_controller.units import GIB
from pages import ui_common as ui

CHECKS = ("memory", "recommend", "switch", "clear", "emergency")
DESTRUCTIVE = ("emergency",)  # asks for confirmation before it runs on its own
# Left out of "run all" unless the user ticks the box for it: the mode switch unloads the loaded
# models, the emergency clear unloads everything and stops the containers.
OPT_IN = {"switch": "diag_include_switch", "emergency": "diag_include_emergency"}
FREE_GIB_RANGE = (0.5, 1.0, 1.99, 2.0, 3.0, 3.99, 4.0, 5.0, 6.0, 7.0, 7.99, 8.0, 12.0, 24.0)
STATUS_ICON = {"passed": "✅", "warning": "⚠️", "failed": "❌", "skipped": "⏭️"}
RESULTS_KEY = "diag_results"


@dataclass
class CheckResult:
    status: str  # passed | warning | failed | skipped
    duration_s: float
    at: float
    lines: list[str] = field(default_factory=list)
    table: str | None = None
    error: BaseException | None = None


def _precision_cell(precision: Any) -> str:
    """``FP16 точность`` / ``INT8 квантизация``: the guide's wording."""
    t = ui.tr()
    key = "rec.quantization" if precision.is_quantized else "rec.precision"
    return t(key, precision=precision.value.upper())


class _Failed(Exception):
    """A check's own assertion failed: the message says what was expected."""


# ============================================================================ checks
def check_memory(ctl: Any, say: Any) -> CheckResult:
    t = ui.tr()
    snap = ctl.devices()
    lines = []
    for dev in snap.devices:
        util = "—" if dev.utilization_pct is None else f"{dev.utilization_pct:.0f}%"
        util += " " + t("diag.util_host" if dev.kind is DeviceKind.HOST else "diag.util_gpu")
        lines.append(t("diag.memory_line", device=ui.device_label(dev), total=ui.gib(dev.total_bytes),
                       used=ui.gib(dev.used_bytes), free=ui.gib(dev.free_bytes), util=util,
                       level=ctl.level(dev).emoji))
        say(lines[-1])
    lines.append(t("diag.nvml", status=ui.nvml_text(snap)))
    if snap.nvml_hint:
        lines.append(f"{ui.english_label()}{snap.nvml_hint}")
    if snap.host.total_bytes is None or snap.host.free_bytes is None:
        raise _Failed(t("diag.host_unreadable"))
    status = "passed" if snap.has_gpu or snap.nvml_status is not NvmlStatus.ERROR else "warning"
    return CheckResult(status, 0.0, 0.0, lines)


def check_recommend(ctl: Any, say: Any) -> CheckResult:
    """The guide's table at a range of free-memory values on a synthetic 24 GiB GPU, and the host."""
    t = ui.tr()
    s = ctl.settings
    bands = s.bands
    rows = [f"| {t('diag.rec_free')} | {t('diag.rec_level')} | {t('diag.rec_band')} | {t('diag.rec_mode')} | "
            f"{t('diag.rec_precision')} | {t('diag.rec_context')} | {t('diag.rec_batch')} | {t('diag.rec_ok')} |",
            "|---|---|---|---|---|---|---|---|"]
    problems = []
    for free_gib in FREE_GIB_RANGE:
        free = int(free_gib * GIB)
        snap = _synthetic_gpu(free)
        rec = recommend(snap, bands=bands, green_min_bytes=s.green_min_bytes, yellow_min_bytes=s.yellow_min_bytes,
                        cpu_half_precision=s.cpu_half_precision, docker_available=True)
        want_band = band_for(free, bands)
        want_level = level_for(free, s.green_min_bytes, s.yellow_min_bytes)
        ok = (rec.band == want_band.name and rec.level is want_level and rec.profile.mode is want_band.mode
              and rec.profile.precision is want_band.precision
              and rec.profile.context_tokens == want_band.context_tokens and rec.profile.batch == want_band.batch)
        if not ok:
            problems.append(t("diag.rec_mismatch", free=free_gib, got=ui.band_title(rec.band, bands),
                              want=ui.band_title(want_band.name, bands)))
        p = rec.profile
        rows.append(f"| {free_gib:g} GiB | {rec.level.emoji} | {ui.band_title(rec.band, bands)} | "
                    f"{ui.mode_label(p.mode)} | "
                    f"{_precision_cell(p.precision)} | {p.context_tokens} | {p.batch} | {'✅' if ok else '❌'} |")
    # no GPU: Transformers on the CPU, vLLM unavailable with its reason
    host_rec = recommend(_synthetic_host(int(8 * GIB)), bands=bands, green_min_bytes=s.green_min_bytes,
                         yellow_min_bytes=s.yellow_min_bytes, cpu_half_precision=s.cpu_half_precision)
    host_ok = host_rec.profile.mode is Mode.TRANSFORMERS and not host_rec.vllm_available and host_rec.vllm_reason
    if not host_ok:
        problems.append(t("diag.rec_host_mismatch", band=ui.band_title(host_rec.band, bands)))
    rows.append(f"| 8 GiB ({t('diag.rec_host')}) | {host_rec.level.emoji} | {ui.band_title(host_rec.band, bands)} | "
                f"{ui.mode_label(host_rec.profile.mode)} | {_precision_cell(host_rec.profile.precision)} | "
                f"{host_rec.profile.context_tokens} | {host_rec.profile.batch} | {'✅' if host_ok else '❌'} |")
    now = ctl.recommend()
    now_dev = ctl.devices().device(now.device_key)
    where = ui.device_label(now_dev) if now_dev is not None else now.device_key
    lines = [t("diag.rec_now", free=ui.gib(now.free_bytes), device=where, profile=ui.profile_text(now.profile),
               band=ui.band_title(now.band, bands))]
    say(lines[0])
    if problems:
        raise _Failed("; ".join(problems))
    return CheckResult("passed", 0.0, 0.0, lines, table="\n".join(rows))


def check_switch(ctl: Any, say: Any, model_id: str | None, mode: str) -> CheckResult:
    """Apply the chosen model, see it among the loaded models, unload it and read the report."""
    t = ui.tr()
    if not model_id:
        return CheckResult("skipped", 0.0, 0.0, [t("diag.no_models")])

    def progress(ev: ProgressEvent) -> None:
        took = f" ({ui.fmt_duration(ev.elapsed_s)})" if ev.fraction == 1.0 and ev.elapsed_s is not None else ""
        say(f"**{ui.step_label(ev.stage)}** — {ev.message}{took}")

    plan = ctl.plan(mode, model_id)
    say(t("diag.switch_plan", needed=ui.gib(plan.needed_bytes), free=ui.gib(plan.free_bytes_after_unload),
          fits="✅" if plan.fits else "❌"))
    record = ctl.apply(mode, model_id, plan.profile, progress=progress)
    lines = [f"{s.outcome.emoji} {ui.step_label(s.name)} — {ui.fmt_duration(s.duration_s)} — {s.message}"
             for s in record.steps]
    loaded = [lm for lm in ctl.loaded() if lm.model_id == model_id]
    if not loaded:
        raise _Failed(t("diag.switch_not_listed", model=model_id))
    lines.append(t("diag.switch_listed", model=model_id, row=ui.loaded_row_text(loaded[0])))
    say(lines[-1])
    status = "warning" if record.outcome is Outcome.WARNING else "passed"
    if loaded[0].backend == "transformers":
        rep = ctl.unload(model_id)
        lines.append(ui.unload_report_text(rep))
        if rep.message:
            lines.append(f"{ui.english_label()}{rep.message}")
        if rep.verdict is Outcome.ERROR:
            status = "failed"
        elif rep.verdict is Outcome.WARNING:
            status = "warning"
    else:
        ctl.stop_container(loaded[0].name)
        lines.append(t("containers.stopped", name=loaded[0].name))
    say(lines[-1])
    if any(lm.model_id == model_id for lm in ctl.loaded()):
        raise _Failed(t("diag.switch_still_loaded", model=model_id))
    return CheckResult(status, 0.0, 0.0, lines)


def check_clear(ctl: Any, say: Any) -> CheckResult:
    t = ui.tr()
    rep = ctl.clear_memory()
    lines = [t("diag.clear_line", device=ui.device_key_label(k), before=ui.gib(v), after=ui.gib(rep.after.get(k)),
               freed=ui.freed_text(rep.freed.get(k))) for k, v in rep.before.items()]
    for line in lines:
        say(line)
    return CheckResult("passed", 0.0, 0.0, lines)


def check_emergency(ctl: Any, say: Any) -> CheckResult:
    t = ui.tr()
    rep = ctl.emergency_clear()
    lines = [f"{s.outcome.emoji} {ui.step_label(s.name)} — {ui.fmt_duration(s.duration_s)} — {s.message}"
             for s in rep.steps]
    for line in lines:
        say(line)
    left = [lm.model_id for lm in ctl.loaded() if lm.backend == "transformers"]
    if left:
        raise _Failed(t("diag.emergency_left", models=", ".join(left)))
    return CheckResult("passed" if rep.outcome is Outcome.SUCCESS else "warning", 0.0, 0.0, lines)


def _synthetic_gpu(free_bytes: int) -> SystemSnapshot:
    total = 24 * GIB
    gpu = DeviceSnapshot(DeviceKind.GPU, 0, "synthetic GPU", None, total, total - free_bytes, free_bytes, 0.0)
    return SystemSnapshot(gpus=(gpu,), host=_host(16 * GIB), nvml_status=NvmlStatus.OK)


def _synthetic_host(free_bytes: int) -> SystemSnapshot:
    return SystemSnapshot(gpus=(), host=_host(free_bytes), nvml_status=NvmlStatus.LIBRARY_NOT_FOUND,
                          nvml_hint="synthetic: no GPU")


def _host(free_bytes: int) -> DeviceSnapshot:
    total = 32 * GIB
    return DeviceSnapshot(DeviceKind.HOST, None, "host", None, total, total - free_bytes, free_bytes, None)


# ============================================================================ running and rendering
def run_check(name: str, ctl: Any, model_id: str | None, mode: str) -> CheckResult:
    """Run one check inside ``st.status`` (live progress while it runs; the caller clears it and
    shows the result once, in the results section); any error marks it failed (no traceback)."""
    t = ui.tr()
    t0 = time.perf_counter()
    with st.status(t("diag.running", name=t(f"diag.check_{name}")), expanded=True) as box:
        def say(text: str) -> None:
            box.markdown(text)

        try:
            if name == "memory":
                res = check_memory(ctl, say)
            elif name == "recommend":
                res = check_recommend(ctl, say)
            elif name == "switch":
                res = check_switch(ctl, say, model_id, mode)
            elif name == "clear":
                res = check_clear(ctl, say)
            else:
                res = check_emergency(ctl, say)
        except _Failed as exc:
            res = CheckResult("failed", 0.0, 0.0, [f"❌ {exc}"])
        except Exception as exc:  # noqa: BLE001 - shown with its hint and the guide's advice
            res = CheckResult("failed", 0.0, 0.0, [], error=exc)
        res.duration_s = time.perf_counter() - t0
        res.at = time.time()
        box.update(label=f"{STATUS_ICON[res.status]} {t(f'diag.check_{name}')} — {ui.fmt_duration(res.duration_s)}",
                   state="error" if res.status == "failed" else "complete", expanded=False)
    return res


def render_results(results: dict[str, CheckResult]) -> None:
    t = ui.tr()
    # One summary table; each check's lines once, in its expander (no status blocks left behind).
    rows = [f"| | {t('diag.col_check')} | {t('diag.col_result')} | {t('diag.col_time')} | {t('diag.col_when')} |",
            "|---|---|---|---|---|"]
    for name in CHECKS:
        r = results.get(name)
        if r is None:
            rows.append(f"| ⬜ | {t(f'diag.check_{name}')} | {t('diag.not_run')} | — | — |")
        else:
            rows.append(f"| {STATUS_ICON[r.status]} | {t(f'diag.check_{name}')} | {t(f'diag.status_{r.status}')} | "
                        f"{ui.fmt_duration(r.duration_s)} | {ui.fmt_time(r.at)} |")
    st.markdown("\n".join(rows))
    for name in CHECKS:
        r = results.get(name)
        if r is None:
            continue
        with st.expander(f"{STATUS_ICON[r.status]} {t(f'diag.check_{name}')} — {t('diag.details')}",
                         expanded=r.status == "failed"):
            for line in r.lines:
                st.markdown(line)
            if r.table:
                st.markdown(r.table)
            if r.error is not None:
                ui.error_box(r.error)


def _request(names: tuple[str, ...]) -> None:
    st.session_state["diag_pending"] = list(names)
    st.session_state["diag_skipped"] = []
    st.session_state["diag_confirm_emergency"] = False


def _request_all() -> None:
    """Every check; the mode switch and the emergency clear only when their boxes are ticked (they
    unload the user's models). A check left out is shown as skipped, saying why."""
    run = tuple(n for n in CHECKS if n not in OPT_IN or st.session_state.get(OPT_IN[n], False))
    _request(run)
    st.session_state["diag_skipped"] = [n for n in CHECKS if n not in run]


def _ask_emergency() -> None:
    st.session_state["diag_confirm_emergency"] = True


def _cancel_emergency() -> None:
    st.session_state["diag_confirm_emergency"] = False


def render() -> None:
    ctl = ui.controller()
    ui.init_language(ctl.settings.language)
    t = ui.tr()
    with st.sidebar:
        ui.language_switch()
    st.title(t("diag.title"))
    st.caption(t("diag.caption"))

    results: dict[str, CheckResult] = st.session_state.setdefault(RESULTS_KEY, {})
    catalog = ui.run_safely(ctl.models)
    ids = [m.model_id for m in catalog.models] if catalog is not None else []
    snap = ctl.devices()
    ui.remember_devices(snap)
    vllm_ok, _reason = ctl.vllm_status(snap)
    c1, c2 = st.columns([3, 2])
    if ids:
        c1.selectbox(t("diag.model"), ids, key="diag_model")
    else:
        c1.warning(t("diag.no_models"))
    modes = [Mode.TRANSFORMERS.value] + ([Mode.VLLM.value] if vllm_ok else [])
    c2.radio(t("controls.mode"), modes, format_func=ui.mode_label, key="diag_mode", horizontal=True)
    if not vllm_ok:
        docker = ctl.docker_status() if snap.has_gpu else (False, None)
        c2.caption(ui.vllm_unavailable_text(snap, docker))
    st.caption(t("diag.warning"))

    st.checkbox(t("diag.include_switch"), key="diag_include_switch")
    st.checkbox(t("diag.include_emergency"), key="diag_include_emergency")
    st.button(t("diag.run_all"), key="diag_run_all", type="primary", on_click=_request_all)
    # Buttons side by side at their natural width (wrapping to a new row): in five equal columns
    # the labels were cut short ("Переключение режи…").
    row = st.container(horizontal=True)
    for name in CHECKS:
        col = row
        if name in DESTRUCTIVE:  # asks first, as on the dashboard
            col.button(t(f"diag.check_{name}"), key=f"diag_run_{name}", on_click=_ask_emergency)
        else:
            col.button(t(f"diag.check_{name}"), key=f"diag_run_{name}", on_click=_request, args=((name,),))
    if st.session_state.get("diag_confirm_emergency"):
        st.warning(t("emergency.confirm_text"))
        b1, b2, _rest = st.columns([2, 1, 3])
        b1.button(t("emergency.confirm"), key="diag_emergency_confirm", type="primary", width="stretch",
                  on_click=_request, args=(DESTRUCTIVE,))
        b2.button(t("emergency.cancel"), key="diag_emergency_cancel", width="stretch", on_click=_cancel_emergency)

    pending = st.session_state.pop("diag_pending", None) or []
    for name in st.session_state.pop("diag_skipped", None) or []:
        results[name] = CheckResult("skipped", 0.0, time.time(), [t("diag.skipped_opt_in", box=t(
            "diag.include_switch" if name == "switch" else "diag.include_emergency"))])
    if pending:
        live = st.empty()  # the running checks' progress; cleared once they end, the results show below
        with live.container():
            for name in pending:
                results[name] = run_check(name, ctl, st.session_state.get("diag_model"),
                                          st.session_state.get("diag_mode", Mode.TRANSFORMERS.value))
        live.empty()
    st.subheader(t("diag.results"))
    render_results(results)


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
