"""The sidebar "🔧 Управление режимами и памятью": backend, model, profile fields, the plan and the
buttons. The plan shown is kept in session state and Apply submits exactly that plan.

Widgets keep what the user chose: each field's value is remembered apart from the widget
(``_kept``) and given back before the widget is drawn, so a widget whose label changes (a verdict
mark, a field error) never falls back to its first option.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from memory_controller.planning import Plan
from memory_controller.types import (
    MAX_BATCH,
    MAX_CONTEXT_TOKENS,
    CachedModel,
    DeviceKind,
    DeviceSnapshot,
    Precision,
    Profile,
    Recommendation,
    SystemSnapshot,
)
from pages import holders_view, plan_view, rec_card, ui_ops
from pages import ui_common as ui

CONTEXT_RANGE = (16, MAX_CONTEXT_TOKENS)
BATCH_RANGE = (1, MAX_BATCH)
KEPT = "_kept"
CONTEXT_NOTES = ("rec.context_raised", "rec.context_capped", "rec.context_rule")  # the rec names its own rule
PLAN_KEY = "_shown_plan"


@dataclass
class Selection:
    backend_id: str | None
    model: CachedModel | None
    profile: Profile | None
    plan: Plan | None
    rec: Recommendation | None
    plans: dict[str, Plan | None] = field(default_factory=dict)  # model id -> its plan for the profile on screen


# ============================================================================ sticky widgets
def _keep(key: str) -> None:
    st.session_state.setdefault(KEPT, {})[key] = st.session_state.get(key)


def set_field(key: str, value: Any) -> None:
    st.session_state[key] = value
    st.session_state.setdefault(KEPT, {})[key] = value


def _restore(key: str) -> None:
    kept = st.session_state.get(KEPT, {})
    if key in kept:
        st.session_state[key] = kept[key]


# ============================================================================ actions
def _apply() -> None:
    ctl = ui.controller()
    plan = st.session_state.get(PLAN_KEY)
    if plan is None:
        return
    force = bool(st.session_state.get("f_force"))
    ui_ops.submit(lambda: ctl.submit_apply(plan, force=force))


def _clear() -> None:
    ctl = ui.controller()
    ui_ops.submit(ctl.submit_clear)


def _ask_emergency() -> None:
    st.session_state["confirm_emergency"] = True


def _cancel_emergency() -> None:
    st.session_state["confirm_emergency"] = False


def _emergency() -> None:
    st.session_state["confirm_emergency"] = False
    ui_ops.emergency(ui.controller())


def _reset_profile() -> None:
    st.session_state.pop("_prefill_for", None)


# ============================================================================ pieces
def _field_errors() -> list[str]:
    t = ui.tr()
    errors = []
    for key, label, (low, high) in (("f_context", "controls.context", CONTEXT_RANGE),
                                    ("f_batch", "controls.batch", BATCH_RANGE)):
        value = st.session_state.get(key)
        if value is None or not low <= value <= high or value != int(value):
            errors.append(t("controls.out_of_range", field=t(label), value="—" if value is None else value,
                            low=low, high=high))
    return errors


def _model_max(model: CachedModel) -> int | None:
    from memory_controller.estimate import read_model_spec

    try:
        return read_model_spec(model.path).max_position_embeddings
    except Exception:  # noqa: BLE001 - the plan shows what is wrong with the model
        return None


def _prefill(ctl: Any, backend_id: str, model: CachedModel | None, dev: DeviceSnapshot, snap: SystemSnapshot,
             precisions: list[str]) -> Recommendation | None:
    """Fill precision/context/batch from the recommendation when backend, model or device changed.
    The context never exceeds the model's maximum, and the caption says which rule chose it."""
    key = f"{backend_id}|{model.model_id if model else ''}|{dev.key}"
    rec = None
    if model is not None:
        try:
            rec = ctl.recommend(model=model, device_key=dev.key, snapshot=snap)
        except Exception:  # noqa: BLE001 - the table's recommendation below; the plan says what is wrong
            rec = None
    if rec is None:
        rec = ctl.recommend(device_key=dev.key, snapshot=snap)
    if st.session_state.get("_prefill_for") == key and "f_precision" in st.session_state:
        return rec
    precision = rec.profile.precision.value
    if precision not in precisions:
        precision = precisions[0]
    context = int(rec.profile.context_tokens)
    model_max = _model_max(model) if model is not None else None
    if model_max is not None and context > model_max:
        context = int(model_max)
    set_field("f_precision", precision)
    set_field("f_context", context)
    set_field("f_batch", int(rec.profile.batch))
    st.session_state["_prefill_for"] = key
    # What chose the values, kept as data and worded on every run: a caption kept as text stayed in the
    # language it was first written in after the language switch (issue 20.4).
    st.session_state["_prefill_rule"] = (context, model_max, rec)
    st.session_state["_prefill_values"] = (precision, context, int(rec.profile.batch))
    return rec


