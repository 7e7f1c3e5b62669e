"""The diagnostic page's checks and their rendering (the page file test_memory_controller.py only
frames it). As the user's guide promises ("Тестирование"): the memory status, a mode switch end to
end (plan → apply(plan) → listed among deployments → unload with its measured report), both
clear functions, and the recommendation over a range of free-memory values. Each check is marked
✅ / ⚠️ / ❌ / ⏭️ with its time. Checks run on the script thread: this page has no live panel.
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
    NvmlStatus,
    Outcome,
    ProgressEvent,
    SystemSnapshot,
)
from memory_controller.units import GIB
from pages import holders_view, rec_card, ui_ops
from pages import ui_common as ui

CHECKS = ("memory", "recommend", "switch", "clear", "emergency")
DESTRUCTIVE = ("emergency",)
OPT_IN = {"switch": "diag_include_switch", "emergency": "diag_include_emergency"}
FREE_GIB_RANGE = (0.5, 1.0, 1.99, 2.0, 3.0, 3.99, 4.0, 5.0, 6.0, 7.0, 7.99, 8.0, 12.0, 24.0)
STATUS_ICON = {"passed": "✅", "warning": "⚠️", "failed": "❌", "skipped": "⏭️"}
RESULTS_KEY = "diag_results"
OWNER_ERRORS = ("owner_unreachable", "owner_identity")  # a live owner this page must not act around


@dataclass
class CheckResult:
    status: str  # passed | warning | failed | skipped
    duration_s: float
    at: float
    lines: list[str] = field(default_factory=list)
    table: str | None = None
    error: BaseException | None = None


class Failed(Exception):
    """A check's own assertion failed: the message says what was expected."""


def _precision_cell(precision: Any) -> str:
    key = "rec.quantization" if precision.is_quantized else "rec.precision"
    return ui.tr()(key, precision=precision.value.upper())


def _step_line(s: Any, has_gpu: bool) -> str:
    return f"{ui.outcome_emoji(s.outcome)} {ui.step_label(s.name, has_gpu)} — {ui.fmt_duration(s.duration_s)}"


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
                       level=ui.LEVEL_EMOJI[ctl.level(dev)]))
        say(lines[-1])
    lines.append(t("diag.nvml", status=ui.nvml_text(snap)))
    if snap.host.total_bytes is None or snap.host.free_bytes is None:
        raise Failed(t("diag.host_unreadable"))
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
        rec = recommend(_synthetic_gpu(free), bands=bands, green_min_bytes=s.green_min_bytes,
                        yellow_min_bytes=s.yellow_min_bytes, cpu_half_precision=s.cpu_half_precision)
        want = band_for(free, bands)
        want_level = level_for(free, s.green_min_bytes, s.yellow_min_bytes)
        p = rec.profile
        ok = (rec.band == want.name and rec.level is want_level and p.mode == want.mode and p.precision is want.precision
              and p.context_tokens == want.context_tokens and p.batch == want.batch)
        if not ok:
            problems.append(t("diag.rec_mismatch", free=free_gib, got=rec_card.band_title(rec.band, bands),
                              want=rec_card.band_title(want.name, bands)))
        rows.append(f"| {free_gib:g} GiB | {ui.LEVEL_EMOJI[rec.level]} | {rec_card.band_title(rec.band, bands)} | "
                    f"{ui.backend_label(ctl, p.mode)} | {_precision_cell(p.precision)} | {p.context_tokens} | "
                    f"{p.batch} | {'✅' if ok else '❌'} |")
    on_cpu = {bid for bid in ctl.backend_ids() if "cpu" in ctl.capabilities(bid).devices}
    host = recommend(_synthetic_host(int(8 * GIB)), bands=bands, green_min_bytes=s.green_min_bytes,
                     yellow_min_bytes=s.yellow_min_bytes, cpu_half_precision=s.cpu_half_precision,
                     cpu_backends=on_cpu)
    host_ok = (host.profile.mode in on_cpu and host.profile.device == "cpu"
               and (host.preferred_available or bool(host.preferred_reason)))
    if not host_ok:
        problems.append(t("diag.rec_host_mismatch", band=rec_card.band_title(host.band, bands)))
    rows.append(f"| 8 GiB ({t('diag.rec_host')}) | {ui.LEVEL_EMOJI[host.level]} | "
                f"{rec_card.band_title(host.band, bands)} | {ui.backend_label(ctl, host.profile.mode)} | "
                f"{_precision_cell(host.profile.precision)} | {host.profile.context_tokens} | {host.profile.batch} | "
                f"{'✅' if host_ok else '❌'} |")
    now = ctl.recommend_in_view()  # the profile the dashboard and `memctl status` show too (issue 20.5)
    now_dev = ctl.devices().device(now.device_key)
    where = ui.device_label(now_dev) if now_dev is not None else now.device_key
    lines = [t("diag.rec_now", free=ui.gib(now.free_bytes), device=where, profile=rec_card.profile_text(ctl, now.profile),
               band=rec_card.band_title(now.band, bands))]
    if now.notes:  # what changed from the table's row, worded as on the dashboard
        lines[0] += " " + ui.sentence("; ".join(rec_card.note_text(n, bands) for n in now.notes)) + "."
    say(lines[0])
    if problems:
        raise Failed("; ".join(problems))
    return CheckResult("passed", 0.0, 0.0, lines, table="\n".join(rows))


