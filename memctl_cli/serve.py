"""``memctl serve``, ``memctl ps``, ``memctl unload MODEL``, ``memctl ide roo|continue``.

Each handler is ``(args, ctl) -> exit code`` where ``ctl`` is a ``ControllerAPI`` from
:func:`server.connect.controller_for`: a client of the machine's owner process when one runs (then the
command acts on the models that process holds), else this process's controller. :func:`add_commands`
registers them with ``func(args, settings)`` wrappers that pick the controller, so ``memctl_cli.main``
runs them like its other sub-commands; what they show comes from :mod:`server.served`. Exit codes (as ``memctl_cli.main`` documents them): 0 ok, 1 the
operation failed or had nothing to act on (``unload`` of a model that is not loaded), 2 bad input
(unknown or malformed model id, bad port); messages and hints on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from memctl_cli.output import fmt_duration, print_error, table
from memory_controller import errors
from memory_controller.types import to_jsonable
from server.served import base_url as served_base_url
from server.served import (
    message_text,
    owner_of,
    ps_rows,
    served_context,
    serving_pause_of,
    tools_honoured,
)

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.settings import Settings

Handler = Callable[[argparse.Namespace, Any], int]
_BAD_INPUT = (errors.InvalidModelIdError, errors.ModelNotFoundError, errors.SettingsError)
NOT_LOADED = "not_loaded"  # a well-formed name of nothing running: the unload had nothing to act on (1, not 2)


# --------------------------------------------------------------------------- wiring
def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 1..65535 (0: any free port)")
    return value


def run_handler(handler: Handler, args: argparse.Namespace, settings: Settings, *, local: bool = False) -> int:
    """Build the controller (``local``: this process's, never a client) and run ``handler``; errors
    become exit codes."""
    from server.connect import controller_for, local_controller  # httpx loads only for commands that need it

    as_json = bool(getattr(args, "json", False))
    ctl = None
    try:
        ctl = local_controller(settings) if local else controller_for(settings)
        return int(handler(args, ctl))
    except errors.MemctlError as exc:
        print_error(exc, as_json)
        return 2 if isinstance(exc, _BAD_INPUT) and exc.code != NOT_LOADED else 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug must still not print a traceback at the user
        print_error(errors.MemctlError(f"internal error: {type(exc).__name__}: {exc}",
                                       "please report it with the command you ran"), as_json)
        return 1
    finally:
        if ctl is not None:
            ctl.close()


def _wrap(handler: Handler, *, local: bool = False) -> Callable[[argparse.Namespace, Settings], int]:
    def func(args: argparse.Namespace, settings: Settings) -> int:
        return run_handler(handler, args, settings, local=local)

    func.__name__ = handler.__name__
    return func


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``serve``, ``ps``, ``unload``, ``ide`` on memctl's sub-command parser."""
    p = subparsers.add_parser("serve", help="run the memctl server (OpenAI-compatible API for the IDE) here; "
                                            "`memctl serve resume`: allow loads on demand again after a clear")
    p.add_argument("action", nargs="?", choices=["resume"], default=None,
                   help="resume: lift the on-demand pause of the running server (after an emergency clear or "
                        "an unload, requests do not load models until the user loads one or resumes)")
    p.add_argument("--port", type=_port, default=None, help="port (default: serve_port, 8765; 0: any free port)")
    p.set_defaults(func=cmd_serve_entry, handler=cmd_serve)

    p = subparsers.add_parser("ps", help="what runs: model, backend, endpoint, context, memory, requests")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_wrap(cmd_ps), handler=cmd_ps)

    p = subparsers.add_parser("unload", help="unload a model (through the memctl server when one runs)")
    p.add_argument("model", help="model id, as `memctl ps` shows it")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_wrap(cmd_unload), handler=cmd_unload)

    p = subparsers.add_parser("ide", help="print IDE settings for the memctl server (Roo Code/ZooCode, Continue, "
                                          "Kilo Code, aider)")
    ide_sub = p.add_subparsers(dest="ide", required=True)
    for name, what in (("roo", "a Roo Code / ZooCode settings file (Settings → Import)"),
                       ("continue", "a Continue config.yaml"),
                       ("kilo", "Kilo Code's kilo.json (./kilo.json or ~/.config/kilo/kilo.json)"),
                       ("aider", "aider's .aider.model.metadata.json (--write DIR: it and .aider.model.settings.yml)")):
        q = ide_sub.add_parser(name, help=what)
        q.add_argument("--model", default=None, help="model id (default: the one running)")
        if name == "aider":
            q.add_argument("--write", default=None, metavar="DIR",
                           help="write .aider.model.metadata.json and .aider.model.settings.yml into DIR")
        q.set_defaults(func=_wrap(cmd_ide), handler=cmd_ide)