def _prefill_rule_text(ctl: Any) -> str:
    """The caption's rule in the page's language now: the recommendation's own notes, or the table's row."""
    found = st.session_state.get("_prefill_rule")
    if not isinstance(found, tuple):
        return ""
    context, model_max, rec = found
    t = ui.tr()
    bands = ctl.settings.bands
    band = next((b for b in bands if b.name == rec.band), None)
    band_ctx = band.context_tokens if band is not None else context
    band_name = rec_card.band_title(rec.band, bands)
    rule: list[str] = []
    if any(n.code.startswith(CONTEXT_NOTES) for n in rec.notes):
        pass  # the recommendation names its own rule (rendered with the notes below)
    elif model_max is not None and context == model_max and context < band_ctx:
        rule.append(t("controls.rule_model_max", tokens=t.count("unit.tokens", context),
                      max=t.count("unit.tokens", model_max), band=band_name,
                      band_tokens=t.count("unit.tokens", band_ctx)))
    elif context == band_ctx:
        rule.append(t("controls.rule_band", tokens=t.count("unit.tokens", context), band=band_name))
    rule += [rec_card.note_text(n, bands) for n in rec.notes]
    return "; ".join(rule)


def _profile_from_fields(backend_id: str, dev: DeviceSnapshot) -> Profile:
    precision = Precision(st.session_state["f_precision"])
    return Profile(mode=backend_id, precision=precision, context_tokens=int(st.session_state["f_context"]),  # type: ignore[arg-type]
                   batch=int(st.session_state["f_batch"]), double_quant=precision.is_4bit,
                   device="cpu" if dev.kind is DeviceKind.HOST else "cuda",
                   gpu_ids=None if dev.index is None else (dev.index,))


def _backend_choice(ctl: Any, availability: dict[str, Any], dev: DeviceSnapshot, snap: SystemSnapshot,
                    running: list[Any]) -> str | None:
    t = ui.tr()
    ids = list(availability)
    usable = [bid for bid in ids if availability[bid].ok]
    options = usable or ids
    if not options:
        st.warning(t("controls.no_backends"))
        return None
    _restore("f_mode")
    if st.session_state.get("f_mode") not in options:
        active = [d.backend_id for d in running if d.backend_id in options]
        rec_mode = ctl.recommend(device_key=dev.key, snapshot=snap).profile.mode
        rec_mode = getattr(rec_mode, "value", rec_mode)
        set_field("f_mode", active[0] if active else (rec_mode if rec_mode in options else options[0]))
    if len(usable) >= 2:
        st.radio(t("controls.mode"), options, format_func=lambda b: ui.backend_label(ctl, b), key="f_mode",
                 horizontal=True, on_change=_keep, args=("f_mode",))
    else:  # nothing to choose: the mode said in words (not a greyed radio), why the others cannot run below
        st.markdown(f"**{t('controls.mode')}:** {ui.backend_label(ctl, st.session_state['f_mode'])}"
                    + ("" if usable else f" — {t('controls.mode_none_usable')}"))
    for bid in ids:
        if not availability[bid].ok:
            st.caption(t("controls.backend_unavailable", backend=ui.backend_label(ctl, bid),
                         why=ui.render(availability[bid].reason)))
    return st.session_state["f_mode"]


def _plans_for(ctl: Any, backend_id: str, models: tuple[CachedModel, ...], profile: Profile | None
               ) -> dict[str, Plan | None]:
    if profile is None:
        return {}
    try:  # one live state for every model's verdict (2,000 cached models stay cheap)
        return ctl.plans(backend_id, models, profile)
    except Exception:  # noqa: BLE001 - the chosen model's error is shown below; others get ⚠️
        return {m.model_id: None for m in models}


def models_for(backend_id: str | None, models: tuple[CachedModel, ...], backend_ids: set[str]) -> tuple[CachedModel, ...]:
    """The models a mode offers: a backend that lists its own models (Ollama) offers those; the others offer
    the checkpoints (the models no backend lists itself)."""
    own = {m.source for m in models if m.source in backend_ids}
    if backend_id in own:
        return tuple(m for m in models if m.source == backend_id)
    return tuple(m for m in models if m.source not in own)


