"""The dashboard page: sidebar "🔧 Управление режимами и памятью" and the main monitoring area.

Layout follows the user's guide (seeds/memory-control-guide.ru.md). One fragment reruns on the
timer: the live panel (chart + processes), which also refreshes the sidebar's memory figures; a
second one polls a running operation every half second and is idle otherwise. Operations run on worker
threads (pages/ui_jobs.py), so a long apply never freezes the live panel.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import streamlit as st

from memory_controller.recommend import band_for
from memory_controller.types import (
    CachedModel,
    DeviceKind,
    DeviceSnapshot,
    LoadedModel,
    Mode,
    Precision,
    Profile,
    SystemSnapshot,
)
from pages import ui_common as ui

ctl = ui.controller()
board = ui.jobs()
ui.mark_board_seen()
POLL_S = float(ctl.settings.poll_interval_s)
# The profile fields' allowed ranges: a value outside is shown as an error and blocks Apply
# (the inputs themselves take any number, so a typed value is never silently dropped).
CONTEXT_RANGE = (16, 1_048_576)
BATCH_RANGE = (1, 256)


# ============================================================================ actions (callbacks)
def _start_apply(mode: str, model: CachedModel, profile: Profile, force: bool) -> None:
    c = ui.controller()
    ui.remember_job(ui.jobs().start(
        "apply", f"apply {mode} {model.model_id}",
        lambda progress: c.apply(mode, model, profile, force=force, progress=progress),
        {"model": model.model_id, "mode": ui.mode_label(mode)},
    ))


def _start_unload(model_id: str) -> None:
    c = ui.controller()
    ui.remember_job(ui.jobs().start("unload", f"unload {model_id}", lambda _p: c.unload(model_id),
                                    {"model": model_id}))


def _start_stop(name: str) -> None:
    c = ui.controller()
    ui.remember_job(ui.jobs().start("stop", f"stop {name}", lambda _p: c.stop_container(name), {"name": name}))


def _start_clear() -> None:
    c = ui.controller()
    ui.remember_job(ui.jobs().start("clear", "clear memory", lambda _p: c.clear_memory(), {}))


def _ask_emergency() -> None:
    st.session_state["confirm_emergency"] = True


def _cancel_emergency() -> None:
    st.session_state["confirm_emergency"] = False


def _start_emergency() -> None:
    st.session_state["confirm_emergency"] = False
    c = ui.controller()
    ui.remember_job(ui.jobs().start("emergency", "emergency clear", lambda _p: ui.run_emergency(c), {}))


def _reset_profile() -> None:
    st.session_state.pop("_prefill_for", None)


def _dismiss(job_id: str) -> None:
    st.session_state["_dismissed_job"] = job_id


# ============================================================================ helpers
def _matches_device(lm: LoadedModel, dev: DeviceSnapshot) -> bool:
    if lm.backend != "transformers":
        return False
    if dev.kind is DeviceKind.HOST:
        return lm.device == "cpu"
    return str(dev.index) in lm.device.replace("cuda:", "").split(",")


def _fit_verdict(model: CachedModel, profile: Profile, available_bytes: int | None) -> tuple[str, int | None]:
    """(✅/❌/⚠️ text, needed bytes) of ``model`` under ``profile`` against ``available_bytes``."""
    t = ui.tr()
    try:
        needed = ctl.estimate(model, profile).total_bytes
    except Exception:  # noqa: BLE001 - a corrupt entry gets a mark, the details show on apply
        return t("fit.unknown"), None
    if available_bytes is None:
        return t("fit.unknown"), needed
    return (t("fit.yes") if needed <= available_bytes else t("fit.no")), needed


def _field_errors() -> list[str]:
    """What is wrong with the context and batch fields (empty when both are in range)."""
    t = ui.tr()
    errors = []
    for key, label, (low, high) in (("f_context", "controls.context", CONTEXT_RANGE),
                                    ("f_batch", "controls.batch", BATCH_RANGE)):
        value = st.session_state.get(key)
        if value is None or not low <= value <= high or value != int(value):
            errors.append(t("controls.out_of_range", field=t(label), value="—" if value is None else value,
                            low=low, high=high))
    return errors


def _profile_from_fields(mode: Mode, dev: DeviceSnapshot) -> Profile:
    precision = Precision(st.session_state["f_precision"])
    return Profile(
        mode=mode,
        precision=precision,
        context_tokens=int(st.session_state["f_context"]),
        batch=int(st.session_state["f_batch"]),
        double_quant=precision.is_4bit,
        device="cpu" if dev.kind is DeviceKind.HOST else "cuda",
        gpu_ids=None if dev.index is None else (dev.index,),
    )


def _prefill(model: CachedModel | None, dev: DeviceSnapshot, mode: Mode, snap: SystemSnapshot) -> None:
    """Fill precision/context/batch from the recommendation when model, device or mode changed."""
    key = f"{model.model_id if model else ''}|{dev.key}|{mode.value}"
    if st.session_state.get("_prefill_for") == key and "f_precision" in st.session_state:
        return
    rec = None
    problem: str | None = None
    if model is not None:
        try:
            rec = ctl.recommend(model=model, device_key=dev.key, snapshot=snap)
        except Exception as exc:  # noqa: BLE001 - shown under the fields; the table's profile is used
            problem = str(exc)
    if rec is None:
        rec = ctl.recommend(device_key=dev.key, snapshot=snap)
    st.session_state["f_precision"] = rec.profile.precision.value
    st.session_state["f_context"] = int(rec.profile.context_tokens)
    st.session_state["f_batch"] = int(rec.profile.batch)
    st.session_state["_prefill_for"] = key
    st.session_state["_prefill_codes"] = list(rec.note_codes)  # rendered in the page's language
    st.session_state["_prefill_problem"] = problem
    st.session_state["_prefill_values"] = (rec.profile.precision.value, int(rec.profile.context_tokens),
                                           int(rec.profile.batch))


def _fields_as_prefilled() -> bool:
    """True while precision, context and batch still hold the recommendation's values."""
    now = (st.session_state.get("f_precision"), st.session_state.get("f_context"), st.session_state.get("f_batch"))
    return st.session_state.get("_prefill_values") == now


