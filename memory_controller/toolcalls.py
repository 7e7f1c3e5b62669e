"""Tool calls in a model's text output, for the common local families (pure: standard library only).

The server templates tools into the prompt through the backend and reads the calls back here:

* ``"qwen"`` (Qwen 2.5 / 3, Hermes style): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call, text before the first block is content;
* ``"llama3"`` (Llama 3.1-3.3 JSON tool calling): the whole answer is ``{"name": ..., "parameters": {...}}``
  (``"arguments"`` accepted too), optionally after ``<|python_tag|>``, several calls separated by ``;``;
* ``"mistral"``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (v3 tokenizers) or
  ``[TOOL_CALLS]name[ARGS]{...}`` repeated (v11+ tokenizers).

Anything that does not parse — malformed JSON, a call without a name, an unknown family — comes back
as plain text, unchanged: the client sees what the model wrote rather than an invented call.

:class:`ToolCallStream` does the same on a token stream: it passes text through until a tool-call
marker may begin, then holds the rest back and parses it at the end.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass

FAMILIES = ("qwen", "llama3", "mistral")

_QWEN_OPEN = "<tool_call>"
_QWEN_CLOSE = "</tool_call>"
_LLAMA_TAG = "<|python_tag|>"
_MISTRAL_TAG = "[TOOL_CALLS]"
_MISTRAL_ARGS = "[ARGS]"
_MISTRAL_CALL_ID = "[CALL_ID]"
_MARKERS: dict[str, tuple[str, ...]] = {
    "qwen": (_QWEN_OPEN,),
    "llama3": (_LLAMA_TAG,),
    "mistral": (_MISTRAL_TAG,),
}
_ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: ``arguments_json`` is the arguments object as a JSON string (OpenAI's shape)."""

    id: str
    name: str
    arguments_json: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments_json}}


@dataclass(frozen=True)
class ParsedOutput:
    """``content``: the text that is not a call (None when the answer is only calls)."""

    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()


def new_call_id(family: str | None = None) -> str:
    """A fresh call id: ``call_<24 hex>``; Mistral templates require exactly 9 letters/digits."""
    if family == "mistral":
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return "call_" + secrets.token_hex(12)


def normalize_family(family: str | None) -> str | None:
    """The family name this module knows, or None (``"qwen2"``, ``"qwen3"`` -> ``"qwen"``; ``"llama"`` ->
    ``"llama3"``)."""
    if not family:
        return None
    f = family.strip().lower()
    if f.startswith("qwen") or f == "hermes":
        return "qwen"
    if f.startswith("llama"):
        return "llama3"
    if f.startswith("mistral") or f.startswith("mixtral") or f.startswith("ministral"):
        return "mistral"
    return None


