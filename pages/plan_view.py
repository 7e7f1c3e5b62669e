"""The plan, shown before anything runs: blockers, what stops and is freed, what is needed, whether
it fits, notes and the steps — every line rendered from the plan's data and Message codes."""

from __future__ import annotations

from typing import Any

import streamlit as st

from memory_controller.planning import Plan
from pages import ui_common as ui


def verdict_mark(plan: Plan | None) -> str:
    """The one verdict shown beside a model everywhere (closed selector, its list, the table, the plan)."""
    if plan is None:
        return "⚠️"
    if plan.blockers:
        return "⛔"
    if plan.already_active or plan.fits:
        return "✅"
    return "❌"


_VERDICT_KEYS = {"⚠️": "fit.unknown", "⛔": "fit.blocked", "✅": "fit.yes", "❌": "fit.no"}


def verdict_labels() -> dict[str, str]:
    """The four verdicts in the page's language, looked up once per table (2,000 rows stay cheap)."""
    t = ui.tr()
    return {mark: t(key) for mark, key in _VERDICT_KEYS.items()}


def verdict_text(plan: Plan | None, labels: dict[str, str] | None = None) -> str:
    return (labels or verdict_labels())[verdict_mark(plan)]


def render_plan(ctl: Any, plan: Plan, has_gpu: bool) -> None:
    t = ui.tr()
    with st.container(border=True):
        st.markdown(f"**{t('plan.title')}**")
        for b in plan.blockers:  # first and loud: these make Apply impossible
            st.error(f"⛔ **{ui.sentence(ui.render(b))}**")
        if plan.already_active:
            st.info(t("plan.already_active"))
            return
        unload = ", ".join(d.model_id for d in plan.to_stop) or t("plan.nothing")
        frees = f" ({t('plan.frees', freed=ui.gib(plan.expected_freed_bytes))})" if plan.expected_freed_bytes else ""
        lines = [
            f"- {t('plan.backend')}: {ui.backend_label(ctl, plan.backend_id)}",
            f"- {t('plan.unload')}: {unload}{frees}",
            f"- {t('plan.needed')}: **{ui.gib(plan.needed_bytes)}**",
            f"- {t('plan.free_now', device=ui.device_key_label(plan.device_key))}: {ui.gib(plan.free_bytes_now)}",
            f"- {t('plan.free_after')}: {ui.gib(plan.free_bytes_after_unload)}",
        ]
        st.markdown("\n".join(lines))
        if plan.estimate is not None:
            e = plan.estimate
            key = "plan.breakdown" if e.cuda_context_bytes else "plan.breakdown_cpu"
            st.caption(t(key, weights=ui.gib(e.weights_bytes), kv=ui.gib(e.kv_cache_bytes),
                         act=ui.gib(e.activation_bytes), ctx=ui.gib(e.cuda_context_bytes)))
        for note in plan.notes:
            st.caption(f"ℹ️ {ui.sentence(ui.render(note))}")
        if plan.blockers:
            pass  # the blocker above is the verdict: never a ✅ "fits" next to a ⛔
        elif plan.fits:
            st.success(t("plan.fits"))
        else:
            text = t("plan.does_not_fit")
            if plan.max_context_that_fits:
                text += " " + t("plan.max_context", tokens=t.count("unit.tokens", plan.max_context_that_fits))
            st.error(text)
            if plan.suggestion:
                st.caption(f"💡 {ui.sentence(ui.render(plan.suggestion))}")
        st.caption(t("plan.steps") + ": " + " → ".join(ui.step_label(s, has_gpu) for s in plan.step_names))


def holder_choice(ctl: Any, plan: Plan, backend_id: str, model: Any, profile: Any) -> Plan:
    """The plan fits only with Ollama's models unloaded: a box the user ticks ("также выгрузить из
    Ollama: …"); ticked, the plan is made again with that step (``free_holders=True``) and Apply
    applies that plan. Memory Ollama holds is never taken without the tick."""
    t = ui.tr()
    offer = ui.sentence(ui.render(plan.holder_offer))
    if not st.checkbox(offer, key="f_unload_ollama", help=t("plan.unload_ollama_help")):
        return plan
    ticked = ui.run_safely(lambda: ctl.plan(backend_id, model, profile, free_holders=True), context=t("plan.failed"))
    return ticked if ticked is not None else plan