def _sentence(text: str) -> str:
    """``text`` with its first letter capitalised (notes are written to follow a comma)."""
    return text[:1].upper() + text[1:]


# ============================================================================ fragments
@st.fragment(run_every=POLL_S)
def live_panel(device_key: str, sidebar_box: Any) -> None:
    """The only part that reruns on the timer: one probe per tick feeds the sidebar's four figures
    and colour (written into ``sidebar_box``, a container the full run placed in the sidebar) and,
    here, the used/free chart over the last minutes, the processes holding memory, what runs now."""
    t0 = time.perf_counter()
    ui.rerun_if_board_changed()
    t = ui.tr()
    snap = ctl.devices()
    dev = snap.device(device_key) or snap.host
    with sidebar_box:
        ui.device_metrics(dev, ctl.level(dev), ctl.settings)
    st.subheader(t("live.title"))
    st.caption(t("live.updated", time=ui.fmt_time(snap.taken_at), device=ui.device_label(dev), every=f"{POLL_S:g}"))
    op = ctl.current_operation()
    if op is not None:
        ev = op.get("last_event")
        kind = op["kind"]
        st.info(t("live.running", kind=t(f"opkind.{kind}") if t.has(f"opkind.{kind}") else kind,
                  description=op["description"], since=ui.fmt_time(op["started_at"]),
                  step=ui.step_label(ev.stage) if ev is not None else "…"))
        if ev is not None and getattr(ev, "message", None):  # the backend's own (English) progress
            st.caption(f"{ui.english_label()}{ev.message}")
    _chart(device_key)
    _processes(dev)
    st.session_state["_perf_live_panel_s"] = time.perf_counter() - t0


CHART_MAX_POINTS = 120  # per series: the browser redraws every tick, keep it light


@functools.lru_cache(maxsize=8)
def _chart_spec(used_label: str, free_label: str) -> dict[str, Any]:
    """The chart's Vega-Lite spec, built and validated by altair once (per language); no data in it."""
    import altair as alt

    chart = (
        alt.Chart(alt.Data(values=[{"t": 0, "series": used_label, "gib": 0.0}]))
        .mark_area(opacity=0.75)
        .encode(
            x=alt.X("t:T", title=None, axis=alt.Axis(format="%H:%M:%S")),
            y=alt.Y("gib:Q", title="GiB", stack=True),
            color=alt.Color("series:N", title=None,
                            scale=alt.Scale(domain=[used_label, free_label], range=["#e4572e", "#76b041"])),
            order=alt.Order("series:N"),
            tooltip=[alt.Tooltip("t:T", format="%H:%M:%S"), alt.Tooltip("series:N"),
                     alt.Tooltip("gib:Q", format=".2f")],
        )
        .properties(height=220)
    )
    spec = chart.to_dict()
    spec.pop("data", None)
    spec.pop("datasets", None)
    return spec


