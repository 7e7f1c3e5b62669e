"""What runs (every backend's deployments, one stop button each) and the cached models with the
verdict for the profile on screen (the same verdict as the selector and the plan)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import streamlit as st

from memory_controller.backend import Deployment, DeploymentState
from memory_controller.types import CachedModel
from pages import plan_view, ui_ops
from pages import ui_common as ui


def _unload(handle: str) -> None:
    ctl = ui.controller()
    ui_ops.submit(lambda: ctl.submit_unload(handle))


def serving_status() -> dict[str, dict]:
    """model_id -> the served API's status (requests in flight, idle-unload countdown) when this process
    owns the server; {} otherwise."""
    own = ui.ownership()
    if own.handle is None:
        return {} if own.is_owner else own.ctl.serve_status()  # the owner's server answers for itself
    from server.openai_api import status_of

    return status_of(own.handle)


def deployment_row(ctl: Any, d: Deployment, served: dict | None = None) -> str:
    t = ui.tr()
    parts = [f"**{d.model_id}**", ui.backend_label(ctl, d.backend_id)]
    if d.device and (len(d.memory_bytes) != 1 or d.device == "cpu"):  # where it runs, unless the memory says it
        parts.append(ui.device_key_label(d.device) if d.device.startswith("cuda") else d.device)
    mapped = d.mapped_bytes  # a memory-mapped model: its weight files' resident pages, named apart
    memory = ", ".join(t("deploy.memory_mapped", device=ui.device_key_label(k), mapped=ui.gib(mapped), private=ui.gib(v))
                       if k == "host" and mapped else f"{ui.device_key_label(k)}: {ui.gib(v)}"
                       for k, v in d.memory_bytes.items())
    if memory:
        parts.append(memory)
    prof = d.profile
    if prof is not None:
        parts.append(f"{prof.precision.value.upper()}, {t.count('unit.tokens', prof.context_tokens)}, "
                     f"{t('rec.batch_inline', batch=prof.batch)}")
    if d.endpoint:
        parts.append(t("deploy.endpoint", endpoint=d.endpoint))
    parts.append(t(f"state.{d.state.value}"))
    if served is not None:
        parts.append(t("deploy.in_flight", n=int(served.get("in_flight") or 0)))
        if served.get("idle_unload_in_s") is not None:
            parts.append(t("deploy.idle_unload_in", s=round(served["idle_unload_in_s"])))
    if d.started_at:
        parts.append(t("deploy.since", time=ui.fmt_time(d.started_at),
                       uptime=ui.fmt_duration(time.time() - d.started_at)))
    return " · ".join(parts)


def deployments_section(ctl: Any, running: list[Deployment], busy: bool, has_gpu: bool = True) -> None:
    t = ui.tr()
    st.subheader(t("deploy.title"))
    ui_ops.op_panel(ctl, has_gpu, kinds=ui_ops.BESIDE_ITS_BUTTON)  # the 🗑️'s progress and report, here
    shown = [d for d in running if d.state is not DeploymentState.STOPPED]
    if not shown:
        st.caption(t("deploy.none"))
    try:
        served = serving_status() if shown else {}
    except Exception:  # noqa: BLE001 - a status line must never break the page
        served = {}
    for d in shown:
        try:
            http = ctl.capabilities(d.backend_id).serves_http
        except Exception:  # noqa: BLE001
            http = bool(d.endpoint)
        icon = "🛑" if http else "🗑️"
        c1, c2 = st.columns([12, 1], vertical_alignment="center")
        c1.markdown(deployment_row(ctl, d, served.get(d.model_id)))
        for w in d.warnings:
            c1.caption(f"⚠️ {ui.sentence(ui.render(w))}")
        c2.button(icon, key=f"unload::{d.handle}", help=t("deploy.stop_help", model=d.model_id),
                  disabled=busy or d.state is DeploymentState.STOPPING, on_click=_unload, args=(d.handle,))


TABLE_ROWS = 200


def model_problem(model: CachedModel) -> str | None:
    """What is wrong with a cached model's files and what to do, in the page's language (a truncated or
    corrupt weights file, no weights); None when its files read well."""
    from memory_controller.errors import MemctlError
    from memory_controller.estimate import read_model_spec

    try:
        read_model_spec(model.path)
    except MemctlError as exc:
        t = ui.tr()
        code = getattr(exc, "code", "")
        fix = t(f"hint.{code}") if code and t.has(f"hint.{code}") else (exc.hint or "")
        return f"{ui.error_text(exc)} {fix}".strip()
    except Exception:  # noqa: BLE001 - any other failure: the plan's own error box says it
        return None
    return None


def cached_section(catalog: Any, models: tuple[CachedModel, ...], plans: dict[str, Any], has_profile: bool) -> None:
    t = ui.tr()
    st.subheader(t("cached.title"))
    st.caption(t("cached.caption", dir=getattr(catalog, "cache_dir", None) or "—"))
    cache_dir = getattr(catalog, "cache_dir", None)
    missing = cache_dir is not None and not Path(cache_dir).exists()
    if missing:  # said in the page's language; the catalog's own (English) warning says the same
        st.info(t("cached.no_cache_dir", dir=cache_dir))
    for w in getattr(catalog, "warnings", ()):
        if missing and str(cache_dir) in str(w):
            continue
        st.warning(f"⚠️ {t('cached.warning')}: `{ui.cell(str(w))}`")
    if not models:
        st.info(t("controls.no_models"))
        return
    head = (f"| {t('cached.model')} | {t('cached.size')} | {t('cached.arch')} | {t('cached.revision')} | "
            f"{t('cached.needed')} | {t('cached.fit')} |")
    rows = [head, "|---|---|---|---|---|---|"]
    labels = plan_view.verdict_labels()
    # A table of thousands of rows helps nobody and costs every rerun: the first TABLE_ROWS, the rest counted
    # (every model stays reachable through the sidebar's searchable selector).
    for m in models[:TABLE_ROWS]:
        plan = plans.get(m.model_id)
        verdict = plan_view.verdict_text(plan, labels) if has_profile else "—"
        if has_profile and plan is not None and plan.blockers:  # ⛔ with its why, not alone (issue 20.10)
            verdict += f": {ui.cell(ui.render(plan.blockers[0]))}"
        elif has_profile and plan is None:  # no plan: the model's own problem and its fix (issue 20.3)
            problem = model_problem(m)
            if problem:
                verdict = f"❌ {ui.cell(problem)}"
        needed = ui.gib(plan.needed_bytes) if plan is not None else "—"
        rows.append(f"| {m.model_id} | {ui.gib(m.size_on_disk_bytes)} | {m.architecture or '—'} | "
                    f"{(m.revision or '—')[:10]} | {needed} | {verdict} |")
    st.markdown("\n".join(rows))
    if len(models) > TABLE_ROWS:
        st.caption(t("cached.more", shown=TABLE_ROWS, total=len(models)))
