"""Shared rendering for the dashboard and the diagnostic page.

Only renders and calls the controller: no torch, docker, pynvml or psutil here (ruff TID251).
Every user-visible string comes from ``config/strings.<lang>.toml`` through :func:`tr`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import streamlit as st

from memory_controller.errors import MemctlError, SettingsError
from memory_controller.i18n import LANGUAGE_NAMES, LANGUAGES, Translator
from memory_controller.types import (
    DeviceKind,
    DeviceSnapshot,
    Level,
    LoadedModel,
    OperationRecord,
    Outcome,
    Precision,
    ProfileBand,
    StepRecord,
    UnloadReport,
)
from memory_controller.units import GIB, fmt_bytes
from pages.ui_jobs import Job, JobBoard

log = logging.getLogger("memctl.ui")

LANG_KEY = "lang"
SEEN_VERSION_KEY = "_board_version_seen"
ADVICE_KEYS = ("out_of_memory", "model_not_loading", "container_not_stopping")


# ============================================================================ shared resources
@st.cache_resource(show_spinner=False)
def _controller() -> Any:
    from memory_controller.controller import MemoryController

    return MemoryController()


def controller() -> Any:
    """The one MemoryController of this process (shared by every tab and fragment).

    On invalid settings, shows the message naming the field and stops the page.
    """
    try:
        return _controller()
    except SettingsError as exc:
        t = tr()
        st.error(f"❌ {t('app.settings_error')}: {exc.message}")
        if exc.hint:
            st.info(f"💡 {exc.hint}")
        st.stop()


@st.cache_resource(show_spinner=False)
def jobs() -> JobBoard:
    """The process-wide board of operations started from the UI."""
    return JobBoard()


_chart_ready = threading.Event()
_chart_started = threading.Lock()


def warm_chart_libraries() -> None:
    """Import altair/pandas/pyarrow (about 1.5 s cold) on a background thread, once per process.

    Called after the first paint, not before: the import competes with the page for the GIL.
    """
    if not _chart_started.acquire(blocking=False):
        return

    def load() -> None:
        try:
            import altair  # noqa: F401
            import pandas  # noqa: F401
            import pyarrow  # noqa: F401
        finally:
            _chart_ready.set()

    threading.Thread(target=load, name="memctl-ui-chart-import", daemon=True).start()


def chart_libraries_ready() -> bool:
    """True once the chart's libraries are imported: until then the live panel draws no chart, so
    neither the first paint nor a fragment tick waits seconds for an import."""
    return _chart_ready.is_set()


# ============================================================================ language
def init_language(default: str | None = None) -> None:
    """Set this session's language once: the settings' language, else Russian."""
    if LANG_KEY not in st.session_state:
        st.session_state[LANG_KEY] = default if default in LANGUAGES else "ru"


def tr() -> Translator:
    """The translator for this session's language."""
    lang = st.session_state.get(LANG_KEY, "ru") if _has_session() else "ru"
    return _translator(lang)


def _translator(lang: str) -> Translator:
    return Translator(lang)


def _has_session() -> bool:
    try:
        from streamlit.runtime.scriptrunner import get_script_run_ctx

        return get_script_run_ctx() is not None
    except Exception:  # noqa: BLE001
        return False


def _on_language_change() -> None:
    st.session_state[LANG_KEY] = st.session_state["_lang_widget"]


def language_switch() -> None:
    """Русский / English selector (per session)."""
    t = tr()
    current = st.session_state.get(LANG_KEY, "ru")
    st.session_state["_lang_widget"] = current
    st.radio(
        t("app.language"), list(LANGUAGES), format_func=lambda code: LANGUAGE_NAMES[code],
        key="_lang_widget", horizontal=True, on_change=_on_language_change,
    )


# ============================================================================ board → reruns
def mark_board_seen() -> None:
    """Remember the board version this full run paints (see :func:`rerun_if_board_changed`)."""
    st.session_state[SEEN_VERSION_KEY] = jobs().version


def rerun_if_board_changed() -> None:
    """From a fragment: a job started or ended since the last full run → rerun the whole page."""
    if st.session_state.get(SEEN_VERSION_KEY) != jobs().version:
        st.rerun()


