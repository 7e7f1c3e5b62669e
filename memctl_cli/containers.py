"""``memctl containers [--json]``, ``memctl stop NAME``, ``memctl stop-all``: what runs outside this process.

Everything goes through the controller (``server.connect.controller_for``: the owner process's when
one runs, so the list is what the owner runs): stops take the operation slot and are logged like any
other operation, and only deployments a backend owns (memctl's labelled containers) are listed or stopped.
Exit codes: 0 ok, 1 a stop failed, nothing of that name runs or Docker is down, 2 a malformed name.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from memctl_cli.output import fmt_duration, table
from memory_controller.backend import Deployment
from memory_controller.errors import DockerUnavailableError, MemctlError, ModelNotFoundError
from memory_controller.types import to_jsonable
from memory_controller.units import escape_text

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.api import ControllerAPI
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


def _controller(settings: Settings) -> ControllerAPI:
    """The live owner's client when one runs (its controller sees its own models), else this process's."""
    from server.connect import controller_for

    return controller_for(settings)


def out_of_process(ctl: ControllerAPI) -> list[Deployment]:
    """Deployments of backends that run their own server (containers), not models in this process, listed
    fresh from their engine (raises when it cannot be reached: the CLI says so instead of "none")."""
    serves_http: dict[str, bool] = {}
    out = []
    for d in ctl.deployments(fresh=True):
        if d.backend_id not in serves_http:
            try:
                serves_http[d.backend_id] = ctl.capabilities(d.backend_id).serves_http
            except MemctlError:
                serves_http[d.backend_id] = False
        if serves_http[d.backend_id]:
            out.append(d)
    return out


def format_table(deps: list[Deployment], now: float) -> str:
    """A plain-text table (one line per deployment, with a header); label text is escaped."""
    rows = [("NAME", "STATE", "MODEL", "ENDPOINT", "UPTIME", "NOTE")]
    for d in deps:
        note = "; ".join(w.text for w in d.warnings)
        rows.append((escape_text(d.name or d.handle), d.state.value, escape_text(d.model_id), d.endpoint or "—",
                     fmt_duration(now - d.started_at if d.started_at else None), escape_text(note)))
    return table(rows)


def cmd_containers(args: argparse.Namespace, settings: Settings) -> int:
    import time

    ctl = _controller(settings)
    try:
        deps = out_of_process(ctl)
    finally:
        ctl.close()
    if args.json:
        print(json.dumps([to_jsonable(d) for d in deps], ensure_ascii=False, indent=2))
    elif not deps:
        print("No memctl containers.")
    else:
        print(format_table(deps, time.time()))
    return 0


def cmd_stop(args: argparse.Namespace, settings: Settings) -> int:
    ctl = _controller(settings)
    try:
        report = ctl.unload(args.name)
    except ModelNotFoundError as exc:
        _why_not_found(ctl, args.name, exc)
        raise
    finally:
        ctl.close()
    print(f"stopped {escape_text(report.model_id)}: {report.message.text}")
    return 0


def _why_not_found(ctl: ControllerAPI, name: str, exc: ModelNotFoundError) -> None:
    """A name not found may be a container Docker cannot be asked about: say that Docker is down
    (DockerUnavailableError) rather than "not loaded"."""
    try:
        out_of_process(ctl)
    except DockerUnavailableError as down:
        raise DockerUnavailableError(
            f"{name} is not a model of this process, and memctl's containers cannot be listed: {down.message}",
            down.hint, details=down.details, args={"name": name}) from exc
    except MemctlError:
        pass


def cmd_stop_all(args: argparse.Namespace, settings: Settings) -> int:
    ctl = _controller(settings)
    try:
        return _stop_all(ctl)
    finally:
        ctl.close()


def _stop_all(ctl: ControllerAPI) -> int:
    deps = out_of_process(ctl)
    if not deps:
        print("No memctl containers to stop.")
        return 0
    failed = 0
    for d in deps:
        try:
            report = ctl.unload(d.handle)
            print(f"stopped {escape_text(d.name or d.handle)}: {report.message.text}")
        except MemctlError as exc:
            failed += 1
            print(f"FAILED  {escape_text(d.name or d.handle)}: {exc}", file=sys.stderr)
    return 1 if failed else 0
