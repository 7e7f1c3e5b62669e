"""``memctl ollama ps [--json]`` and ``memctl ollama unload NAME [--wait S] [--json]``: Ollama as a holder.

Exit codes: 0 done (an unload whose memory came back slowly too: a warning is printed), 1 Ollama
down, slow, refusing, malformed, or the model still listed after the wait, 2 a bad name or setting.
Handlers take ``(args, ctl)``: ``ctl`` gives ``settings`` and ``probe`` (an unload waits for the
memory to come back on NVML) and, when it has one, ``ollama()`` returning the client.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from memory_controller.errors import MemctlError, SettingsError
from memory_controller.types import Outcome, to_jsonable
from memory_controller.units import fmt_bytes


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ollama ps`` and ``ollama unload NAME`` to memctl's sub-command parser."""
    p = subparsers.add_parser("ollama", help="models an Ollama server holds in memory (MEMCTL_OLLAMA_HOST)")
    sub = p.add_subparsers(dest="ollama_command", required=True)
    ps = sub.add_parser("ps", help="models Ollama has loaded: size, size in VRAM, unloads in")
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    ps.set_defaults(func=cmd_ollama_ps)
    un = sub.add_parser("unload", help="ask Ollama to unload a model (keep_alive 0) and wait for the memory")
    un.add_argument("name", help="model name as `memctl ollama ps` lists it (e.g. gpt-oss:20b)")
    un.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                    help="how long to wait for the model to go and its memory to come back (default 10)")
    un.add_argument("--json", action="store_true", help="machine-readable output")
    un.set_defaults(func=cmd_ollama_unload)


def client_for(ctl: Any) -> Any:
    """The Ollama client: ``ctl.ollama()``; given Settings (or something with ``settings``/``probe``), a
    local controller's."""
    maker = getattr(ctl, "ollama", None)
    if not callable(maker):
        from memory_controller import MemoryController

        maker = MemoryController(getattr(ctl, "settings", ctl), probe=getattr(ctl, "probe", None)).ollama
    client = maker()
    if client is None:
        raise MemctlError("the Ollama client could not be built", "check MEMCTL_OLLAMA_HOST")
    return client


def _fail(exc: MemctlError, as_json: bool) -> int:
    if as_json:
        print(json.dumps(exc.to_dict(), ensure_ascii=False, indent=2))
    print(f"error: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
    bad_input = isinstance(exc, SettingsError) or exc.code == "ollama.bad_name"
    return 2 if bad_input else 1


def _until(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds <= 0:
        return "now"
    s = int(seconds)
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def format_ps(models: list[Any]) -> str:
    rows = [("NAME", "SIZE", "IN VRAM", "UNLOADS IN")]
    for m in models:
        rows.append((m.name, fmt_bytes(m.size), fmt_bytes(m.size_vram), _until(m.expires_in_s())))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def cmd_ollama_ps(args: argparse.Namespace, ctl: Any) -> int:
    try:
        client = client_for(ctl)
        models = client.ps()
    except MemctlError as exc:
        return _fail(exc, args.json)
    if args.json:
        print(json.dumps({"host": client.base_url,
                          "models": [dict(to_jsonable(m), expires_in_s=m.expires_in_s()) for m in models]},
                         ensure_ascii=False, indent=2))
    elif not models:
        print(f"Ollama at {client.base_url} has no model loaded.")
    else:
        print(format_ps(models))
    return 0


def cmd_ollama_unload(args: argparse.Namespace, ctl: Any) -> int:
    try:
        report = client_for(ctl).unload(args.name, wait_s=max(0.0, float(args.wait)))
    except MemctlError as exc:
        return _fail(exc, args.json)
    if args.json:
        print(json.dumps(to_jsonable(report), ensure_ascii=False, indent=2))
    else:
        print(f"{report.outcome.emoji} {report.message.text}",
              file=sys.stderr if report.outcome is Outcome.ERROR else sys.stdout)
    return 1 if report.outcome is Outcome.ERROR else 0


register = add_commands  # memctl's sub-command modules expose register(subparsers)