def check_switch(ctl: Any, say: Any, model_id: str | None, backend_id: str | None) -> CheckResult:
    """Plan, apply that plan, see the model among the deployments, unload it and read the report."""
    t = ui.tr()
    if not model_id or not backend_id:
        return CheckResult("skipped", 0.0, 0.0, [t("diag.no_models")])
    has_gpu = ctl.devices().has_gpu

    def progress(ev: ProgressEvent) -> None:
        took = f" ({ui.fmt_duration(ev.elapsed_s)})" if ev.fraction == 1.0 and ev.elapsed_s is not None else ""
        say(f"**{ui.stage_label(ev.stage)}**{took}")

    plan = ctl.plan(backend_id, model_id)
    say(t("diag.switch_plan", needed=ui.gib(plan.needed_bytes), free=ui.gib(plan.free_bytes_after_unload),
          fits="✅" if plan.fits else "❌"))
    record = ctl.apply(plan, progress=progress)
    lines = [_step_line(s, has_gpu) for s in record.steps]
    found = [d for d in ctl.deployments() if d.model_id == model_id and d.backend_id == backend_id]
    if not found:
        raise Failed(t("diag.switch_not_listed", model=model_id))
    from pages.deployments import deployment_row

    lines.append(t("diag.switch_listed", model=model_id, row=deployment_row(ui.controller(), found[0])))
    say(lines[-1])
    status = "warning" if record.outcome is Outcome.WARNING else "passed"
    rep = ctl.unload(found[0].handle)
    lines.append(ui_ops.release_text(rep))
    if rep.verdict is Outcome.ERROR:
        status = "failed"
    elif rep.verdict is Outcome.WARNING:
        status = "warning"
    say(lines[-1])
    if any(d.handle == found[0].handle and d.backend_id == backend_id for d in ctl.deployments()):
        raise Failed(t("diag.switch_still_loaded", model=model_id))
    return CheckResult(status, 0.0, 0.0, lines)


def check_clear(ctl: Any, say: Any) -> CheckResult:
    t = ui.tr()
    rep = ctl.clear_memory()
    lines = [t("diag.clear_line", device=ui.device_key_label(k), before=ui.gib(v), after=ui.gib(rep.after.get(k)),
               freed=ui_ops.freed_text(rep.freed.get(k))) for k, v in rep.before.items()]
    for line in lines:
        say(line)
    return CheckResult("passed", 0.0, 0.0, lines)


def check_emergency(ctl: Any, say: Any) -> CheckResult:
    """The emergency clear of the controller that owns the machine: through the owner's client when
    another process owns it (the models it loaded are cleared, or OwnerUnreachableError says why not)."""
    t = ui.tr()
    has_gpu = ctl.devices().has_gpu
    before = [d.model_id for d in ctl.deployments()]
    owner = ui.owner_info()
    if owner is not None:
        say(t("diag.via_owner", pid=owner.pid, url=owner.url))
    rep = ctl.emergency_clear()
    lines = ([t("diag.via_owner", pid=owner.pid, url=owner.url)] if owner is not None else []) + [
        t("diag.emergency_unloaded", models=", ".join(before)) if before else t("diag.emergency_none")]
    lines += [_step_line(s, has_gpu) for s in rep.steps]
    if getattr(rep, "verdict", None) is not None:
        lines.append(ui.sentence(ui.render(rep.verdict)))
    lines += holders_view.remaining_lines(getattr(rep, "remaining", None) or [])
    for line in lines:
        say(line)
    left = [d.model_id for d in ctl.deployments()]
    if left:
        raise Failed(t("diag.emergency_left", models=", ".join(left)))
    return CheckResult("passed" if rep.outcome is Outcome.SUCCESS else "warning", 0.0, 0.0, lines)


def acting_controller(ctl: Any) -> Any:
    """The controller the switch, clear and emergency checks act on: ``ctl`` (``ui.controller()``: the
    live owner's client when another memctl process owns the machine, else this process's). Raises the
    error found when connecting (a live owner that does not answer, or is not who server.json says), so
    nothing is done behind that owner's back."""
    found = ui.ownership()
    if found.error is not None and found.handle is None and getattr(found.error, "code", "") in OWNER_ERRORS:
        raise found.error
    return ctl


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
def run_check(name: str, ctl: Any, model_id: str | None, backend_id: str | None) -> CheckResult:
    """One check inside ``st.status``; any error marks it failed (never a traceback). The switch,
    clear and emergency checks act through the machine's owner (:func:`acting_controller`)."""
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
            else:
                acting = acting_controller(ctl)
                if name == "switch":
                    res = check_switch(acting, say, model_id, backend_id)
                elif name == "clear":
                    res = check_clear(acting, say)
                else:
                    res = check_emergency(acting, say)
        except Failed as exc:
            res = CheckResult("failed", 0.0, 0.0, [f"❌ {exc}"])
        except Exception as exc:  # noqa: BLE001 - shown with the guide's advice
            res = CheckResult("failed", 0.0, 0.0, [], error=exc)
        res.duration_s = time.perf_counter() - t0
        res.at = time.time()
        box.update(label=f"{STATUS_ICON[res.status]} {t(f'diag.check_{name}')} — {ui.fmt_duration(res.duration_s)}",
                   state="error" if res.status == "failed" else "complete", expanded=False)
    return res


def render_results(results: dict[str, CheckResult]) -> None:
    t = ui.tr()
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