# ============================================================================ formatting
def gib(n_bytes: int | None) -> str:
    return fmt_bytes(n_bytes)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 120:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_time(ts: float | None) -> str:
    return "—" if not ts else time.strftime("%H:%M:%S", time.localtime(ts))


def gib_number(n_bytes: int) -> str:
    """A threshold as the guide writes it: ``8``, ``2.5``."""
    value = n_bytes / GIB
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.1f}"


def device_label(dev: DeviceSnapshot) -> str:
    t = tr()
    if dev.kind is DeviceKind.HOST:
        return t("device.host", name=dev.name)
    return t("device.gpu", index=dev.index, name=dev.name)


def precision_label(p: Precision | str) -> str:
    return tr()(f"precision.{Precision(p).value}")


def mode_label(mode: Any) -> str:
    value = getattr(mode, "value", mode)
    return tr()(f"mode.{value}")


def step_label(name: str) -> str:
    t = tr()
    key = f"step.{name}"
    return t(key) if t.has(key) else name


def outcome_emoji(outcome: Outcome | None) -> str:
    return outcome.emoji if outcome is not None else "⏳"


# ============================================================================ memory panel pieces
def level_badge(level: Level, settings: Any) -> str:
    """``🟢 **Зеленый** — достаточно памяти (4+ GB)`` with the thresholds from settings."""
    t = tr()
    return t(f"level.{level.value}", green=gib_number(settings.green_min_bytes),
             yellow=gib_number(settings.yellow_min_bytes))


def device_metrics(dev: DeviceSnapshot, level: Level, settings: Any) -> None:
    """The guide's four figures for one device, then the colour indicator."""
    t = tr()
    total_key = "metrics.total_host" if dev.kind is DeviceKind.HOST else "metrics.total_gpu"
    util = "—" if dev.utilization_pct is None else f"{dev.utilization_pct:.0f}%"
    # One per row: in the sidebar's width two columns cut "23.54 GiB" to "23.5…".
    st.metric(t(total_key), gib(dev.total_bytes))
    st.metric(t("metrics.used"), gib(dev.used_bytes))
    st.metric(t("metrics.free"), gib(dev.free_bytes))
    st.metric(t("metrics.util"), util)
    st.markdown(level_badge(level, settings))
    if dev.hint:
        st.caption(f"ℹ️ {dev.hint}")


# ============================================================================ errors
def advice_for_error_text(kind: str, error: str | None) -> str | None:
    """The guide's troubleshooting entry for a logged error (the log keeps only its text)."""
    if not error:
        return None
    low = error.lower()
    if "would be free" in low or "out of memory" in low or "not enough memory" in low:
        return "out_of_memory"
    if kind in ("stop_container", "emergency_clear") or "container" in low or "docker" in low:
        return "container_not_stopping"
    if kind == "apply":
        return "model_not_loading"
    return None


def advice_block(advice_key: str | None) -> None:
    """The guide's "Решение проблем" entry, numbered as in the guide."""
    if advice_key not in ADVICE_KEYS:
        return
    t = tr()
    steps = t.raw(f"advice.{advice_key}.steps")
    lines = [f"**{t('advice.heading', problem=t(f'advice.{advice_key}.problem'))}** — {t('advice.solution')}"]
    if isinstance(steps, list):
        lines += [f"{i}. {s}" for i, s in enumerate(steps, start=1)]
    st.warning("\n".join(lines), icon="🔧")


def error_box(err: BaseException, *, context: str | None = None) -> None:
    """Message + hint + the guide's advice + details in an expander. Never a traceback."""
    t = tr()
    if isinstance(err, MemctlError):
        message, hint, advice = err.message, err.hint, err.advice_key
        details = err.details
    else:
        log.error("unexpected error in the UI: %r", err, exc_info=err)
        message, hint, advice = t("error.unexpected", error=str(err) or type(err).__name__), None, None
        details = None
    head = f"{context}: {message}" if context else message
    st.error(f"❌ {head}")
    if hint:
        st.info(f"💡 {hint}")
    advice_block(advice)
    record = getattr(err, "operation", None)
    with st.expander(t("error.details")):
        st.markdown(f"`{type(err).__name__}`")
        if details:
            st.code(details, language=None)
        log_tail = getattr(err, "log_tail", None)
        if log_tail:
            st.code("\n".join(log_tail[-20:]), language=None)
        if isinstance(record, OperationRecord):
            steps_table(record.steps)


