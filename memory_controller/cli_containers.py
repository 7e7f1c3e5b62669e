"""``memctl containers [--json]``, ``memctl stop NAME``, ``memctl stop-all``: memctl's vLLM containers.

Only containers labelled ``memctl.managed=true`` are listed, stopped or removed. Each command
returns 0 on success and 1 on failure (message and hint on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from .errors import MemctlError
from .types import ContainerInfo, to_jsonable

if TYPE_CHECKING:  # pragma: no cover
    from backends.vllm_docker import VllmDockerBackend

    from .settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``containers``, ``stop`` and ``stop-all`` to memctl's sub-command parser."""
    p = subparsers.add_parser("containers", help="memctl's vLLM containers: state, model, port, uptime, health")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_containers)

    p = subparsers.add_parser("stop", help="stop and remove one memctl vLLM container")
    p.add_argument("name", help="container name, as `memctl containers` shows it (memctl-vllm-...)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="seconds to wait after SIGTERM before SIGKILL (default: vllm_stop_timeout_s)")
    p.set_defaults(func=cmd_stop)

    p = subparsers.add_parser("stop-all", help="stop and remove every memctl vLLM container")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="seconds to wait after SIGTERM before SIGKILL, per container")
    p.set_defaults(func=cmd_stop_all)


def _backend(settings: Settings) -> VllmDockerBackend:
    from backends.vllm_docker import VllmDockerBackend

    return VllmDockerBackend(settings)


def fmt_duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``12s``; ``—`` for unknown."""
    if seconds is None:
        return "—"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def format_table(infos: list[ContainerInfo]) -> str:
    """A plain-text table of containers (one line per container, with a header)."""
    rows = [("NAME", "STATE", "HEALTH", "MODEL", "PORT", "UPTIME")]
    for c in infos:
        rows.append((c.name, c.state, c.health, c.model_id or "—", "—" if c.port is None else str(c.port),
                     fmt_duration(c.uptime_s)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def cmd_containers(args: argparse.Namespace, settings: Settings) -> int:
    try:
        infos = _backend(settings).list()
    except MemctlError:
        raise  # cli.main prints message + hint (and JSON with --json)
    if args.json:
        print(json.dumps([to_jsonable(c) for c in infos], ensure_ascii=False, indent=2))
    elif not infos:
        print("No memctl containers.")
    else:
        print(format_table(infos))
    return 0


def cmd_stop(args: argparse.Namespace, settings: Settings) -> int:
    try:
        _backend(settings).stop(args.name, args.timeout)
    except MemctlError:
        raise  # cli.main prints message + hint (and JSON with --json)
    print(f"stopped and removed {args.name}")
    return 0


def cmd_stop_all(args: argparse.Namespace, settings: Settings) -> int:
    try:
        results = _backend(settings).stop_all_managed(args.timeout)
    except MemctlError:
        raise  # cli.main prints message + hint (and JSON with --json)
    if not results:
        print("No memctl containers to stop.")
        return 0
    for name, ok, message in results:
        print(f"{'stopped' if ok else 'FAILED '} {name}: {message}", file=sys.stdout if ok else sys.stderr)
    return 0 if all(ok for _, ok, _ in results) else 1