def _call(obj: object, family: str, id_factory: Callable[[str], str]) -> ToolCall | None:
    """A ToolCall from a decoded ``{"name", "arguments"|"parameters"}`` object, or None when it is not one."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return ToolCall(id_factory(family), name.strip(), json.dumps(args, ensure_ascii=False))


def _json_values(text: str, separators: str) -> list[object] | None:
    """Every JSON value in ``text``, separated by whitespace or ``separators``; None if anything else."""
    decoder = json.JSONDecoder()
    out: list[object] = []
    i, n = 0, len(text)
    while True:
        while i < n and (text[i].isspace() or text[i] in separators):
            i += 1
        if i >= n:
            return out
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        out.append(value)


def _parse_qwen(text: str, family: str, ids: Callable[[str], str]) -> ParsedOutput | None:
    start = text.find(_QWEN_OPEN)
    if start < 0:
        return None
    calls: list[ToolCall] = []
    rest = text[start:]
    while rest.strip():
        rest = rest.lstrip()
        if not rest.startswith(_QWEN_OPEN):
            return None  # text between or after the calls: not a clean tool answer
        body_start = len(_QWEN_OPEN)
        end = rest.find(_QWEN_CLOSE, body_start)
        body = rest[body_start:] if end < 0 else rest[body_start:end]  # a missing close at the very end is tolerated
        values = _json_values(body, "")
        if not values or len(values) != 1:
            return None
        call = _call(values[0], family, ids)
        if call is None:
            return None
        calls.append(call)
        rest = "" if end < 0 else rest[end + len(_QWEN_CLOSE):]
    content = text[:start].strip()
    return ParsedOutput(content or None, tuple(calls))


def _parse_llama3(text: str, family: str, ids: Callable[[str], str]) -> ParsedOutput | None:
    content = ""
    body = text
    tag = text.find(_LLAMA_TAG)
    if tag >= 0:
        content, body = text[:tag].strip(), text[tag + len(_LLAMA_TAG):]
    elif not text.lstrip().startswith("{"):
        return None
    values = _json_values(body.strip(), ";")
    if not values:
        return None
    calls = [_call(v, family, ids) for v in values]
    if any(c is None for c in calls):
        return None
    return ParsedOutput(content or None, tuple(c for c in calls if c is not None))


def _parse_mistral(text: str, family: str, ids: Callable[[str], str]) -> ParsedOutput | None:
    tag = text.find(_MISTRAL_TAG)
    if tag < 0:
        return None
    content = text[:tag].strip()
    body = text[tag:]
    calls: list[ToolCall] = []
    if _MISTRAL_ARGS in body:
        # v11+: [TOOL_CALLS]name[ARGS]{...}[TOOL_CALLS]name2[ARGS]{...}
        for part in body.split(_MISTRAL_TAG)[1:]:
            if not part.strip():
                continue
            name, sep, args = part.partition(_MISTRAL_ARGS)
            if not sep:
                return None
            name = name.split(_MISTRAL_CALL_ID)[0]
            values = _json_values(args, "")
            if not values or len(values) != 1:
                return None
            call = _call({"name": name, "arguments": values[0]}, family, ids)
            if call is None:
                return None
            calls.append(call)
    else:
        values = _json_values(body[len(_MISTRAL_TAG):], "")
        if not values or len(values) != 1:
            return None
        items = values[0] if isinstance(values[0], list) else [values[0]]
        for item in items:
            call = _call(item, family, ids)
            if call is None:
                return None
            calls.append(call)
    if not calls:
        return None
    return ParsedOutput(content or None, tuple(calls))


_PARSERS = {"qwen": _parse_qwen, "llama3": _parse_llama3, "mistral": _parse_mistral}


def parse_tool_calls(text: str, family: str | None,
                     id_factory: Callable[[str], str] = new_call_id) -> ParsedOutput:
    """Split a complete model answer into content and tool calls for ``family``.

    Never raises: an unknown family or output that is not a well-formed call is returned as content.
    """
    fam = normalize_family(family)
    if fam is not None:
        parsed = _PARSERS[fam](text, fam, id_factory)
        if parsed is not None and parsed.tool_calls:
            return parsed
    return ParsedOutput(text, ())


class ToolCallStream:
    """Stream text through while it cannot be a tool call; hold the rest and parse it at the end.

    ``feed(piece)`` returns the text that may be shown now; ``finish()`` returns the parsed rest
    (its ``content`` is the held-back text that turned out not to be calls). For an unknown family
    everything passes through and ``finish()`` returns nothing.
    """

    def __init__(self, family: str | None, id_factory: Callable[[str], str] = new_call_id) -> None:
        self.family = normalize_family(family)
        self._ids = id_factory
        self._markers = _MARKERS.get(self.family or "", ())
        self._pending = ""  # not shown yet: may be the start of a marker
        self._held: str | None = None  # from the marker on (tool mode)
        self._emitted_any = False

    @property
    def holding(self) -> bool:
        return self._held is not None

    def feed(self, piece: str) -> str:
        if self.family is None:
            return piece
        if self._held is not None:
            self._held += piece
            return ""
        text = self._pending + piece
        if self.family == "llama3" and not self._emitted_any:
            stripped = text.lstrip()
            if not stripped:
                self._pending = text
                return ""
            if stripped.startswith("{"):  # a bare JSON answer is Llama's tool-call form
                self._held = text
                self._pending = ""
                return ""
        for marker in self._markers:
            at = text.find(marker)
            if at >= 0:
                self._held = text[at:]
                self._pending = ""
                return self._release(text[:at])
        keep = _partial_marker_suffix(text, self._markers)
        self._pending = text[len(text) - keep:] if keep else ""
        return self._release(text[: len(text) - keep])

    def _release(self, out: str) -> str:
        if out:
            self._emitted_any = True
        return out

    def finish(self) -> ParsedOutput:
        """The rest: tool calls parsed from the held text, or that text as content."""
        if self._held is None:
            rest, self._pending = self._pending, ""
            return ParsedOutput(rest or None, ())
        held, self._held = self._held, None
        parsed = parse_tool_calls(held, self.family, self._ids)
        if not parsed.tool_calls:
            return ParsedOutput(held, ())
        return parsed


def _partial_marker_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is the beginning of a marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:n]):
                best = max(best, n)
                break
    return best
