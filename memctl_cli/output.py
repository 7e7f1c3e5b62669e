"""What every memctl command prints the same way: errors (message and hint on stderr; with ``--json``
also the error as JSON on stdout), plain-text tables, durations."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from memory_controller import i18n
from memory_controller.errors import MemctlError
from memory_controller.units import fmt_duration as fmt_duration  # the one duration formatter


def language() -> str:
    """The configured language (``Settings.language``, env ``MEMCTL_LANGUAGE``; default ru)."""
    try:
        from memory_controller.settings import load_settings

        return load_settings().language
    except Exception:  # a broken config must not hide the error being printed
        lang = os.environ.get("MEMCTL_LANGUAGE", i18n.DEFAULT_LANGUAGE)
        return lang if lang in i18n.LANGUAGE_NAMES else i18n.DEFAULT_LANGUAGE


def _localized(kind: str, exc: MemctlError, english: str, lang: str) -> str:
    """``err.<code>``/``hint.<code>`` of the catalog in ``lang`` with the error's arguments; the error's
    own English text when the language is en or the catalog has no entry for the code."""
    code = getattr(exc, "code", None)
    if lang == "en" or not code:
        return english
    t = i18n.Translator(lang)
    key = f"{kind}.{code}"
    if not t.has(key):
        return english
    template = str(t.raw(key))
    if "{" not in template and english and kind == "err":
        return f"{template.rstrip('.')}: {english}"  # a generic headline keeps the specifics (English)
    fields = i18n._message_fields(getattr(exc, "args_", None) or {})
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError):
        return english


def print_error(exc: MemctlError, as_json: bool = False) -> None:
    """``error: …`` and ``hint: …`` on stderr; with ``as_json`` the error's dict on stdout first (stdout
    stays machine-readable)."""
    if as_json:
        print(json.dumps(exc.to_dict(), ensure_ascii=False, indent=2))
    lang = language()
    print(f"error: {_localized('err', exc, exc.message, lang)}", file=sys.stderr)
    hint = _localized("hint", exc, exc.hint or "", lang) if exc.hint or lang != "en" else ""
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks; ``rows[0]`` is the header."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)