# ============================================================================ the sidebar
def sidebar(ctl: Any, snap: SystemSnapshot, dev: DeviceSnapshot, models: tuple[CachedModel, ...],
            running: list[Any], availability: dict[str, Any]) -> Selection:
    t = ui.tr()
    busy = ui_ops.busy(ctl)
    backend_id = _backend_choice(ctl, availability, dev, snap, running)
    models = models_for(backend_id, models, set(availability))
    by_id = {m.model_id: m for m in models}
    model = None
    if not models:
        st.warning(t("controls.no_models"))
    else:
        _restore("f_model")
        if st.session_state.get("f_model") not in by_id:
            # A new tab starts on the model that runs, so it never proposes replacing it by default.
            active = [d.model_id for d in running if d.model_id in by_id]
            set_field("f_model", active[0] if active else models[0].model_id)
        model = by_id[st.session_state["f_model"]]
    precisions = [p.value for p in Precision]
    if backend_id is not None:
        try:
            precisions = [p.value for p in ctl.capabilities(backend_id).precisions] or precisions
        except Exception:  # noqa: BLE001 - the environment notice says why the backend is missing
            pass
    rec = _prefill(ctl, backend_id or "", model, dev, snap, precisions) if backend_id else None
    for key in ("f_precision", "f_context", "f_batch"):
        _restore(key)
    if st.session_state.get("f_precision") not in precisions:
        set_field("f_precision", precisions[0])
    errors = _field_errors()
    profile = None if errors or backend_id is None else _profile_from_fields(backend_id, dev)
    plans = _plans_for(ctl, backend_id, models, profile) if backend_id else {}

    if models:
        shorts = [mid.rsplit("/", 1)[-1] for mid in by_id]
        seen = Counter(shorts)  # one pass: shorts.count() per model was quadratic (2,000 models: 4 M steps)
        short_of = {mid: (sh if seen[sh] == 1 else mid) for mid, sh in zip(by_id, shorts, strict=True)}

        def label(mid: str) -> str:
            mark = plan_view.verdict_mark(plans.get(mid)) if profile is not None else "—"
            return f"{short_of[mid]} · {ui.gib(by_id[mid].size_on_disk_bytes)} · {mark}"

        st.selectbox(t("controls.model"), list(by_id), format_func=label, key="f_model",
                     help=t("controls.model_help"), on_change=_keep, args=("f_model",))
    st.selectbox(t("controls.precision"), precisions, format_func=ui.precision_label, key="f_precision",
                 on_change=_keep, args=("f_precision",))
    # One field per row: side by side in the sidebar's width «Контекст, токенов» wrapped onto two lines
    # and its input sat lower than the batch's. No min/max on the inputs: the browser would drop an
    # out-of-range value without a word.
    st.number_input(t("controls.context"), step=256, key="f_context", on_change=_keep, args=("f_context",),
                    help=t("controls.range_help", low=CONTEXT_RANGE[0], high=CONTEXT_RANGE[1]))
    st.number_input(t("controls.batch"), step=1, key="f_batch", on_change=_keep, args=("f_batch",),
                    help=t("controls.range_help", low=BATCH_RANGE[0], high=BATCH_RANGE[1]))
    for err in errors:
        st.error(f"⛔ {err}")
    now = (st.session_state.get("f_precision"), st.session_state.get("f_context"), st.session_state.get("f_batch"))
    if st.session_state.get("_prefill_values") == now:
        st.caption(t("controls.prefilled") + " " + ui.sentence(_prefill_rule_text(ctl)) + ".")
    st.button(t("controls.reset_profile"), key="btn_reset_profile", on_click=_reset_profile)

    plan = plans.get(model.model_id) if model is not None else None
    if model is not None and profile is not None and plan is None:
        ui.run_safely(lambda: ctl.plan(backend_id, model, profile), context=t("plan.failed"))
    if plan is not None and plan.holder_offer is not None:
        plan = plan_view.holder_choice(ctl, plan, backend_id, model, profile)
    if plan is not None:
        plan_view.render_plan(ctl, plan, snap.has_gpu)
    st.session_state[PLAN_KEY] = plan
    if plan is not None and not plan.fits and not plan.already_active and not plan.blockers:
        st.checkbox(t("controls.force"), key="f_force")

    why_not = _apply_blocked_reason(busy, model, errors, plan)
    st.button(t("controls.apply"), key="btn_apply", type="primary", width="stretch", disabled=why_not is not None,
              on_click=_apply)
    if why_not:
        st.caption(f"🚫 {why_not}")  # the busy message, when busy, is this one line only
    clear_label = t("controls.clear") if snap.has_gpu else t("controls.clear_host")
    st.button(clear_label, key="btn_clear", width="stretch", disabled=busy, on_click=_clear)
    st.button(t("controls.emergency"), key="btn_emergency", width="stretch", on_click=_ask_emergency)
    if st.session_state.get("confirm_emergency"):
        _emergency_dialog(ctl)
    return Selection(backend_id, model, profile, plan, rec, plans)


def _emergency_dialog(ctl: Any) -> None:
    """The confirmation in a dialog over the page: at the sidebar's foot its buttons fell below the fold
    of a 1400×1000 window. Closing the dialog (✕, Esc) is a cancel."""
    t = ui.tr()

    @st.dialog(t("emergency.confirm_title"), on_dismiss=_cancel_emergency)
    def _confirm() -> None:
        st.warning(holders_view.emergency_confirm_text(ctl))
        c1, c2 = st.columns(2)
        if c1.button(t("emergency.confirm"), key="btn_emergency_confirm", type="primary", width="stretch"):
            _emergency()
            st.rerun()
        if c2.button(t("emergency.cancel"), key="btn_emergency_cancel", width="stretch"):
            _cancel_emergency()
            st.rerun()

    _confirm()


def _apply_blocked_reason(busy: bool, model: CachedModel | None, errors: list[str], plan: Plan | None) -> str | None:
    t = ui.tr()
    if busy:
        return t("controls.busy")
    if model is None:
        return t("controls.apply_no_model")
    if errors:
        return t("controls.apply_fix_fields")
    if plan is None:
        return t("plan.failed")
    if plan.already_active:
        return t("plan.already_active")
    if plan.blockers:
        return t("controls.apply_blocked")
    return None
