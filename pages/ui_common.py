"""Shared rendering for the dashboard and the diagnostic page: the controller, the language,
formatting, messages and errors in the user's language, the presentation marks (emoji).

Only renders and calls the controller: no outside system and no backend here (ruff TID251).
Every user-visible string comes from ``config/strings.<lang>.toml`` through :func:`tr`; the core's
statements arrive as :class:`Message` codes (rendered by :func:`render`) and errors as codes
(``err.<code>``), never as English sentences joined into the page.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import streamlit as st

from memory_controller import i18n
from memory_controller.errors import MemctlError, SettingsError
from memory_controller.i18n import LANGUAGE_NAMES, LANGUAGES, Translator
from memory_controller.types import (
    DeviceKind,
    DeviceSnapshot,
    Level,
    Message,
    Outcome,
    Precision,
    SystemSnapshot,
)
from memory_controller.units import GIB, fmt_bytes

log = logging.getLogger("memctl.ui")

LANG_KEY = "lang"
ADVICE_KEYS = ("out_of_memory", "model_not_loading", "container_not_stopping")

# Presentation lives here, not in the core's types.
LEVEL_EMOJI = {Level.GREEN: "🟢", Level.YELLOW: "🟡", Level.RED: "🔴"}
OUTCOME_EMOJI = {Outcome.SUCCESS: "✅", Outcome.WARNING: "⚠️", Outcome.ERROR: "❌"}


# ============================================================================ the shared controller
def _controller() -> Any:
    """This process's own MemoryController (``shared_controller``): survives Streamlit's "Clear cache",
    which would otherwise build a second controller that knows nothing of what runs. Pages act on
    :func:`controller` (the owner's client when another process owns the machine), never on this."""
    from memory_controller.controller import shared_controller

    return shared_controller()


_ownership: tuple[int, Any] | None = None  # (id of the local controller it was made for, server.connect.Ownership)
_ownership_lock = threading.Lock()


def ownership() -> Any:
    """Who this process acts through (``server.connect.attach``, the rule every entry point follows),
    found once per process: with a live owner elsewhere (``memctl serve``) ``.ctl`` is its client; with
    ``settings.dashboard_serves`` this process becomes the owner and serves on 127.0.0.1:serve_port;
    otherwise ``.ctl`` is this process's controller. A failure (a live owner that does not
    answer, or is not who server.json says) is kept as ``Ownership.error``, never raised into the page."""
    global _ownership
    local = _controller()
    settings = local.settings
    serves = bool(getattr(settings, "dashboard_serves", False))
    with _ownership_lock:
        if _ownership is not None and _ownership[0] == id(local):
            found = _ownership[1]
            if found.is_owner and (serves or found.error is not None or not _owner_appeared(settings)):
                return found
            if not found.is_owner and _owner_alive(found):
                return found
            if not found.is_owner:
                found.ctl.close()  # the other owner is gone: take the machine over (its lock was dropped)
        from memory_controller.api import InProcessController
        from server.connect import Ownership, attach

        try:
            found = attach(settings, serve=serves, make_controller=lambda: local)
        except MemctlError as exc:
            found = Ownership(InProcessController(local), None, exc)
        _ownership = (id(local), found)
        return found


def _owner_appeared(settings: Any) -> bool:
    """True when another process has become the owner since this one settled on its own controller."""
    from server.owner import read_owner

    try:
        info = read_owner(settings, wait_s=0)
    except MemctlError:  # the lock is held, the address not yet published: look again next time
        return False
    return info is not None and info.pid != os.getpid()


def _owner_alive(found: Any) -> bool:
    """True while the owner this process acts through still holds the lock under the same PID."""
    from server.owner import read_owner

    try:
        info = read_owner(found.ctl.settings, wait_s=0)
    except MemctlError:  # the lock is held, the address not yet published: someone is starting
        return True
    return info is not None and info.pid == found.ctl.owner.pid


def release_ownership() -> None:
    """Stop this process's server (or close the client of another owner); tests call it between runs."""
    global _ownership
    with _ownership_lock:
        found, _ownership = (_ownership[1] if _ownership else None), None
    if found is None:
        return
    if found.handle is not None:
        found.handle.stop()
    found.ctl.close()


def owner_info() -> Any | None:
    """The owner this process acts through when it is another process (its ``OwnerInfo``), else None."""
    found = ownership()
    return None if found.is_owner else found.ctl.owner


def server_url() -> str | None:
    """The memctl server's URL (this process's, or the live owner's), or None when none runs."""
    found = ownership()
    if found.handle is not None:
        return found.handle.url
    return None if found.is_owner else found.ctl.owner.url


def ownership_line() -> None:
    """Who serves the machine: this dashboard's server URL, "owned by PID … at …", or why neither."""
    t = tr()
    found = ownership()
    if found.error is not None:
        st.warning(f"⚠️ {t('owner.error')}: {error_text(found.error)}")
    elif found.handle is not None:
        st.caption(t("owner.self", url=found.handle.url))
    elif not found.is_owner:
        owner = found.ctl.owner
        st.info(t("owner.other", pid=owner.pid, url=owner.url))
    else:
        st.caption(t("owner.off"))


OWNER_TROUBLE = ("owner_unreachable", "owner_token", "owner_bad_answer", "owner_identity")


def owner_trouble(exc: BaseException) -> bool:
    """True for an error of the owner this process acts through (it stopped answering, restarted,
    answered nonsense), as opposed to an error of the call itself."""
    return getattr(exc, "code", None) in OWNER_TROUBLE and not ownership().is_owner


def controller() -> Any:
    """The ``ControllerAPI`` pages act on: the owner's client when another process owns the machine,
    else this process's controller; on invalid settings shows the field and stops the page."""
    try:
        return ownership().ctl
    except SettingsError as exc:
        settings_error(exc)
        st.stop()


def settings_error(exc: SettingsError) -> None:
    """The page shown instead of everything else when the settings do not load (the setting's
    name and value are the user's own words, so the message is shown as it is)."""
    t = tr()
    st.title(t("app.title"))
    st.error(f"❌ **{t('app.settings_error')}**\n\n{exc.message}")
    st.caption(t("app.settings_error_next"))


# ============================================================================ language
def init_language(default: str | None = None) -> None:
    if LANG_KEY not in st.session_state:
        st.session_state[LANG_KEY] = default if default in LANGUAGES else "ru"


def lang() -> str:
    return st.session_state.get(LANG_KEY, "ru") if _has_session() else "ru"


def tr() -> Translator:
    return Translator(lang())


def _has_session() -> bool:
    try:
        from streamlit.runtime.scriptrunner import get_script_run_ctx

        return get_script_run_ctx() is not None
    except Exception:  # noqa: BLE001
        return False


def _on_language_change() -> None:
    st.session_state[LANG_KEY] = st.session_state.get("_lang_widget", st.session_state.get(LANG_KEY, "ru"))


def language_switch() -> None:
    t = tr()
    st.session_state["_lang_widget"] = st.session_state.get(LANG_KEY, "ru")
    st.radio(t("app.language"), list(LANGUAGES), format_func=lambda code: LANGUAGE_NAMES[code],
             key="_lang_widget", horizontal=True, on_change=_on_language_change)


def render(message: Message | None) -> str:
    """A core Message in this session's language (see memory_controller.i18n.render)."""
    return "" if message is None else i18n.render(message, lang())


def sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


# ============================================================================ formatting
def gib(n_bytes: int | None) -> str:
    return fmt_bytes(n_bytes)


def gib_number(n_bytes: int) -> str:
    """A threshold as the guide writes it: ``8``, ``2.5``."""
    value = n_bytes / GIB
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.1f}"


