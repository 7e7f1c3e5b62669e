"""``memctl containers [--json]``, ``memctl stop NAME``, ``memctl stop-all``: what runs outside this process.

Everything goes through the controller: stops take the operation slot and are logged like any other
operation, and only deployments a backend owns (memctl's labelled containers) are listed or stopped.
Exit codes: 0 ok, 1 a stop failed, nothing of that name runs or Docker is down, 2 a malformed name.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from memory_controller.backend import Deployment
from memory_controller.errors import DockerUnavailableError, MemctlError, ModelNotFoundError
from memory_controller.types import to_jsonable
from memory_controller.units import escape_text, fmt_duration

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.controller import MemoryController
    from memory_controller.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``containers``, ``stop`` and ``stop-all`` to memctl's sub-command parser."""
    p = subparsers.add_parser("containers", help="memctl's containers (vLLM): state, model, endpoint, uptime")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_containers)

    p = subparsers.add_parser("stop", help="stop one deployment (container name, handle or model id)")
    p.add_argument("name", help="as `memctl containers` or `memctl ps` shows it")
    p.set_defaults(func=cmd_stop)

    p = subparsers.add_parser("stop-all", help="stop every memctl container")
    p.set_defaults(func=cmd_stop_all)


def _controller(settings: Settings) -> MemoryController:
    from memory_controller.controller import MemoryController

    return MemoryController(settings)


def _acting(settings: Settings) -> Any:
    """Who performs a stop: the live owner process (its controller sees its own models), else this one."""
    from server.cli import controller_for

    return controller_for(settings)


def out_of_process(ctl: MemoryController) -> list[Deployment]:
    """Deployments of backends that run their own server (containers), not models in this process, listed
    fresh from their engine (raises when it cannot be reached: the CLI says so instead of "none")."""
    backends = ctl.backends()
    return [d for d in ctl.deployments(fresh=True)
            if d.backend_id in backends and backends[d.backend_id].capabilities.serves_http]


def format_table(deps: list[Deployment], now: float) -> str:
    """A plain-text table (one line per deployment, with a header); label text is escaped."""
    rows = [("NAME", "STATE", "MODEL", "ENDPOINT", "UPTIME", "NOTE")]
    for d in deps:
        note = "; ".join(w.text for w in d.warnings)
        rows.append((escape_text(d.name or d.handle), d.state.value, escape_text(d.model_id), d.endpoint or "—",
                     fmt_duration(now - d.started_at if d.started_at else None), escape_text(note)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def cmd_containers(args: argparse.Namespace, settings: Settings) -> int:
    import time

    deps = out_of_process(_controller(settings))
    if args.json:
        print(json.dumps([to_jsonable(d) for d in deps], ensure_ascii=False, indent=2))
    elif not deps:
        print("No memctl containers.")
    else:
        print(format_table(deps, time.time()))
    return 0


def cmd_stop(args: argparse.Namespace, settings: Settings) -> int:
    ctl = _acting(settings)
    try:
        report = ctl.unload(args.name)
    except ModelNotFoundError as exc:
        _why_not_found(settings, args.name, exc)
        raise
    print(f"stopped {escape_text(report.model_id)}: {report.message.text}")
    return 0


def _why_not_found(settings: Settings, name: str, exc: ModelNotFoundError) -> None:
    """A name not found may be a container Docker cannot be asked about: say that Docker is down
    (DockerUnavailableError) rather than "not loaded"."""
    try:
        out_of_process(_controller(settings))
    except DockerUnavailableError as down:
        raise DockerUnavailableError(
            f"{name} is not a model of this process, and memctl's containers cannot be listed: {down.message}",
            down.hint, details=down.details, args={"name": name}) from exc
    except MemctlError:
        pass


def cmd_stop_all(args: argparse.Namespace, settings: Settings) -> int:
    deps = out_of_process(_controller(settings))
    if not deps:
        print("No memctl containers to stop.")
        return 0
    ctl = _acting(settings)
    failed = 0
    for d in deps:
        try:
            report = ctl.unload(d.handle)
            print(f"stopped {escape_text(d.name or d.handle)}: {report.message.text}")
        except MemctlError as exc:
            failed += 1
            print(f"FAILED  {escape_text(d.name or d.handle)}: {exc}", file=sys.stderr)
    return 1 if failed else 0
