"""Shared rendering for the dashboard and the diagnostic page.

Only renders and calls the controller: no torch, docker, pynvml or psutil here (ruff TID251).
Every user-visible string comes from ``config/strings.<lang>.toml`` through :func:`tr`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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
    Profile,
    ProfileBand,
    StepRecord,
    SystemSnapshot,
    UnloadReport,
)
from memory_controller.units import GIB, fmt_bytes
from pages.ui_jobs import Job, JobBoard

log = logging.getLogger("memctl.ui")

LANG_KEY = "lang"
SEEN_VERSION_KEY = "_board_version_seen"
MY_JOBS_KEY = "_my_jobs"
RECENT_RESULT_S = 300.0  # another session's finished operation is shown this long after it ended
ADVICE_KEYS = ("out_of_memory", "model_not_loading", "container_not_stopping")


# ============================================================================ shared resources
def _controller() -> Any:
    """The process-wide controller (``shared_controller``): survives Streamlit's "Clear cache",
    which would otherwise build a second controller that knows nothing of the loaded models."""
    from memory_controller.controller import shared_controller

    return shared_controller()


def controller() -> Any:
    """The one MemoryController of this process (shared by every tab and fragment).

    On invalid settings, shows the message naming the field and stops the page.
    """
    try:
        return _controller()
    except SettingsError as exc:
        settings_error(exc)
        st.stop()


def settings_error(exc: SettingsError) -> None:
    """The page shown instead of everything else when the settings do not load."""
    t = tr()
    st.title(t("app.title"))
    st.error(f"❌ **{t('app.settings_error')}**\n\n{english_label()}{exc.message}")
    if exc.hint:
        st.info(f"💡 {exc.hint}")
    st.caption(t("app.settings_error_next"))


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
    st.session_state[LANG_KEY] = st.session_state.get("_lang_widget", st.session_state.get(LANG_KEY, "ru"))


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


# ============================================================================ whose results to show
def remember_job(job: Job) -> Job:
    """Mark ``job`` as started by this session: its result is shown here until dismissed."""
    mine = st.session_state.setdefault(MY_JOBS_KEY, [])
    mine.append(job.job_id)
    del mine[:-20]
    return job


def result_is_relevant(job: Job, now: float | None = None) -> bool:
    """A finished job's result belongs on this session's page: this session started it, or it
    ended less than :data:`RECENT_RESULT_S` seconds ago (another tab's operation, just done)."""
    if job.job_id in st.session_state.get(MY_JOBS_KEY, []):
        return True
    ended = job.ended_at or job.started_at
    return (now if now is not None else time.time()) - ended < RECENT_RESULT_S


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
    _device_names[dev.key] = dev.name
    if dev.kind is DeviceKind.HOST:
        return t("device.host", name=dev.name)
    return t("device.gpu", index=dev.index, name=dev.name)


_device_names: dict[str, str] = {}  # device key → label, from the last snapshot any page painted


def remember_devices(snap: SystemSnapshot) -> None:
    """Keep each device's name so tables keyed by ``host``/``gpu:1`` can name the device."""
    for dev in snap.devices:
        _device_names[dev.key] = dev.name


def device_key_label(key: str) -> str:
    """``host`` → ``Оперативная память хоста``; ``gpu:1`` → ``GPU 1 (NVIDIA …)`` (the name when known)."""
    t = tr()
    if key in ("host", "cpu"):  # an unload report names the host "cpu"
        return t("device.host_plain")
    if key.startswith("gpu:"):
        index = key.split(":", 1)[1]
        name = _device_names.get(key)
        return t("device.gpu_named", index=index, name=name) if name else t("device.gpu_plain", index=index)
    return key


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


# ============================================================================ core texts, translated
def english_label() -> str:
    """``"Подробности (англ.): "`` before a core (English) text in a Russian UI; nothing in English."""
    t = tr()
    return "" if t.language == "en" else t("error.english") + ": "


def nvml_text(snap: SystemSnapshot) -> str:
    """Why no GPU is shown, from the NVML status (not from the English hint)."""
    t = tr()
    key = f"nvml.{snap.nvml_status.value}"
    return t(key) if t.has(key) else snap.nvml_status.value


def docker_text(reason: str | None) -> str:
    """Docker is unavailable: a Russian sentence by the kind of failure; the engine's words go to details."""
    t = tr()
    low = (reason or "").lower()
    if "package is missing" in low or "no module named" in low:
        return t("docker.no_package")
    if "permission" in low:
        return t("docker.no_permission")
    return t("docker.not_running")


def vllm_unavailable_text(snap: SystemSnapshot, docker: tuple[bool, str | None]) -> str:
    """``vLLM недоступен: …`` built from the snapshot and the Docker status, not the core's English."""
    t = tr()
    if not snap.has_gpu:
        return t("controls.vllm_no_gpu", why=nvml_text(snap))
    if not docker[0]:
        return t("controls.vllm_no_docker", why=docker_text(docker[1]))
    return ""


def band_title(name: str, bands: tuple[ProfileBand, ...]) -> str:
    """The guide's heading of the band called ``name`` (never the internal id), else the id."""
    band = next((b for b in bands if b.name == name), None)
    return band_heading(band, bands) if band is not None else name


def profile_text(profile: Profile) -> str:
    """``Transformers, BF16 (CPU), 1024 токена, батч 1``."""
    t = tr()
    where = " (CPU)" if profile.device == "cpu" else ""
    return t("rec.profile_text", mode=mode_label(profile.mode), precision=profile.precision.value.upper() + where,
             tokens=t.count("unit.tokens", profile.context_tokens), batch=profile.batch)


def note_text(code: str, bands: tuple[ProfileBand, ...] = ()) -> str:
    """A recommendation note code (``cpu_half_precision:bf16``) as a sentence of this language."""
    t = tr()
    name, *args = code.split(":")
    key = f"note.{name}"
    if not t.has(key):
        return code
    fields: dict[str, Any] = {}
    if name == "vllm_unavailable_fallback" and len(args) == 2:
        fields = {"table": band_title(args[0], bands), "instead": band_title(args[1], bands)}
    elif name == "cpu_half_precision" and args:
        fields = {"precision": args[0].upper()}
    elif name == "fit_precision" and len(args) == 2:
        fields = {"old": args[0].upper(), "new": args[1].upper()}
    elif name == "fit_context" and args:
        fields = {"tokens": t.count("unit.tokens", int(args[0])) if args[0].isdigit() else args[0]}
    return t(key, **fields)


_CONTEXT_BLOCKER = re.compile(r"context (\d+) exceeds the model's maximum (\d+) tokens")


def blocker_text(blocker: str, snap: SystemSnapshot | None = None,
                 docker: tuple[bool, str | None] | None = None) -> str:
    """A plan's blocker in this language (the two the controller gives), else the core's text."""
    t = tr()
    m = _CONTEXT_BLOCKER.search(blocker)
    if m:
        return t("plan.blocker_context", context=m.group(1), maximum=t.count("unit.tokens", int(m.group(2))))
    if blocker.startswith("vLLM is unavailable") and snap is not None and docker is not None:
        text = vllm_unavailable_text(snap, docker)
        if text:
            return text
    return f"{english_label()}{blocker}"


def error_headline(err: BaseException) -> str:
    """The error's headline in this language, from its class (nearest known ancestor) or advice."""
    t = tr()
    for cls in type(err).__mro__:
        key = f"errors.{cls.__name__}"
        if t.has(key):
            return t(key)
    advice = getattr(err, "advice_key", None)
    if advice in ADVICE_KEYS:
        return t(f"advice.{advice}.problem")
    return t("errors.generic")


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
    util_help = t("metrics.util_help_host") if dev.kind is DeviceKind.HOST else t("metrics.util_help_gpu")
    # One per row: in the sidebar's width two columns cut "23.54 GiB" to "23.5…".
    st.metric(t(total_key), gib(dev.total_bytes))
    st.metric(t("metrics.used"), gib(dev.used_bytes))
    st.metric(t("metrics.free"), gib(dev.free_bytes))
    st.metric(t("metrics.util"), util, help=util_help)
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
        headline = error_headline(err)
    else:
        log.error("unexpected error in the UI: %r", err, exc_info=err)
        message, hint, advice = str(err) or type(err).__name__, None, None
        details = None
        headline = t("error.unexpected_headline")
    head = f"{context}: {headline}" if context else headline
    # The headline is in the page's language; the core's own words (English) follow as details.
    st.error(f"❌ **{head}**\n\n{english_label()}{message}")
    if hint:
        st.info(f"💡 {english_label()}{hint}")
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
def steps_table(steps: Iterable[StepRecord], memory_before: dict[str, int | None] | None = None,
                memory_after: dict[str, int | None] | None = None) -> None:
    """The steps with outcome, time, memory before → after and the step's own (English) message.

    When no step measured memory (the emergency clear), the column is left out and the whole
    operation's ``memory_before``/``memory_after`` (device key → used bytes) is shown under the table.
    """
    t = tr()
    steps = list(steps)
    if not steps:
        return
    per_step = any(s.memory_before_bytes is not None or s.memory_after_bytes is not None for s in steps)
    if per_step:
        rows = [f"| | {t('log.step')} | {t('log.duration')} | {t('log.memory')} | {t('log.message')} |",
                "|---|---|---|---|---|"]
    else:
        rows = [f"| | {t('log.step')} | {t('log.duration')} | {t('log.message')} |", "|---|---|---|---|"]
    for s in steps:
        cells = [s.outcome.emoji, step_label(s.name), fmt_duration(s.duration_s)]
        if per_step:
            mem = "—"
            if s.memory_before_bytes is not None or s.memory_after_bytes is not None:
                mem = f"{gib(s.memory_before_bytes)} → {gib(s.memory_after_bytes)}"
            cells.append(mem)
        cells.append(_cell(s.message))
        rows.append("| " + " | ".join(cells) + " |")
    st.markdown("\n".join(rows))
    if not per_step and memory_before:
        change = memory_change_text(memory_before, memory_after or {})
        if change:
            st.caption(t("log.memory_change", change=change))


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def memory_change(record: OperationRecord) -> str:
    """``host: 3.10 GiB → 3.40 GiB`` for each device whose used memory is known."""
    return memory_change_text(record.memory_before, record.memory_after)


def memory_change_text(memory_before: dict[str, int | None], memory_after: dict[str, int | None]) -> str:
    """``host: 3.10 GiB → 3.40 GiB`` from two {device key: used bytes} maps."""
    parts = []
    for key, before in memory_before.items():
        after = memory_after.get(key)
        if before is None and after is None:
            continue
        parts.append(f"{device_key_label(key)}: {gib(before)} → {gib(after)}")
    return "; ".join(parts)


def unload_report_text(rep: UnloadReport) -> str:
    """``✅ Выгружено: model — 270 KiB из 270 KiB вернулось, удерживается 0 B (…)``, from the report's numbers."""
    t = tr()
    measure = t(f"unload.measure_{rep.measure}") if t.has(f"unload.measure_{rep.measure}") else rep.measure
    return t("unload.report", emoji=rep.verdict.emoji, model=rep.model_id, freed=gib(rep.freed_bytes),
             held=gib(rep.still_held_bytes), expected=gib(rep.expected_bytes),
             device=device_key_label(rep.device), measure=measure)


def unload_report(rep: UnloadReport) -> None:
    show = {Outcome.SUCCESS: st.success, Outcome.WARNING: st.warning, Outcome.ERROR: st.error}[rep.verdict]
    show(unload_report_text(rep))
    if rep.message:  # the controller's own (English) account, under the Russian headline
        st.caption(f"{english_label()}{rep.message}")


def clear_report(rep: Any) -> None:
    t = tr()
    rows = [f"| {t('clear.device')} | {t('clear.before')} | {t('clear.after')} | {t('clear.freed')} |",
            "|---|---|---|---|"]
    freed = rep.freed
    for key, before in rep.before.items():
        rows.append(f"| {device_key_label(key)} | {gib(before)} | {gib(rep.after.get(key))} | {freed_text(freed.get(key))} |")
    st.success(t("clear.done"))
    st.markdown("\n".join(rows))
    actions = [k for k, v in (rep.actions or {}).items() if v]
    if actions:
        st.caption(t("clear.actions", actions=", ".join(actions)))


def freed_text(freed_bytes: int | None) -> str:
    """Freed memory for a table: ``12 MiB``; ``не изменилось`` when it did not go down (≤ 0)."""
    if freed_bytes is None:
        return "—"
    return gib(freed_bytes) if freed_bytes > 0 else tr()("clear.unchanged")


def used_by_device(snap: SystemSnapshot) -> dict[str, int | None]:
    """{device key: used bytes} of a snapshot."""
    return {d.key: d.used_bytes for d in snap.devices}


@dataclass
class EmergencyResult:
    """The emergency clear's report plus used memory per device before and after it (the report's
    steps measure none)."""

    report: Any
    memory_before: dict[str, int | None] = field(default_factory=dict)
    memory_after: dict[str, int | None] = field(default_factory=dict)

    @property
    def outcome(self) -> Outcome:
        return self.report.outcome


def run_emergency(ctl: Any) -> EmergencyResult:
    """``ctl.emergency_clear()`` with used memory read before and after (on the caller's thread)."""
    try:
        before = used_by_device(ctl.devices())
    except Exception:  # noqa: BLE001 - the clear must run even when the probe fails
        before = {}
    rep = ctl.emergency_clear()
    try:
        after = used_by_device(ctl.devices())
    except Exception:  # noqa: BLE001
        after = {}
    return EmergencyResult(rep, before, after)


def emergency_report(res: Any) -> None:
    t = tr()
    rep = res.report if isinstance(res, EmergencyResult) else res
    if rep.outcome is Outcome.SUCCESS:
        st.success(t("emergency.done"))
    else:
        st.warning(t("emergency.partial"))
        advice_block("container_not_stopping")
    if rep.cancelled_operation:
        st.caption(t("emergency.cancelled", op=rep.cancelled_operation))
    if isinstance(res, EmergencyResult):
        steps_table(rep.steps, res.memory_before, res.memory_after)
    else:
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
        parts.append(f"{prof.precision.value.upper()}, {t.count('unit.tokens', prof.context_tokens)}, "
                     f"{t('rec.batch_inline', batch=prof.batch)}")
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
