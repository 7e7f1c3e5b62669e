"""The recommendation card (the guide's four profiles, what is recommended now and why) and the
notice of what was found on this machine (no GPU, a backend that cannot run and why)."""

from __future__ import annotations

from typing import Any

import streamlit as st

from memory_controller.recommend import band_for
from memory_controller.types import (
    DeviceSnapshot,
    Message,
    Profile,
    ProfileBand,
    Recommendation,
    SystemSnapshot,
)
from pages import ui_common as ui


# ============================================================================ bands
def band_heading(band: ProfileBand, bands: tuple[ProfileBand, ...]) -> str:
    """The guide's headings: "При 8+ GB…", "При 6-8 GB…", "При менее 4 GB"."""
    t = ui.tr()
    ordered = sorted(bands, key=lambda b: b.min_free_bytes, reverse=True)
    i = ordered.index(band)
    upper = ordered[i - 1].min_free_bytes if i > 0 else None
    if upper is None:
        return t("rec.heading_top", low=ui.gib_number(band.min_free_bytes))
    if band.min_free_bytes == 0:
        return t("rec.heading_bottom", high=ui.gib_number(upper))
    return t("rec.heading_mid", low=ui.gib_number(band.min_free_bytes), high=ui.gib_number(upper))


def band_title(name: str, bands: tuple[ProfileBand, ...]) -> str:
    band = next((b for b in bands if b.name == name), None)
    return band_heading(band, bands) if band is not None else name


def band_lines(band: ProfileBand) -> list[str]:
    t = ui.tr()
    icon = "⚠️" if band.limited else ("✅" if band.mode == "vllm" else "🔧")
    mode = t(f"rec.mode_{band.mode}")
    if band.limited and band.mode == "vllm":
        mode += " " + t("rec.limited")
    precision_key = "rec.quantization" if band.precision.is_quantized else "rec.precision"
    return [f"{icon} **{mode}**", f"{icon} {t(precision_key, precision=band.precision.value.upper())}",
            f"{icon} {t.count('unit.tokens', band.context_tokens)}", f"{icon} {t('rec.batch', batch=band.batch)}"]


def note_text(note: Message, bands: tuple[ProfileBand, ...]) -> str:
    """A recommendation note in this language; band ids become the guide's headings, counts get
    their word form."""
    t = ui.tr()
    args = dict(note.args)
    for key in ("table", "used"):
        if key in args:
            args[key] = band_title(str(args[key]), bands)
    for key in ("backend", "used_backend"):  # a backend id as the catalog names it
        if isinstance(args.get(key), str) and t.has(f"mode.{args[key]}"):
            args[key] = t(f"mode.{args[key]}")
    for key in ("was", "now", "precision"):
        if isinstance(args.get(key), str):
            args[key] = args[key].upper()
    if isinstance(args.get("tokens"), int):
        args["tokens_text"] = t.count("unit.tokens", args["tokens"])
    if "rule" in args:
        args["rule_text"] = t(f"rule.{args['rule']}") if t.has(f"rule.{args['rule']}") else str(args["rule"])
    return ui.render(Message(note.code, args, note.text))


def profile_text(ctl: Any, profile: Profile) -> str:
    """``Transformers, BF16 (CPU), 1024 токена, батч 1``."""
    t = ui.tr()
    where = " (CPU)" if profile.device == "cpu" else ""
    return t("rec.profile_text", mode=ui.backend_label(ctl, profile.mode),
             precision=profile.precision.value.upper() + where,
             tokens=t.count("unit.tokens", profile.context_tokens), batch=profile.batch)


# ============================================================================ what was found
def environment_notice(ctl: Any, snap: SystemSnapshot, availability: dict[str, Any]) -> None:
    """With no GPU and/or a backend that cannot run: what was found and what the user can still do."""
    t = ui.tr()
    lines = []
    if not snap.has_gpu:
        lines.append(t("env.no_gpu", hint=ui.nvml_text(snap)))
    for bid, avail in availability.items():
        if not avail.ok:
            lines.append(t("env.backend_unavailable", backend=ui.backend_label(ctl, bid), reason=ui.render(avail.reason)))
    if not lines:
        return
    usable = [ui.backend_label(ctl, bid) for bid, a in availability.items() if a.ok]
    lines.append(t("env.can_do", backends=", ".join(usable)) if usable else t("env.can_do_nothing"))
    st.info("\n\n".join(lines), icon="🔎")


# ============================================================================ the card
def recommendation_card(ctl: Any, snap: SystemSnapshot, dev: DeviceSnapshot, rec: Recommendation | None) -> None:
    """The guide's four profiles as a table, and apart from it what is recommended now and why.

    The table's row for the free memory is marked "applies now" only when the recommendation is
    exactly that row; otherwise the row the recommendation started from is marked and the line
    above says what changed.
    """
    t = ui.tr()
    st.subheader(t("rec.title"))
    if rec is None:
        rec = ui.run_safely(lambda: ctl.recommend(device_key=dev.key, snapshot=snap))
    if rec is None:
        return
    bands = ctl.settings.bands
    natural = band_for(rec.free_bytes or 0, bands)
    exact = rec.band == natural.name and not rec.notes
    fell_back = any(n.code == "rec.backend_unavailable_fallback" for n in rec.notes)
    because = [t("rec.because_free", free=ui.gib(rec.free_bytes), device=ui.device_label(dev))]
    if not fell_back:  # else the fallback note names the table's band itself
        because[0] += t("rec.because_band", band=band_title(natural.name, bands))
    because += [note_text(n, bands) for n in rec.notes]
    st.success(t("rec.now_recommended", profile=profile_text(ctl, rec.profile), because="; ".join(because)),
               icon="💡")
    st.caption(t("rec.level_now", level=ui.level_badge(rec.level, ctl.settings)) + " " + t("rec.units_note"))
    cols = st.columns(len(bands))
    for col, band in zip(cols, bands, strict=True):
        with col:
            heading = band_heading(band, bands)
            body = "\n".join(f"- {line}" for line in band_lines(band))
            if exact and band.name == rec.band:
                st.success(f"**{heading}** — {t('rec.current')}\n\n{body}")
            elif band.name == rec.band:
                p = rec.profile
                same = (p.precision is band.precision and p.context_tokens == band.context_tokens
                        and p.batch == band.batch)
                st.info(f"**{heading}** — {t('rec.base_same' if same else 'rec.base')}\n\n{body}")
            elif band.name == natural.name:
                with st.container(border=True):
                    st.markdown(f"**{heading}** — {t('rec.by_free_unavailable')}\n\n{body}")
            else:
                with st.container(border=True):
                    st.markdown(f"**{heading}**\n\n{body}")


def model_context_line(ctl: Any, model: Any, profile: Profile | None, available: int | None) -> None:
    """The largest context the chosen model takes under the profile on screen."""
    if model is None or profile is None or available is None:
        return
    t = ui.tr()
    try:
        ctx = ctl.max_context(model, profile, free_bytes=available)
    except Exception as exc:  # noqa: BLE001
        ui.error_box(exc)
        return
    if ctx > 0:
        st.markdown(t("rec.model_context", model=model.model_id, precision=profile.precision.value.upper(),
                      batch=profile.batch, tokens=t.count("unit.tokens", ctx), free=ui.gib(available)))
    else:
        st.markdown(t("rec.model_no_fit", model=model.model_id, precision=profile.precision.value.upper(),
                      free=ui.gib(available)))
