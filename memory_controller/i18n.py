"""UI strings: ``config/strings.<lang>.toml`` read into flat dotted keys. Pure: no Streamlit here.

A catalog is a TOML file whose tables nest keys (``[sidebar] title = "..."`` is ``sidebar.title``).
A missing key falls back to the default language (Russian, worded as the user's guide), then to
the key itself, so a forgotten string shows up as its key instead of breaking the page.
Values may hold ``str.format`` fields (``{model}``); a missing field leaves the text unformatted.

Russian plurals follow the usual one/few/many rule (1 токен, 2 токена, 5 токенов, 11 токенов):
a plural entry is a table with ``one``, ``few`` and ``many`` (English uses ``one`` and ``many``).
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

from .settings import CONFIG_DIR

LANGUAGES: tuple[str, ...] = ("ru", "en")
DEFAULT_LANGUAGE = "ru"
LANGUAGE_NAMES = {"ru": "Русский", "en": "English"}


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and not _is_plural(value):
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


def _is_plural(value: dict[str, Any]) -> bool:
    return bool(value) and set(value) <= {"one", "few", "many"} and all(isinstance(v, str) for v in value.values())


@lru_cache(maxsize=8)
def catalog(language: str, config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """The flat catalog of ``language``; empty when the file is missing (callers fall back).

    Raises ``tomllib.TOMLDecodeError`` when the file exists but is not valid TOML: a broken
    catalog is a packaging bug that tests must catch, not something to hide.
    """
    path = Path(config_dir) / f"strings.{language}.toml"
    if not path.is_file():
        return {}
    with open(path, "rb") as fh:
        return _flatten(tomllib.load(fh))


def plural_form(n: int, language: str) -> str:
    """``one`` / ``few`` / ``many`` for ``n`` in ``language`` (Russian rule, or English one/many)."""
    n = abs(int(n))
    if language == "ru":
        if n % 10 == 1 and n % 100 != 11:
            return "one"
        if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14:
            return "few"
        return "many"
    return "one" if n == 1 else "many"


class Translator:
    """``t("sidebar.title")`` → text in ``language``; ``t.plural("unit.tokens", 1024)`` → "токена"."""

    def __init__(self, language: str = DEFAULT_LANGUAGE, config_dir: Path = CONFIG_DIR):
        self.language = language if language in LANGUAGES else DEFAULT_LANGUAGE
        self._own = catalog(self.language, config_dir)
        self._fallback = catalog(DEFAULT_LANGUAGE, config_dir) if self.language != DEFAULT_LANGUAGE else {}

    def has(self, key: str) -> bool:
        return key in self._own or key in self._fallback

    def raw(self, key: str) -> Any:
        if key in self._own:
            return self._own[key]
        return self._fallback.get(key, key)

    def __call__(self, key: str, **fields: Any) -> str:
        text = self.raw(key)
        if isinstance(text, dict):  # a plural table asked for as text: take the "many" form
            text = text.get("many") or next(iter(text.values()))
        text = str(text)
        if fields:
            try:
                return text.format(**fields)
            except (KeyError, IndexError, ValueError):
                return text
        return text

    def plural(self, key: str, n: int) -> str:
        """The word form of ``key`` for the number ``n`` (without the number)."""
        forms = self.raw(key)
        if not isinstance(forms, dict):
            return str(forms)
        form = plural_form(n, self.language)
        return forms.get(form) or forms.get("many") or next(iter(forms.values()))

    def count(self, key: str, n: int) -> str:
        """``"1024 токена"``: the number and the right word form."""
        return f"{n} {self.plural(key, n)}"


def _message_fields(args: Any) -> dict[str, Any]:
    """A message's arguments plus readable forms: ``needed_bytes`` also as ``needed_bytes_h`` ("1.50 GiB"),
    lists joined with commas. Core arguments stay raw numbers; only the rendering formats them."""
    from .units import fmt_bytes

    fields: dict[str, Any] = {}
    for key, value in dict(args or {}).items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        fields[key] = value
        if key.endswith("bytes") and isinstance(value, int) and not isinstance(value, bool):
            fields[f"{key}_h"] = fmt_bytes(value)
    return fields


def render(message: Any, lang: str = DEFAULT_LANGUAGE, config_dir: Path = CONFIG_DIR) -> str:
    """A :class:`memory_controller.types.Message` in ``lang``: the catalog's ``msg.<code>`` formatted
    with the message's arguments; the message's own (English) text when the catalog has no entry for
    the code or an argument it names is missing. Never the bare code unless there is nothing else."""
    t = Translator(lang, config_dir)
    code = getattr(message, "code", "") or ""
    fallback = getattr(message, "text", "") or code
    key = f"msg.{code}"
    if not code or not t.has(key):
        return fallback
    template = t.raw(key)
    if isinstance(template, dict):
        template = template.get("many") or next(iter(template.values()))
    fields = _message_fields(getattr(message, "args", {}))
    for key, value in list(fields.items()):  # counts with their word form: {max_tokens} -> "2048 токенов"
        if isinstance(value, int) and not isinstance(value, bool) and not key.endswith("bytes"):
            fields[f"{key}_tokens"] = t.count("unit.tokens", value)
    try:
        return str(template).format(**fields)
    except (KeyError, IndexError, ValueError):
        return fallback