def fmt_duration(seconds: float | None) -> str:
    t = tr()
    if seconds is None:
        return "—"
    if seconds < 1:
        return t("unit.ms", n=f"{seconds * 1000:.0f}")
    if seconds < 120:
        return t("unit.s", n=f"{seconds:.1f}")
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 120:
        return t("unit.min_s", m=minutes, s=f"{sec:02d}")
    hours, minutes = divmod(minutes, 60)
    return t("unit.h_min", h=hours, m=f"{minutes:02d}")


def fmt_time(ts: float | None) -> str:
    return "—" if not ts else time.strftime("%H:%M:%S", time.localtime(ts))


_device_names: dict[str, str] = {}  # device key → name, from the last snapshot any page painted


def remember_devices(snap: SystemSnapshot) -> None:
    for dev in snap.devices:
        _device_names[dev.key] = dev.name


def device_label(dev: DeviceSnapshot) -> str:
    t = tr()
    _device_names[dev.key] = dev.name
    if dev.kind is DeviceKind.HOST:  # the probe's name for it is English ("Host RAM"): the page's own words
        return t("device.host_plain")
    return t("device.gpu", index=dev.index, name=dev.name)


def device_key_label(key: str) -> str:
    """``host`` → ``Оперативная память хоста``; ``gpu:1`` → ``GPU 1 (NVIDIA …)``."""
    t = tr()
    if key in ("host", "cpu"):
        return t("device.host_plain")
    if key.startswith("gpu:"):
        index = key.split(":", 1)[1]
        name = _device_names.get(key)
        return t("device.gpu_named", index=index, name=name) if name else t("device.gpu_plain", index=index)
    if key.startswith("cuda:"):
        return ", ".join(device_key_label(f"gpu:{i}") for i in key.split(":", 1)[1].split(","))
    return key