register = add_commands  # memctl_cli's sub-command modules expose register(subparsers)


# --------------------------------------------------------------------------- serve
def cmd_serve_entry(args: argparse.Namespace, settings: Settings) -> int:
    from memory_controller.quiet import quiet_library_output
    from server.owner import read_owner

    if getattr(args, "action", None) == "resume":
        return run_handler(cmd_serve_resume, args, settings)
    quiet_library_output()  # the server's log says what memctl does, not Transformers' progress bars

    try:
        owner = read_owner(settings, wait_s=0.5)
    except errors.MemctlError as exc:
        print_error(exc)
        return 1
    if owner is not None:
        print_error(errors.MemctlError(f"the memctl server already runs (PID {owner.pid}) at {owner.url}",
                                        "use it (its OpenAI base URL is " + owner.url + "/v1), or stop it first",
                                        code="owner_exists"))
        return 1
    return run_handler(cmd_serve, args, settings, local=True)


def cmd_serve(args: argparse.Namespace, ctl: Any) -> int:
    """Serve in the foreground until Ctrl-C; prints the URLs once it answers."""
    from server.runner import ServerHandle

    handle = ServerHandle(ctl.local, ctl.settings, port=args.port, log_level="info")

    def ready(url: str) -> None:
        print(f"memctl server on {url} (PID {_pid()})", flush=True)
        print(f"OpenAI base URL for the IDE: {url}/v1", flush=True)
        print("Ctrl-C stops it", flush=True)

    try:
        handle.serve_forever(on_ready=ready)
    except KeyboardInterrupt:
        pass
    print("memctl server stopped", file=sys.stderr, flush=True)
    return 0


def cmd_serve_resume(args: argparse.Namespace, ctl: Any) -> int:
    """Lift the on-demand pause of the running server."""
    if owner_of(ctl) is None:
        print_error(errors.MemctlError("no memctl server runs, so nothing is paused",
                                        "start one with `memctl serve`", code="no_owner"))
        return 1
    pause = ctl.serving_pause()
    if ctl.resume_serving():
        why = (pause or {}).get("reason", "a clear").replace("_", " ")
        print(f"serving resumed: requests load models on demand again (paused since {why})")
    else:
        print("serving was not paused: requests load models on demand")
    return 0


def _pid() -> int:
    import os

    return os.getpid()


# --------------------------------------------------------------------------- ps
def _tools_cell(row: dict[str, Any]) -> str:
    """yes (parsed by memctl or the engine), no (the template does not render tools: 400 tools_not_supported),
    text (accepted, calls come back as text: unknown family), — (unknown)."""
    if row.get("tools") is False:
        return "no"
    if row.get("tools_parsed"):
        return "yes"
    if row.get("tools_parsed") is False:
        return "text"
    return "—"


def cmd_ps(args: argparse.Namespace, ctl: Any) -> int:
    from memory_controller.backend import describe_memory

    rows = ps_rows(ctl)
    if args.json:
        owner = owner_of(ctl)
        print(json.dumps({"server": {"url": owner.url, "pid": owner.pid} if owner else None, "models": rows,
                          "paused": serving_pause_of(ctl)}, ensure_ascii=False, indent=2))
        return 0
    if owner_of(ctl) is None:
        print("No memctl server runs (`memctl serve` starts one); models of this process only.", file=sys.stderr)
    pause = serving_pause_of(ctl)
    if pause is not None:
        print(f"On-demand loading is paused since {str(pause.get('reason', '')).replace('_', ' ')}: requests do not "
              "load models until you load one or run `memctl serve resume`.")
    if not rows:
        print("No models running.")
        return 0
    rows_out = [["MODEL", "BACKEND", "ENDPOINT", "CONTEXT", "MEMORY", "TOOLS", "IN FLIGHT", "IDLE UNLOAD IN"]]
    for r in rows:
        memory = describe_memory(dict(sorted(r["memory_bytes"].items())), r.get("mapped_bytes") or 0) or "—"
        flight = str(r["in_flight"]) + (f" (+{r['queued']} queued)" if r["queued"] else "")
        rows_out.append([r["model"], r["backend"], r["endpoint"] or "—",
                         "—" if r["context_tokens"] is None else str(r["context_tokens"]), memory,
                         _tools_cell(r), flight, fmt_duration(r["idle_unload_in_s"])])
    print(table(rows_out))
    for r in rows:
        if r["tools_parsed"] is False:
            print(f"note: {r['model']}: tool calls are not parsed (unknown model family); text comes back as is")
    return 0


