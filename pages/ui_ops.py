"""Operations from the UI, on the controller's one runner (the owner's, when another process owns
the machine).

A click submits an operation and returns at once (``ctl.submit_apply(plan)`` and friends give its
id); a small fragment polls ``ctl.operations()`` (``OperationView`` values) while something runs and
renders its progress in ``st.status``; the last result stays with the session that started it. Busy
state comes only from the controller (``ctl.current_operation()``), so every tab — and every
dashboard beside the owner — sees the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import streamlit as st

from memory_controller.backend import ReleaseReport
from memory_controller.errors import MemctlError
from memory_controller.reports import ClearReport, EmergencyReport
from memory_controller.types import OperationRecord, Outcome, StepRecord
from pages import holders_view
from pages import ui_common as ui

SEEN_VERSION_KEY = "_runner_version_seen"
MY_OPS_KEY = "_my_ops"
SUBMIT_ERROR_KEY = "_submit_error"
DISMISSED_KEY = "_dismissed_op"
RECENT_RESULT_S = 300.0  # another session's finished operation is shown this long after it ended


# ============================================================================ submitting
def submit(start: Callable[[], str]) -> str | None:
    """Run ``start()`` (it submits an operation and returns its id); remember the operation as this
    session's, or keep the refusal (busy, bad input, an owner that does not answer) to show on the
    next run."""
    st.session_state.pop(SUBMIT_ERROR_KEY, None)
    st.session_state.pop(DISMISSED_KEY, None)
    try:
        op_id = start()
    except MemctlError as exc:
        st.session_state[SUBMIT_ERROR_KEY] = exc
        return None
    mine = st.session_state.setdefault(MY_OPS_KEY, [])
    mine.append(op_id)
    del mine[:-20]
    return op_id


def busy(ctl: Any) -> bool:
    return ctl.current_operation() is not None


def holder(ctl: Any) -> Any | None:
    """The running operation holding the slot (an emergency clear runs beside it), or None."""
    return next((op for op in ctl.operations(0) if op.running and op.kind != "emergency_clear"), None)


# ============================================================================ reruns
def _version(ctl: Any) -> tuple:
    """What changes when an operation starts or ends (every process's view of the one runner)."""
    return tuple((op.op_id, op.running) for op in ctl.operations(1))


def mark_seen(ctl: Any) -> None:
    st.session_state[SEEN_VERSION_KEY] = _version(ctl)


def rerun_if_changed(ctl: Any) -> None:
    """From a fragment: an operation started or ended since the last full run → rerun the page."""
    if st.session_state.get(SEEN_VERSION_KEY) != _version(ctl):
        st.rerun()


def result_is_relevant(op: Any, now: float | None = None) -> bool:
    if op.op_id in st.session_state.get(MY_OPS_KEY, []):
        return True
    ended = op.ended_at or op.started_at
    return (now if now is not None else time.time()) - ended < RECENT_RESULT_S


# ============================================================================ rendering results
def steps_table(steps: Iterable[StepRecord], has_gpu: bool = True) -> None:
    """Outcome, step, time, memory before → after, and what happened: a step's code rendered in the page's
    language; a step without a code (an older log line) shows its English text in the English UI only."""
    t = ui.tr()
    steps = list(steps)
    if not steps:
        return
    per_step = any(s.memory_before_bytes is not None or s.memory_after_bytes is not None for s in steps)
    english = t.language == "en" or all(getattr(s, "code", "") for s in steps)
    head = ["", t("log.step"), t("log.duration")] + ([t("log.memory")] if per_step else []) + (
        [t("log.message")] if english else [])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in steps:
        cells = [ui.outcome_emoji(s.outcome), ui.step_label(s.name, has_gpu), ui.fmt_duration(s.duration_s)]
        if per_step:
            known = s.memory_before_bytes is not None or s.memory_after_bytes is not None
            cells.append(f"{ui.gib(s.memory_before_bytes)} → {ui.gib(s.memory_after_bytes)}" if known else "—")
        if english:
            code = getattr(s, "code", "")
            text = ui.render(_with_op_kind(s.text, t)) if code else (s.message if t.language == "en" else "")
            cells.append(ui.cell(text))
        rows.append("| " + " | ".join(cells) + " |")
    st.markdown("\n".join(rows))


def _with_op_kind(message: Any, t: Any) -> Any:
    """A step's message with its identifiers in the page's words: an operation kind (``op``: "apply"), a
    device key (``device``: "host" → «Оперативная память хоста»), backend ids (``before``/``after``/
    ``backend``: "transformers" → «Transformers»). The core's arguments stay ids; only this renders them."""
    args = dict(message.args) if isinstance(message.args, dict) else {}
    op = args.get("op")
    if isinstance(op, str) and t.has(f"opkind.{op}"):
        args["op"] = t(f"opkind.{op}")
    if isinstance(args.get("device"), str):
        args["device"] = ui.device_key_label(args["device"])
    ctl = None
    for key in ("before", "after", "backend"):
        value = args.get(key)
        if isinstance(value, str) and value not in ("", "—"):
            ctl = ctl or ui.controller()
            args[key] = ", ".join(ui.backend_label(ctl, b.strip()) for b in value.split(","))
    return type(message)(message.code, args, message.text)


def memory_change_text(before: dict[str, int | None], after: dict[str, int | None]) -> str:
    parts = []
    for key, b in (before or {}).items():
        a = (after or {}).get(key)
        if b is None and a is None:
            continue
        parts.append(f"{ui.device_key_label(key)}: {ui.gib(b)} → {ui.gib(a)}")
    return "; ".join(parts)


def memory_change_caption(record: OperationRecord) -> None:
    change = memory_change_text(record.memory_before, record.memory_after)
    if change:
        st.caption(ui.tr()("log.memory_change", change=change))


def freed_text(freed_bytes: int | None) -> str:
    if freed_bytes is None:
        return "—"
    return ui.gib(freed_bytes) if freed_bytes > 0 else ui.tr()("clear.unchanged")


def release_text(rep: ReleaseReport) -> str:
    """``✅ Выгружено: model (device) — X из Y вернулось, удерживается Z (measure)``, from the numbers."""
    t = ui.tr()
    if rep.already_gone:
        return t("unload.already_gone", model=rep.model_id)
    measure = t(f"unload.measure_{rep.measure}") if t.has(f"unload.measure_{rep.measure}") else t("unload.measure_other")
    text = t("unload.report", emoji=ui.outcome_emoji(rep.verdict), model=rep.model_id, freed=ui.gib(rep.freed_bytes),
             held=ui.gib(rep.still_held_bytes), expected=ui.gib(rep.expected_bytes),
             device=ui.device_key_label(rep.device or "host"), measure=measure)
    mapped = getattr(rep, "mapped_bytes", 0)
    if mapped:  # a memory-mapped model: the release of its weight files' pages, measured too
        freed = getattr(rep, "mapped_freed_bytes", 0)
        text += t("unload.mapped", freed=ui.gib(freed), mapped=ui.gib(mapped), left=ui.gib(max(0, mapped - freed)))
    return text


def release_report(rep: ReleaseReport) -> None:
    show = {Outcome.SUCCESS: st.success, Outcome.WARNING: st.warning, Outcome.ERROR: st.error}[rep.verdict]
    show(release_text(rep))


def clear_report(rep: ClearReport) -> None:
    t = ui.tr()
    rows = [f"| {t('clear.device')} | {t('clear.before')} | {t('clear.after')} | {t('clear.freed')} |",
            "|---|---|---|---|"]
    freed = rep.freed
    for key, before in rep.before.items():
        rows.append(f"| {ui.device_key_label(key)} | {ui.gib(before)} | {ui.gib(rep.after.get(key))} | "
                    f"{freed_text(freed.get(key))} |")
    st.success(t("clear.done"))
    st.markdown("\n".join(rows))


def emergency_report(rep: EmergencyReport, record: OperationRecord | None, has_gpu: bool, ctl: Any = None) -> None:
    t = ui.tr()
    if rep.outcome is Outcome.SUCCESS:
        st.success(t("emergency.done"))
    else:
        st.warning(t("emergency.partial"))
        ui.advice_block("container_not_stopping")
    if rep.cancelled_operation:
        kind = rep.cancelled_operation
        st.caption(t("emergency.cancelled", op=t(f"opkind.{kind}") if t.has(f"opkind.{kind}") else kind))
    steps_table(rep.steps, has_gpu)
    holders_view.emergency_remaining(rep)
    if not has_gpu and ctl is not None:  # no GPU holders to name: who holds the host's RAM, with advice
        host = ui.run_safely(lambda: ctl.devices().host)
        if host is not None:
            holders_view.host_processes(host, t("emergency.host_remaining"))
    if record is not None:
        memory_change_caption(record)


def apply_result(ctl: Any, record: OperationRecord, has_gpu: bool) -> None:
    t = ui.tr()
    model = record.params.get("model", "?")
    backend = ui.backend_label(ctl, record.params.get("backend", ""))
    if any(s.name == "noop" for s in record.steps):
        st.info(t("apply.noop", model=model))
    elif record.outcome is Outcome.WARNING:
        st.warning(t("apply.done_warning", model=model, mode=backend))
    else:
        st.success(t("apply.done", model=model, mode=backend))
    dep = record.params.get("deployment") or {}
    if dep.get("endpoint"):
        st.caption(t("apply.endpoint", endpoint=dep["endpoint"]))
    steps_table(record.steps, has_gpu)
    memory_change_caption(record)


def op_result(ctl: Any, op: Any, has_gpu: bool) -> None:
    """What a finished operation produced, or its error (in the user's language) with the guide's advice."""
    if op.error is not None:
        ui.error_box(op.error)
        if getattr(op.error, "code", "").startswith("stale_plan"):
            st.info(ui.tr()("plan.look_at_new"))
        if op.record.steps:
            steps_table(op.record.steps, has_gpu)
        return
    res = op.result
    if isinstance(res, OperationRecord):
        apply_result(ctl, res, has_gpu)
    elif isinstance(res, ReleaseReport):
        release_report(res)
    elif isinstance(res, ClearReport):
        clear_report(res)
    elif isinstance(res, EmergencyReport):
        emergency_report(res, op.record, has_gpu, ctl)


def op_title(ctl: Any, op: Any) -> str:
    t = ui.tr()
    params = dict(op.params)
    if op.kind == "apply":
        return t("ops.apply", model=params.get("model", "?"), mode=ui.backend_label(ctl, params.get("backend", "")))
    if op.kind == "unload":
        return t("ops.unload", model=params.get("model", "?"))
    key = f"opkind.{op.kind}"
    return t(key) if t.has(key) else op.kind


def op_events(op: Any, box: Any, has_gpu: bool) -> None:
    """Each stage once, with its latest state: ⏳ while running, ✅ with its time when done."""
    t = ui.tr()
    order: list[str] = []
    latest: dict[str, Any] = {}
    for ev in op.events:
        if ev.stage not in latest:
            order.append(ev.stage)
        latest[ev.stage] = ev
    for stage in order:
        ev = latest[stage]
        finished = ev.fraction is not None and ev.fraction >= 1.0
        icon = "✅" if finished else ("⏳" if op.running else "•")
        took = f" ({ui.fmt_duration(ev.elapsed_s)})" if finished and ev.elapsed_s is not None else ""
        pct = f" {ev.fraction * 100:.0f}%" if ev.fraction not in (None, 0.0, 1.0) and not finished else ""
        label = ui.step_label(stage, has_gpu) if t.has(f"step.{stage}") else ui.stage_label(stage)
        detail = f" — {ui.cell(ev.message)}" if t.language == "en" and ev.message else ""
        box.markdown(f"{icon} **{label}**{pct}{detail}{took}")


def op_status(ctl: Any, op: Any, has_gpu: bool, *, expanded: bool = True) -> None:
    t = ui.tr()
    if op.running:
        state, icon = "running", "⏳"
    elif op.error is not None:
        state, icon = "error", "❌"
    else:
        outcome = getattr(op.result, "outcome", None) or op.record.outcome
        state, icon = "complete", (ui.outcome_emoji(outcome) if isinstance(outcome, Outcome) else "✅")
    label = t("ops.status_label", icon=icon, title=op_title(ctl, op), started=ui.fmt_time(op.started_at),
              elapsed=ui.fmt_duration(op.elapsed_s))
    if op.running:
        # Not as a context manager: leaving ``with st.status(...)`` marks a running status complete.
        box = st.status(label, state=state, expanded=expanded)
        op_events(op, box, has_gpu)
        return
    with st.status(label, state=state, expanded=expanded):
        op_result(ctl, op, has_gpu)


def _dismiss(op_id: str) -> None:
    st.session_state[DISMISSED_KEY] = op_id


BESIDE_ITS_BUTTON = ("unload",)  # shown where its button is (the 🗑️ in «Что запущено»), not at the top


def op_panel(ctl: Any, has_gpu: bool, kinds: tuple[str, ...] | None = None) -> None:
    """Running operations (polled every 0.5 s while one runs; idle otherwise), then the last result,
    and a refusal of this session's last click (busy, bad input) once. ``kinds``: only operations of
    these kinds (a panel beside their button); None: every other kind, at the top of the page."""
    every = 0.5 if any(op.running for op in ctl.operations(0)) else None

    def mine(op: Any) -> bool:
        return op.kind in kinds if kinds is not None else op.kind not in BESIDE_ITS_BUTTON

    @st.fragment(run_every=every)
    def _panel() -> None:
        rerun_if_changed(ctl)
        t = ui.tr()
        ops = ctl.operations(1)
        if kinds is None:
            refused = st.session_state.pop(SUBMIT_ERROR_KEY, None)
            if refused is not None:
                ui.error_box(refused)
            owner = ui.owner_info()
            if owner is not None and ops:
                st.caption(t("diag.via_owner", pid=owner.pid, url=owner.url))
        for op in ops:
            if op.running and mine(op):
                op_status(ctl, op, has_gpu)
        finished = [op for op in ops if not op.running][:1]
        if (finished and mine(finished[0]) and finished[0].op_id != st.session_state.get(DISMISSED_KEY)
                and result_is_relevant(finished[0])):
            op = finished[0]
            op_status(ctl, op, has_gpu)
            st.button(t("ops.dismiss"), key=f"dismiss::{op.op_id}", on_click=_dismiss, args=(op.op_id,))

    _panel()


# ============================================================================ the emergency clear
def emergency(ctl: Any) -> None:
    """The emergency clear of the controller that owns the machine (``ctl`` is the owner's client when
    another memctl process owns it: its models are cleared there); an owner that cannot be reached
    is said in words (OwnerUnreachableError)."""
    submit(ctl.submit_emergency)