def precision_label(p: Precision | str) -> str:
    return tr()(f"precision.{Precision(p).value}")


def backend_label(ctl: Any, backend_id: str) -> str:
    """A backend's name: the catalog's ``mode.<id>`` when it has one, else its own capabilities.label."""
    t = tr()
    value = getattr(backend_id, "value", backend_id)
    if t.has(f"mode.{value}"):
        return t(f"mode.{value}")
    try:
        return ctl.capabilities(value).label or value
    except MemctlError:
        return value


def step_label(name: str, has_gpu: bool = True) -> str:
    """A step's name; the clear step says "GPU" only when there is a GPU."""
    t = tr()
    key = f"step.{name}"
    if name == "clear" and not has_gpu:
        key = "step.clear_host"
    if name.startswith("stop_") and not t.has(key):
        return t("step.stop_backend", backend=name[5:])
    return t(key) if t.has(key) else name


def stage_label(stage: str) -> str:
    """A progress stage (a step, or a backend's own stage such as ``weights``): what it does and,
    for the slow ones, what takes the time."""
    t = tr()
    for key in (f"stage.{stage}", f"step.{stage}"):
        if t.has(key):
            return t(key)
    return stage


def outcome_emoji(outcome: Outcome | None) -> str:
    return OUTCOME_EMOJI.get(outcome, "⏳") if outcome is not None else "⏳"


def level_badge(level: Level, settings: Any) -> str:
    return tr()(f"level.{level.value}", green=gib_number(settings.green_min_bytes),
                yellow=gib_number(settings.yellow_min_bytes))


def nvml_text(snap: SystemSnapshot) -> str:
    t = tr()
    key = f"nvml.{snap.nvml_status.value}"
    return t(key) if t.has(key) else t("nvml.error")


def cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


# ============================================================================ errors
def error_text(err: BaseException) -> str:
    """What went wrong, in this language: ``err.<code>`` with the error's arguments, else the headline
    of its class (in English the core's own message follows)."""
    t = tr()
    code = getattr(err, "code", None)
    args = dict(getattr(err, "args_", None) or {})
    if "step" in args:
        args["step"] = step_label(str(args["step"]))
    if code and t.has(f"err.{code}"):
        return _format(t(f"err.{code}"), args, t(f"err.{code}"))
    if code and t.has(f"msg.{code}"):  # a plan's blocker raised as an error
        return sentence(i18n.render(Message(code, args, ""), lang()))
    headline = error_headline(err)
    if t.language == "en" and isinstance(err, MemctlError):
        return f"{headline}: {err.message}"
    return headline


def _format(template: str, args: dict, fallback: str) -> str:
    from memory_controller.i18n import _message_fields

    try:
        return template.format(**_message_fields(args))
    except (KeyError, IndexError, ValueError):
        return fallback


def error_headline(err: BaseException) -> str:
    t = tr()
    for cls in type(err).__mro__:
        if t.has(f"errors.{cls.__name__}"):
            return t(f"errors.{cls.__name__}")
    advice = getattr(err, "advice_key", None)
    if advice in ADVICE_KEYS:
        return t(f"advice.{advice}.problem")
    return t("errors.generic")


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
    """What went wrong and what to do, in the user's language, with the guide's advice. Never a
    traceback; the technical details (the core's own words) are folded away under "Подробности"."""
    t = tr()
    if not isinstance(err, MemctlError):
        log.error("unexpected error in the UI: %r", err, exc_info=err)
        head = t("error.unexpected_headline")
    else:
        head = error_text(err)
    st.error(f"❌ **{context + ': ' if context else ''}{head}**")
    code = getattr(err, "code", None)
    if code and t.has(f"hint.{code}"):
        st.info(f"💡 {_format(t(f'hint.{code}'), getattr(err, 'args_', {}) or {}, t(f'hint.{code}'))}")
    advice_block(getattr(err, "advice_key", None))
    with st.expander(t("error.details")):
        st.markdown(f"`{type(err).__name__}`" + (f" · `{code}`" if code else ""))
        st.code(str(err) + (f"\n{err.details}" if getattr(err, "details", None) else ""), language=None)
        tail = getattr(err, "log_tail", None)
        if tail:
            st.code("\n".join(tail[-20:]), language=None)


def run_safely(fn: Callable[[], Any], *, context: str | None = None) -> Any:
    """Call ``fn``; on any error show :func:`error_box` and return None (never a traceback)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - every failure is shown as an error box
        error_box(exc, context=context)
        return None