# --------------------------------------------------------------------------- unload
def cmd_unload(args: argparse.Namespace, ctl: Any) -> int:
    report = ctl.unload(args.model)
    data = to_jsonable(report)
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        message = data.get("message") if isinstance(data, dict) else None
        text = message.get("text") if isinstance(message, dict) else str(message or "")
        print(text or f"unloaded {args.model}")
    verdict = data.get("verdict") if isinstance(data, dict) else None
    return 1 if verdict == "error" else 0


# --------------------------------------------------------------------------- ide
def cmd_ide(args: argparse.Namespace, ctl: Any) -> int:
    from memory_controller.ide import (
        aider_metadata,
        aider_model_name,
        aider_settings,
        continue_config,
        kilo_config,
        roo_settings,
    )

    settings = ctl.settings
    model_id, ctx, notes = served_context(ctl, args.model)
    base_url = served_base_url(ctl)
    if base_url is None:
        host = settings.bind_address if settings.bind_address not in ("0.0.0.0", "::") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        base_url = f"http://{host}:{settings.serve_port}/v1"
        print(f"note: no memctl server runs now; start it with `memctl serve` (it will answer at {base_url})",
              file=sys.stderr)
    key = settings.serve_api_key.get_secret_value() if settings.serve_api_key else None
    for note in notes:
        print(f"note: {message_text(note)}", file=sys.stderr)
    from memory_controller.ide import model_max_positions, small_window_advice

    advice = small_window_advice(ctx, settings.ide_min_context, model_max_positions(getattr(ctl, "resolve", None),
                                                                                    model_id))
    if advice is not None:  # one piece of advice, fitting the cause (never "free memory" at the model's max)
        print(f"warning: {model_id}: {advice.text}", file=sys.stderr)
    if args.ide == "roo":
        print(json.dumps(roo_settings(base_url, model_id, ctx, key), ensure_ascii=False, indent=2))
    elif args.ide == "continue":
        sys.stdout.write(continue_config(base_url, model_id, ctx, key, tools=tools_honoured(ctl, model_id)))
    elif args.ide == "kilo":
        cfg = kilo_config(base_url, [(model_id, ctx, tools_honoured(ctl, model_id))], key)
        print(json.dumps(cfg, ensure_ascii=False, indent=2))
        print(f"note: save it as ./kilo.json (or ~/.config/kilo/kilo.json); run `kilo run -m memctl/{model_id} ...`",
              file=sys.stderr)
    else:
        metadata = json.dumps(aider_metadata(model_id, ctx), ensure_ascii=False, indent=2)
        run = (f"aider --model {aider_model_name(model_id)} --openai-api-base {base_url} "
               f"--openai-api-key {'$MEMCTL_SERVE_API_KEY' if key else 'not-needed'}")
        if args.write:
            from pathlib import Path

            folder = Path(args.write)
            if not folder.is_dir():
                raise errors.SettingsError(f"{args.write} is not a folder", "give an existing folder: --write DIR")
            (folder / ".aider.model.metadata.json").write_text(metadata + "\n")
            (folder / ".aider.model.settings.yml").write_text(aider_settings(model_id, ctx))
            print(f"wrote {folder / '.aider.model.metadata.json'} and {folder / '.aider.model.settings.yml'}")
        else:
            print(metadata)
        print(f"note: run `{run}` (in the folder holding the two files; `--write DIR` writes them)",
              file=sys.stderr)
    return 0