# ============================================================================ operations
def steps_table(steps: Iterable[StepRecord]) -> None:
    t = tr()
    rows = [f"| | {t('log.step')} | {t('log.duration')} | {t('log.memory')} | {t('log.message')} |",
            "|---|---|---|---|---|"]
    for s in steps:
        mem = "—"
        if s.memory_before_bytes is not None or s.memory_after_bytes is not None:
            mem = f"{gib(s.memory_before_bytes)} → {gib(s.memory_after_bytes)}"
        rows.append(f"| {s.outcome.emoji} | {step_label(s.name)} | {fmt_duration(s.duration_s)} | {mem} | "
                    f"{_cell(s.message)} |")
    if len(rows) > 2:
        st.markdown("\n".join(rows))


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def memory_change(record: OperationRecord) -> str:
    """``host: 3.10 GiB → 3.40 GiB`` for each device whose used memory is known."""
    parts = []
    for key, before in record.memory_before.items():
        after = record.memory_after.get(key)
        if before is None and after is None:
            continue
        parts.append(f"{key}: {gib(before)} → {gib(after)}")
    return "; ".join(parts)


def unload_report(rep: UnloadReport) -> None:
    t = tr()
    text = t("unload.report", emoji=rep.verdict.emoji, model=rep.model_id, freed=gib(rep.freed_bytes),
             held=gib(rep.still_held_bytes), expected=gib(rep.expected_bytes), device=rep.device,
             measure=t(f"unload.measure_{rep.measure}") if t.has(f"unload.measure_{rep.measure}") else rep.measure)
    show = {Outcome.SUCCESS: st.success, Outcome.WARNING: st.warning, Outcome.ERROR: st.error}[rep.verdict]
    show(text)
    if rep.message:
        st.caption(rep.message)


def clear_report(rep: Any) -> None:
    t = tr()
    rows = [f"| {t('clear.device')} | {t('clear.before')} | {t('clear.after')} | {t('clear.freed')} |",
            "|---|---|---|---|"]
    freed = rep.freed
    for key, before in rep.before.items():
        rows.append(f"| {key} | {gib(before)} | {gib(rep.after.get(key))} | {gib(freed.get(key))} |")
    st.success(t("clear.done"))
    st.markdown("\n".join(rows))
    actions = [k for k, v in (rep.actions or {}).items() if v]
    if actions:
        st.caption(t("clear.actions", actions=", ".join(actions)))


def emergency_report(rep: Any) -> None:
    t = tr()
    if rep.outcome is Outcome.SUCCESS:
        st.success(t("emergency.done"))
    else:
        st.warning(t("emergency.partial"))
        advice_block("container_not_stopping")
    if rep.cancelled_operation:
        st.caption(t("emergency.cancelled", op=rep.cancelled_operation))
    steps_table(rep.steps)


def apply_result(record: OperationRecord) -> None:
    t = tr()
    model = record.params.get("model", "?")
    mode = mode_label(record.params.get("mode", ""))
    if any(s.name == "noop" for s in record.steps):
        st.info(t("apply.noop", model=model))
    elif record.outcome is Outcome.WARNING:
        st.warning(t("apply.done_warning", model=model, mode=mode))
    else:
        st.success(t("apply.done", model=model, mode=mode))
    steps_table(record.steps)
    change = memory_change(record)
    if change:
        st.caption(t("log.memory_change", change=change))


def job_result(job: Job) -> None:
    """What a finished job produced, or its error with the guide's advice."""
    t = tr()
    if job.error is not None:
        error_box(job.error)
        return
    res = job.result
    if job.kind == "apply" and isinstance(res, OperationRecord):
        apply_result(res)
    elif job.kind == "unload" and isinstance(res, UnloadReport):
        unload_report(res)
    elif job.kind == "clear":
        clear_report(res)
    elif job.kind == "emergency":
        emergency_report(res)
    elif job.kind == "stop":
        st.success(t("containers.stopped", name=job.params.get("name", "?")))
    elif res is not None:
        st.write(res)


