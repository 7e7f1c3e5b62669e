"""``memctl`` command line: status, models, estimate, containers, stop, stop-all.

Exit codes (every sub-command):

* 0 — done (also with no GPU);
* 1 — the operation failed or could not act: a model that is not loaded, Docker or Ollama down, a
  release that failed, an internal error;
* 2 — bad arguments or settings: a malformed model id, an invalid ``MEMCTL_*`` value, a bad port,
  ``ide --model`` naming a model that is not cached;
* 130 — interrupted (Ctrl-C); 141 — the output was closed early (``memctl models --json | head``).

With ``--json`` an error is also printed as JSON on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

from memctl_cli.output import print_error
from memory_controller.backend import describe_memory
from memory_controller.errors import InvalidModelIdError, MemctlError, SettingsError
from memory_controller.settings import Settings, load_settings, settings_warnings
from memory_controller.units import escape_text, fmt_bytes

# Modules that add subcommands: each has register(subparsers) setting func(args, settings) -> int.
_SUBCOMMAND_MODULES = ("memctl_cli.models", "memctl_cli.containers", "memctl_cli.ollama", "memctl_cli.export",
                       "memctl_cli.serve")


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Devices, the recommendation, backends and what runs: the owner's view when one runs."""
    from server.connect import controller_for

    ctl = controller_for(settings)
    try:
        data = ctl.status()
    finally:
        ctl.close()
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2))
        return 0
    if not data["gpu_available"]:
        print(f"No GPU: {data['no_gpu_reason']}")
    for d in data["devices"]:
        level = {"green": "🟢", "yellow": "🟡", "red": "🔴"}[d["level"]]
        util = "—" if d["utilization_pct"] is None else f"{d['utilization_pct']:.0f}%"
        status = "" if d["status"] == "ok" else f"  [{d['status']}: {d['hint']}]"
        print(f"{level} {d['key']:<6} {d['name']}: total {fmt_bytes(d['total_bytes'])}, "
              f"used {fmt_bytes(d['used_bytes'])}, free {fmt_bytes(d['free_bytes'])}, util {util}{status}")
    from memctl_cli.models import recommendation_lines

    for line in recommendation_lines(data["recommendation"], settings.bands):
        print(line)
    for bid, b in data["backends"].items():
        if not b["available"]:
            print(f"{bid} unavailable: {b['reason']}")
    for d in data["deployments"]:
        mapped = int((d.get("detail") or {}).get("mapped_bytes") or 0)
        mem = describe_memory(d["memory_bytes"], mapped) or "—"
        print(f"running: {escape_text(d['model_id'])} ({d['backend_id']}, {d['state']}) {mem}"
              + (f" at {d['endpoint']}" if d["endpoint"] else ""))
    return 0


def log_write_errors() -> list[str]:
    """Operation-log writes that failed in this process (an operation that ran but left no record)."""
    from memory_controller.oplog import process_write_errors

    return process_write_errors()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memctl", description="Local LLM memory control (GPU / host)",
                                     epilog="exit codes: 0 done, 1 failed or nothing to act on, 2 bad arguments "
                                            "or settings, 130 interrupted, 141 output closed early")
    parser.add_argument("--version", action="version", version=f"memctl {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", help="devices, memory and the recommended profile")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    for mod_name in _SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        mod.register(sub)
    return parser


def version() -> str:
    """The installed package's version (pyproject.toml's), or "unknown" when it is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("memctl")
    except PackageNotFoundError:
        return "unknown"


EXIT_PIPE_CLOSED = 141  # as a shell reports a program ended by SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; its exit code. Output into a pipe closed early (``| head``) ends quietly."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        # Python would flush stdout again at exit and print a second error: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE_CLOSED


def _main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print_error(exc)
        return 2
    for warning in settings_warnings():
        print(f"warning: {warning}", file=sys.stderr)
    try:
        code = int(args.func(args, settings))
        problems = log_write_errors()
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1 if problems and code == 0 else code
    except MemctlError as exc:
        print_error(exc, bool(getattr(args, "json", False)))  # with --json stdout stays machine-readable
        # a malformed model id is a bad argument (2); anything else is a failed operation (1)
        return 2 if isinstance(exc, InvalidModelIdError) else 1


if __name__ == "__main__":
    sys.exit(main())