def _chart(device_key: str) -> None:
    """Used and free memory of the device over the last minutes (stacked: together they are the total)."""
    t = ui.tr()
    samples = [(ts, values[device_key]) for ts, values in ctl.memory_history() if device_key in values]
    if len(samples) < 2 or not ui.chart_libraries_ready():
        st.caption(t("live.collecting"))
        return
    step = max(1, -(-len(samples) // CHART_MAX_POINTS))
    picked = samples[::-1][::step][::-1]  # keep the newest sample, thin the older ones evenly
    used_label, free_label = t("live.series_used"), t("live.series_free")
    rows: list[dict[str, Any]] = []
    for ts, (used, free) in picked:
        stamp = int(ts * 1000)
        if used is not None:
            rows.append({"t": stamp, "series": used_label, "gib": round(used / ui.GIB, 3)})
        if free is not None:
            rows.append({"t": stamp, "series": free_label, "gib": round(free / ui.GIB, 3)})
    st.vega_lite_chart(rows, dict(_chart_spec(used_label, free_label)), width="stretch")


def _processes(dev: DeviceSnapshot) -> None:
    t = ui.tr()
    st.markdown(f"**{t('live.processes')}**")
    if not dev.processes:
        st.caption(t("live.no_processes"))
        return
    rows = [f"| PID | {t('live.process')} | {t('live.process_memory')} |", "|---|---|---|"]
    rows += [f"| {p.pid} | {p.name or '—'} | {ui.gib(p.used_bytes)} |" for p in dev.processes]
    st.markdown("\n".join(rows))


def op_panel() -> None:
    """Running operations in ``st.status`` (polled every 0.5 s while one runs), then the last result."""
    every = 0.5 if board.running() else None

    @st.fragment(run_every=every)
    def _panel() -> None:
        ui.rerun_if_board_changed()
        t = ui.tr()
        for job in board.running():
            ui.job_status(job)
        finished = board.finished(1)
        # Only this session's own result, or another tab's that just ended: never a stale one.
        if (finished and finished[0].job_id != st.session_state.get("_dismissed_job")
                and ui.result_is_relevant(finished[0])):
            job = finished[0]
            ui.job_status(job)
            st.button(t("ops.dismiss"), key=f"dismiss::{job.job_id}", on_click=_dismiss, args=(job.job_id,))

    _panel()


# ============================================================================ sidebar
def sidebar(snap: SystemSnapshot, dev: DeviceSnapshot, models: tuple[CachedModel, ...],
            loaded: list[LoadedModel], busy: bool) -> tuple[Mode, CachedModel | None, Profile | None]:
    t = ui.tr()
    vllm_ok, _reason = ctl.vllm_status(snap)
    docker = ctl.docker_status() if snap.has_gpu else (False, None)

    # mode
    if not vllm_ok:
        st.session_state["f_mode"] = Mode.TRANSFORMERS.value
    elif st.session_state.get("f_mode") not in (Mode.VLLM.value, Mode.TRANSFORMERS.value):
        st.session_state["f_mode"] = ctl.recommend(device_key=dev.key, snapshot=snap).profile.mode.value
    st.radio(t("controls.mode"), [Mode.VLLM.value, Mode.TRANSFORMERS.value], format_func=ui.mode_label,
             key="f_mode", horizontal=True, disabled=not vllm_ok)
    if not vllm_ok:
        st.caption(ui.vllm_unavailable_text(snap, docker))
    mode = Mode(st.session_state["f_mode"])

    # model (chosen id first: the profile is prefilled for it before the fit marks are computed)
    by_id = {m.model_id: m for m in models}
    if not models:
        st.warning(t("controls.no_models"))
        model = None
    else:
        if st.session_state.get("f_model") not in by_id:
            # A new tab starts on the model that is loaded, so it never proposes replacing it by default.
            active = [lm.model_id for lm in loaded if lm.model_id in by_id]
            st.session_state["f_model"] = active[0] if active else models[0].model_id
        model = by_id[st.session_state["f_model"]]
    _prefill(model, dev, mode, snap)
    field_errors = _field_errors()
    profile = None if field_errors else _profile_from_fields(mode, dev)
    available = None if dev.free_bytes is None else dev.free_bytes + sum(
        lm.footprint_bytes or 0 for lm in loaded if _matches_device(lm, dev))

    if models:
        verdicts = {m.model_id: (_fit_verdict(m, profile, available)[0] if profile is not None else "—")
                    for m in models}
        # Short labels (name without the organisation, the verdict's mark only): the sidebar's
        # dropdown cut a long label before the verdict. The full id shows when names collide.
        shorts = [mid.rsplit("/", 1)[-1] for mid in by_id]
        short_of = {mid: (sh if shorts.count(sh) == 1 else mid) for mid, sh in zip(by_id, shorts, strict=True)}
        st.selectbox(
            t("controls.model"), list(by_id),
            format_func=lambda mid: (f"{short_of[mid]} · {ui.gib(by_id[mid].size_on_disk_bytes)} · "
                                     f"{verdicts[mid].split(' ', 1)[0]}"),
            key="f_model", help=t("controls.model_help"),
        )

    # profile fields
    st.selectbox(t("controls.precision"), [p.value for p in Precision], format_func=ui.precision_label,
                 key="f_precision")
    # No min/max on the inputs: the browser would drop an out-of-range value without a word and
    # Apply would use the old one. The value is checked here instead, visibly.
    c1, c2 = st.columns(2)
    c1.number_input(t("controls.context"), step=256, key="f_context",
                    help=t("controls.range_help", low=CONTEXT_RANGE[0], high=CONTEXT_RANGE[1]))
    c2.number_input(t("controls.batch"), step=1, key="f_batch",
                    help=t("controls.range_help", low=BATCH_RANGE[0], high=BATCH_RANGE[1]))
    for err in field_errors:
        st.error(f"⛔ {err}")
    if _fields_as_prefilled():  # once the user changed a field, the values are no longer the recommendation
        codes = st.session_state.get("_prefill_codes") or []
        notes = [ui.note_text(c, ctl.settings.bands) for c in codes]
        st.caption(t("controls.prefilled") + ("" if not notes else " " + _sentence("; ".join(notes)) + "."))
        problem = st.session_state.get("_prefill_problem")
        if problem:
            st.caption(f"⚠️ {ui.english_label()}{problem}")
    st.button(t("controls.reset_profile"), key="btn_reset_profile", on_click=_reset_profile)

    # the plan, shown before anything runs
    plan = None
    if model is not None and profile is not None:
        plan = ui.run_safely(lambda: ctl.plan(mode, model, profile), context=t("plan.failed"))
        if plan is not None:
            _render_plan(plan, snap, docker)
    force = False
    if plan is not None and not plan.fits and not plan.already_active and not plan.blockers:
        force = st.checkbox(t("controls.force"), key="f_force")

    why_not = _apply_blocked_reason(busy, model, field_errors, plan)
    st.button(
        t("controls.apply"), key="btn_apply", type="primary", width="stretch",
        disabled=why_not is not None,
        on_click=_start_apply, args=(mode.value, model, profile, force),
    )
    if why_not:
        st.caption(f"🚫 {why_not}")
    st.button(t("controls.clear"), key="btn_clear", width="stretch", disabled=busy, on_click=_start_clear)
    if st.session_state.get("confirm_emergency"):
        st.warning(t("emergency.confirm_text"))
        # One under the other, full width: side by side the sidebar cut the labels short.
        st.button(t("emergency.confirm"), key="btn_emergency_confirm", type="primary", width="stretch",
                  on_click=_start_emergency)
        st.button(t("emergency.cancel"), key="btn_emergency_cancel", width="stretch", on_click=_cancel_emergency)
    else:
        st.button(t("controls.emergency"), key="btn_emergency", width="stretch", on_click=_ask_emergency)
    if busy:
        st.caption(t("controls.busy"))
    return mode, model, profile


def _apply_blocked_reason(busy: bool, model: CachedModel | None, field_errors: list[str],
                          plan: Any) -> str | None:
    """Why Apply is disabled now (shown under it), or None when it can run."""
    t = ui.tr()
    if busy:
        return t("controls.busy")
    if model is None:
        return t("controls.apply_no_model")
    if field_errors:
        return t("controls.apply_fix_fields")
    if plan is None:
        return t("plan.failed")
    if plan.already_active:
        return t("plan.already_active")
    if plan.blockers:
        return t("controls.apply_blocked")
    return None


def _render_plan(plan: Any, snap: SystemSnapshot, docker: tuple[bool, str | None]) -> None:
    t = ui.tr()
    with st.container(border=True):
        st.markdown(f"**{t('plan.title')}**")
        for b in plan.blockers:  # first and loud: these make Apply impossible
            st.error(f"⛔ **{ui.blocker_text(b, snap, docker)}**")
        if plan.already_active:
            st.info(t("plan.already_active"))
            return
        unload = ", ".join(lm.model_id for lm in plan.to_unload) or t("plan.nothing")
        lines = [
            f"- {t('plan.unload')}: {unload}" + (
                f" ({t('plan.frees', freed=ui.gib(plan.expected_freed_bytes))})" if plan.expected_freed_bytes else ""),
            f"- {t('plan.needed')}: **{ui.gib(plan.needed_bytes)}**",
            f"- {t('plan.free_now', device=ui.device_key_label(plan.device_key))}: {ui.gib(plan.free_bytes_now)}",
            f"- {t('plan.free_after')}: {ui.gib(plan.free_bytes_after_unload)}",
        ]
        st.markdown("\n".join(lines))
        if plan.estimate is not None:
            e = plan.estimate
            st.caption(t("plan.breakdown", weights=ui.gib(e.weights_bytes), kv=ui.gib(e.kv_cache_bytes),
                         act=ui.gib(e.activation_bytes), ctx=ui.gib(e.cuda_context_bytes)))
        if plan.blockers:
            pass  # the blocker above is the verdict: never a ✅ "fits" next to a ⛔
        elif plan.fits:
            st.success(t("plan.fits"))
        else:
            msg = t("plan.does_not_fit")
            if plan.max_context_that_fits:
                msg += " " + t("plan.max_context", tokens=ui.tr().count("unit.tokens", plan.max_context_that_fits))
            st.error(msg)
            if plan.suggestion:
                st.caption(f"💡 {ui.english_label()}{plan.suggestion}")
        st.caption(t("plan.steps") + ": " + " → ".join(ui.step_label(s) for s in plan.steps))


# ============================================================================ main area sections
def environment_notice(snap: SystemSnapshot, docker: tuple[bool, str | None]) -> None:
    """With no GPU and/or no Docker: what was found and what the user can still do."""
    t = ui.tr()
    docker_ok, docker_reason = docker
    docker_line = t("env.docker_ok") if docker_ok else t("env.docker_missing", reason=ui.docker_text(docker_reason))
    details = [x for x in ((snap.nvml_hint if not snap.has_gpu else None),
                           (docker_reason if not docker_ok else None)) if x]
    if not snap.has_gpu:
        st.info("\n\n".join([t("env.no_gpu", hint=ui.nvml_text(snap)), docker_line, t("env.can_do_cpu")]),
                icon="🔎")
    elif not docker_ok:
        st.info("\n\n".join([docker_line, t("env.can_do_gpu")]), icon="🔎")
    else:
        return
    if details:
        st.caption(ui.english_label() + " ".join(details))


def recommendation_card(snap: SystemSnapshot, dev: DeviceSnapshot, model: CachedModel | None,
                        profile: Profile | None, available: int | None) -> None:
    """The guide's four profiles as a table, and apart from it what is recommended now and why.

    The table's row for the free memory is marked "applies now" only when the recommendation is
    exactly that row; otherwise (vLLM unavailable, CPU precision, the model needs less) the row
    the recommendation started from is marked and the line above says what changed.
    """
    t = ui.tr()
    st.subheader(t("rec.title"))
    rec = None
    if model is not None:  # the same recommendation that filled in the fields
        try:
            rec = ctl.recommend(model=model, device_key=dev.key, snapshot=snap)
        except Exception:  # noqa: BLE001 - fall back to the table's recommendation below
            rec = None
    if rec is None:
        rec = ui.run_safely(lambda: ctl.recommend(device_key=dev.key, snapshot=snap))
    if rec is None:
        return
    bands = ctl.settings.bands
    natural = band_for(rec.free_bytes or 0, bands)
    exact = rec.band == natural.name and not rec.note_codes
    fell_back = any(code.startswith("vllm_unavailable_fallback") for code in rec.note_codes)
    because = [t("rec.because_free", free=ui.gib(rec.free_bytes), device=ui.device_label(dev))]
    if not fell_back:  # else the fallback note names the table's band itself
        because[0] += t("rec.because_band", band=ui.band_title(natural.name, bands))
    because += [ui.note_text(code, bands) for code in rec.note_codes]
    st.success(t("rec.now_recommended", profile=ui.profile_text(rec.profile), because="; ".join(because)),
               icon="💡")
    st.caption(t("rec.level_now", level=ui.level_badge(rec.level, ctl.settings)))
    cols = st.columns(len(bands))
    for col, band in zip(cols, bands, strict=True):
        with col:
            heading = ui.band_heading(band, bands)
            body = "\n".join(f"- {line}" for line in ui.band_lines(band))
            if exact and band.name == rec.band:
                st.success(f"**{heading}** — {t('rec.current')}\n\n{body}")
            elif band.name == rec.band:
                p = rec.profile
                same = (p.mode is band.mode and p.precision is band.precision
                        and p.context_tokens == band.context_tokens and p.batch == band.batch)
                st.info(f"**{heading}** — {t('rec.base_same' if same else 'rec.base')}\n\n{body}")
            elif band.name == natural.name:
                with st.container(border=True):
                    st.markdown(f"**{heading}** — {t('rec.by_free_unavailable')}\n\n{body}")
            else:
                with st.container(border=True):
                    st.markdown(f"**{heading}**\n\n{body}")
    if model is not None and profile is not None and available is not None:
        try:
            ctx = ctl.max_context(model, profile, free_bytes=available)
        except Exception as exc:  # noqa: BLE001
            st.caption(f"⚠️ {ui.english_label()}{exc}")
            return
        if ctx > 0:
            st.markdown(t("rec.model_context", model=model.model_id, precision=profile.precision.value.upper(),
                          batch=profile.batch, tokens=t.count("unit.tokens", ctx), free=ui.gib(available)))
        else:
            st.markdown(t("rec.model_no_fit", model=model.model_id, precision=profile.precision.value.upper(),
                          free=ui.gib(available)))


def loaded_section(loaded: list[LoadedModel], busy: bool) -> None:
    t = ui.tr()
    st.subheader(t("loaded.title"))
    st.markdown(f"**{t('loaded.transformers')}**")
    tf = [lm for lm in loaded if lm.backend == "transformers"]
    if not tf:
        st.caption(t("loaded.none"))
    for lm in tf:
        c1, c2 = st.columns([12, 1], vertical_alignment="center")
        c1.markdown(ui.loaded_row_text(lm))
        c2.button("🗑️", key=f"unload::{lm.model_id}", help=t("loaded.unload_help", model=lm.model_id),
                  disabled=busy, on_click=_start_unload, args=(lm.model_id,))


def containers_section(loaded: list[LoadedModel], docker: tuple[bool, str | None], busy: bool) -> None:
    t = ui.tr()
    st.markdown(f"**{t('containers.title')}**")
    docker_ok, reason = docker
    if not docker_ok:
        st.caption(t("containers.docker_unavailable", reason=ui.docker_text(reason)))
        return
    containers = [lm for lm in loaded if lm.backend == "vllm"]
    if not containers:
        st.caption(t("containers.none"))
    now = time.time()
    for c in containers:
        uptime = ui.fmt_duration(now - c.loaded_at) if c.loaded_at and c.state == "running" else "—"
        health = t(f"health.{c.health}") if c.health and t.has(f"health.{c.health}") else (c.health or "—")
        text = t("containers.row", name=c.name or "?", state=c.state or "—", model=c.model_id,
                 port=c.port or "—", uptime=uptime, health=health)
        c1, c2 = st.columns([12, 1], vertical_alignment="center")
        c1.markdown(text)
        c2.button("🛑", key=f"stop::{c.name}", help=t("containers.stop_help", name=c.name),
                  disabled=busy, on_click=_start_stop, args=(c.name,))


def cached_section(catalog: Any, models: tuple[CachedModel, ...], profile: Profile | None,
                   available: int | None) -> None:
    t = ui.tr()
    st.subheader(t("cached.title"))
    st.caption(t("cached.caption", dir=getattr(catalog, "cache_dir", None) or "—"))
    for w in getattr(catalog, "warnings", ()):
        st.warning(f"⚠️ {w}")
    if not models:
        st.info(t("controls.no_models"))
        return
    head = (f"| {t('cached.model')} | {t('cached.size')} | {t('cached.arch')} | {t('cached.revision')} | "
            f"{t('cached.needed')} | {t('cached.fit')} |")
    rows = [head, "|---|---|---|---|---|---|"]
    for m in models:
        verdict, needed = _fit_verdict(m, profile, available) if profile is not None else ("—", None)
        rows.append(f"| {m.model_id} | {ui.gib(m.size_on_disk_bytes)} | {m.architecture or '—'} | "
                    f"{(m.revision or '—')[:10]} | {ui.gib(needed)} | {verdict} |")
    st.markdown("\n".join(rows))


def log_section() -> None:
    t = ui.tr()
    st.subheader(t("log.title"))
    records = ui.run_safely(lambda: ctl.history(20)) or []
    for w in ctl.log_warnings:
        st.caption(f"⚠️ {w}")
    if not records:
        st.caption(t("log.empty"))
        return
    for r in records:
        took = ui.fmt_duration((r.ended_at or r.started_at) - r.started_at)
        kind = t(f"log.kind_{r.kind}") if t.has(f"log.kind_{r.kind}") else r.kind
        what = r.params.get("model") or r.params.get("name") or ""
        label = f"{ui.outcome_emoji(r.outcome)} {ui.fmt_time(r.started_at)} · {kind} {what} · {took}"
        change = ui.memory_change(r)
        with st.expander(label):
            if change:
                st.caption(t("log.memory_change", change=change))
            ui.steps_table(r.steps)  # the operation's memory change is the caption above
            if r.error:
                st.error(f"❌ **{t('log.failed')}**\n\n{ui.english_label()}{r.error}")
                ui.advice_block(ui.advice_for_error_text(r.kind, r.error))


# ============================================================================ the page
def main() -> None:
    t = ui.tr()
    snap = ctl.devices()
    ui.remember_devices(snap)
    selectable = list(snap.gpus) if snap.gpus else [snap.host]
    keys = [d.key for d in selectable]
    if st.session_state.get("device_key") not in keys:
        readable = [d for d in selectable if d.free_bytes is not None]
        best = max(readable, key=lambda d: d.free_bytes or 0) if readable else selectable[0]
        st.session_state["device_key"] = best.key
    docker = ctl.docker_status()
    catalog = ui.run_safely(ctl.models)
    models = tuple(catalog.models) if catalog is not None else ()
    loaded = ui.run_safely(ctl.loaded) or []
    busy = board.busy() or ctl.current_operation() is not None

    with st.sidebar:
        st.header(t("sidebar.title"))
        if len(selectable) > 1:
            st.selectbox(t("sidebar.device"), keys, key="device_key",
                         format_func=lambda k: ui.device_label(snap.device(k)))
        else:
            st.caption(ui.device_label(selectable[0]))
        dev = snap.device(st.session_state["device_key"]) or snap.host
        live_box = st.container()  # filled by the live panel fragment on every tick
        st.divider()
        mode, model, profile = sidebar(snap, dev, models, loaded, busy)
        st.divider()
        ui.language_switch()

    available = None if dev.free_bytes is None else dev.free_bytes + sum(
        lm.footprint_bytes or 0 for lm in loaded if _matches_device(lm, dev))

    st.title(t("app.title"))
    environment_notice(snap, docker)
    op_panel()
    live_panel(dev.key, live_box)
    recommendation_card(snap, dev, model, profile, available)
    loaded_section(loaded, busy)
    containers_section(loaded, docker, busy)
    cached_section(catalog, models, profile, available)
    log_section()
    ui.warm_chart_libraries()  # after the page is painted: the chart appears on a later tick
    t0 = st.session_state.pop("_perf_t0", None)
    if t0 is not None:  # read by bench/bench_ui.py: the whole script run, app.py's first line to here
        st.session_state["_perf_full_run_s"] = time.perf_counter() - t0


main()