def job_events(job: Job, box: Any) -> None:
    """Each step once, with its latest message: ⏳ while running, ✅ when it reported its end."""
    order: list[str] = []
    latest: dict[str, Any] = {}
    for ev in job.events():
        if ev.stage not in latest:
            order.append(ev.stage)
        latest[ev.stage] = ev
    for stage in order:
        ev = latest[stage]
        finished = ev.fraction is not None and ev.fraction >= 1.0
        icon = "✅" if finished else ("⏳" if job.running else "•")
        took = f" ({fmt_duration(ev.elapsed_s)})" if finished and ev.elapsed_s is not None else ""
        pct = f" {ev.fraction * 100:.0f}%" if ev.fraction not in (None, 0.0, 1.0) and not finished else ""
        box.markdown(f"{icon} **{step_label(stage)}**{pct} — {_cell(ev.message)}{took}")


def job_status(job: Job, *, expanded: bool = True) -> None:
    """One job inside ``st.status``: running, complete or error, its steps, then its result."""
    t = tr()
    if job.running:
        state, icon = "running", "⏳"
    elif job.error is not None:
        state, icon = "error", "❌"
    else:
        outcome = getattr(job.result, "outcome", None)
        state, icon = "complete", (outcome.emoji if isinstance(outcome, Outcome) else "✅")
    title = t(f"ops.{job.kind}", **job.params) if t.has(f"ops.{job.kind}") else job.title
    label = t("ops.status_label", icon=icon, title=title, started=fmt_time(job.started_at),
              elapsed=fmt_duration(job.elapsed_s))
    if job.running:
        # Not as a context manager: leaving ``with st.status(...)`` marks a running status complete.
        box = st.status(label, state=state, expanded=expanded)
        job_events(job, box)
        return
    with st.status(label, state=state, expanded=expanded):
        job_result(job)  # the result carries the recorded steps (outcome, duration, memory before/after)


# ============================================================================ recommendation card
def band_heading(band: ProfileBand, bands: tuple[ProfileBand, ...]) -> str:
    """The guide's headings: "При 8+ GB…", "При 6-8 GB…", "При менее 4 GB"."""
    t = tr()
    ordered = sorted(bands, key=lambda b: b.min_free_bytes, reverse=True)
    i = ordered.index(band)
    upper = ordered[i - 1].min_free_bytes if i > 0 else None
    if upper is None:
        return t("rec.heading_top", low=gib_number(band.min_free_bytes))
    if band.min_free_bytes == 0:
        return t("rec.heading_bottom", high=gib_number(upper))
    return t("rec.heading_mid", low=gib_number(band.min_free_bytes), high=gib_number(upper))


def band_icon(band: ProfileBand) -> str:
    """✅ full vLLM, ⚠️ a limited band, 🔧 Transformers: the guide's marks."""
    if band.limited:
        return "⚠️"
    return "✅" if band.mode.value == "vllm" else "🔧"


def band_lines(band: ProfileBand) -> list[str]:
    t = tr()
    icon = band_icon(band)
    mode = t(f"rec.mode_{band.mode.value}")
    if band.limited and band.mode.value == "vllm":
        mode += " " + t("rec.limited")
    precision_key = "rec.quantization" if band.precision.is_quantized else "rec.precision"
    return [
        f"{icon} **{mode}**",
        f"{icon} {t(precision_key, precision=band.precision.value.upper())}",
        f"{icon} {t.count('unit.tokens', band.context_tokens)}",
        f"{icon} {t('rec.batch', batch=band.batch)}",
    ]


def loaded_row_text(lm: LoadedModel) -> str:
    t = tr()
    prof = lm.profile
    parts = [f"**{lm.model_id}**", lm.device, gib(lm.footprint_bytes)]
    if prof is not None:
        parts.append(f"{prof.precision.value}, {t.count('unit.tokens', prof.context_tokens)}, "
                     f"{t('rec.batch', batch=prof.batch)}")
    if lm.loaded_at:
        parts.append(t("loaded.since", time=fmt_time(lm.loaded_at)))
    return " · ".join(parts)


def run_safely(fn: Callable[[], Any], *, context: str | None = None) -> Any:
    """Call ``fn``; on any error show :func:`error_box` and return None (never a traceback)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - every failure is shown as an error box
        error_box(exc, context=context)
        return None
