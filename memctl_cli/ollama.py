"""``memctl ollama ps|unload|fit``: Ollama as another holder, and as the ``ollama`` serving backend.

``memctl ollama fit [MODEL] [--apply] [--json]``: per installed model, its size, quantisation, trained
context, tools yes/no and the largest ``num_ctx`` that keeps it 100 % on the GPU now (the same plan the
dashboard and ``memctl serve`` make); ``--apply`` (one model) creates the derived tag, loads it and
verifies it with ``/api/ps``; when Ollama spills it to the CPU anyway, memctl unloads it, plans again with
the measured size (calibration) and tries once more at the smaller context.

Exit codes: 0 done (an unload whose memory came back slowly too: a warning is printed), 1 Ollama
down, slow, refusing, malformed, or the model still listed after the wait, 2 a bad name or setting.
Handlers take ``(args, ctl)``: ``ctl`` gives ``settings`` and ``probe`` (an unload waits for the
memory to come back on NVML) and, when it has one, ``holder_source("ollama")`` returning the client.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from memctl_cli.output import fmt_duration, print_error, table
from memory_controller.errors import MemctlError, SettingsError
from memory_controller.settings import Settings
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
    fit = sub.add_parser("fit", help="the largest num_ctx that keeps each model on the GPU; --apply makes it so")
    fit.add_argument("model", nargs="?", help="one installed model (e.g. gpt-oss:20b); default: all")
    fit.add_argument("--apply", action="store_true",
                     help="create the derived tag (<model>-memctl-<ctx>), load it and verify it with /api/ps")
    fit.add_argument("--json", action="store_true", help="machine-readable output")
    fit.set_defaults(func=cmd_ollama_fit)


OLLAMA = "ollama"  # the backend id these commands are about


def client_for(ctl: Any) -> Any:
    """The Ollama client: the ``ollama`` backend's (every model Ollama lists, memctl's derived tags too),
    else the holder the controller has (``ctl.holder_source("ollama")``); given Settings (or something with
    ``settings``/``probe``), a local controller's."""
    c = _controller(ctl)
    try:
        return c.backend("ollama").client
    except (MemctlError, AttributeError):
        pass
    client = c.holder_source("ollama")
    if client is None:
        raise MemctlError("the Ollama client could not be built", "check MEMCTL_OLLAMA_HOST")
    return client


def _fail(exc: MemctlError, as_json: bool) -> int:
    print_error(exc, as_json)
    bad_input = isinstance(exc, SettingsError) or exc.code == "ollama.bad_name"
    return 2 if bad_input else 1


def _until(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds <= 0:
        return "now"
    return fmt_duration(seconds)


def format_ps(models: list[Any]) -> str:
    rows = [("NAME", "SIZE", "IN VRAM", "UNLOADS IN")]
    for m in models:
        rows.append((m.name, fmt_bytes(m.size), fmt_bytes(m.size_vram), _until(m.expires_in_s())))
    return table(rows)


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


def _controller(ctl: Any) -> Any:
    if hasattr(ctl, "plan") and hasattr(ctl, "backend"):
        return ctl
    from memory_controller import MemoryController

    return MemoryController(getattr(ctl, "settings", ctl), probe=getattr(ctl, "probe", None))


def fit_context(given: Any) -> tuple[Any, Any]:
    """What ``ollama fit`` acts through: the controller of every entry point (``server.connect.controller_for``:
    the owner's client when ``memctl serve`` or a dashboard runs, so plans and loads are the owner's), and
    this process's ``ollama`` backend for Ollama's own facts (what is installed, what runs: read only).
    ``given``: Settings, or a controller handed in as it is (scripts, tests)."""
    from memory_controller.registry import BackendRegistry

    if isinstance(given, Settings):
        from server.connect import controller_for

        ctl = controller_for(given)
    else:
        ctl = given
    cfg = ctl.settings.backends.get(OLLAMA)
    if cfg is None:
        raise MemctlError("the ollama backend is not configured",
                          'add [backends.ollama] factory = "backends.ollama:create" to the config file',
                          code="ollama.not_configured")
    return ctl, BackendRegistry({OLLAMA: cfg.factory}, ctl.settings, None).get(OLLAMA)


def fit_rows(ctl: Any, model: str | None = None, backend: Any = None) -> list[dict[str, Any]]:
    """One row per installed model (or ``model``): facts and the plan's fitted context. Raises MemctlError."""
    backend = backend if backend is not None else ctl.backend("ollama")
    avail = backend.availability(ctl.devices())
    if not avail.ok:
        raise MemctlError(avail.reason.text if avail.reason else "Ollama is unavailable",
                          "start Ollama (ollama serve) or set MEMCTL_OLLAMA_HOST / OLLAMA_HOST", code="ollama.down")
    infos = [backend.info(model)] if model else backend.installed(fresh=True)
    rows = []
    for m in infos:
        row: dict[str, Any] = {"model": m.name, "size_bytes": m.size_bytes, "quantization": m.quantization,
                               "family": m.family, "trained_context": m.trained_context, "tools": m.tools,
                               "capabilities": list(m.capabilities), "metadata_from": m.spec.source if m.spec else None}
        try:
            plan = ctl.plan("ollama", m.name, purpose="ide")
            fits = plan.fits and not plan.blockers
            row.update(num_ctx=plan.profile.context_tokens if fits else 0, fits=fits, device=plan.device_key,
                       needed_bytes=plan.needed_bytes, free_bytes=plan.free_bytes_after_unload,
                       derived_tag=backend.derived_name(m.name, plan.profile.context_tokens) if fits else None,
                       blockers=[b.text for b in plan.blockers],
                       notes=[n.text for n in plan.notes if n.code in ("ollama.kv_advice", "ollama.no_tools",
                                                                       "ollama.calibrated", "ide.model_max_below_minimum")],
                       calibration_bytes=backend.calibration.delta(m.name))
            row["_plan"] = plan
        except MemctlError as exc:
            row.update(num_ctx=0, fits=False, blockers=[exc.message], notes=[], derived_tag=None)
        rows.append(row)
    return rows


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def format_fit(rows: list[dict[str, Any]]) -> str:
    table = [("MODEL", "SIZE", "QUANT", "TRAINED", "LARGEST NUM_CTX", "TOOLS")]
    for r in rows:
        where = "the GPU" if str(r.get("device", "")).startswith("gpu") else "host memory (no GPU)"
        ctx = f"{r['num_ctx']} in {where}" if r.get("fits") else "does not fit"
        table.append((r["model"], fmt_bytes(r["size_bytes"]), r.get("quantization") or "—",
                      str(r.get("trained_context") or "—"), ctx, "yes" if r["tools"] else "no (agents need tools)"))
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)).rstrip() for t in table]
    for r in rows:
        lines += [f"⛔ {r['model']}: {b}" for b in r.get("blockers", [])]
        lines += [f"ℹ️ {n}" if r["model"] in n else f"ℹ️ {r['model']}: {n}" for n in r.get("notes", [])]
    return "\n".join(lines)


def apply_fit(ctl: Any, row: dict[str, Any], backend: Any = None) -> dict[str, Any]:
    """Apply the row's plan through ``ctl``; when Ollama spills it anyway (InsufficientMemoryError after the
    load, rolled back), plan again with the measured size and try once more. Returns what runs, verified."""
    from memory_controller.errors import InsufficientMemoryError

    plan = row["_plan"]
    tries = []
    for _ in range(2):
        if not plan.fits or plan.blockers:
            break
        try:
            ctl.apply(plan)
            break
        except InsufficientMemoryError as exc:
            tries.append({"num_ctx": plan.profile.context_tokens, "error": exc.message})
            plan = ctl.plan("ollama", row["model"], purpose="ide")
    backend = backend if backend is not None else ctl.backend("ollama")
    dep = next((d for d in backend.list_managed() if d.model_id == row["model"]), None)
    if dep is None:
        why = tries[-1]["error"] if tries else (plan.blockers[0].text if plan.blockers else "it does not fit")
        raise MemctlError(f"{row['model']} was not applied: {why}",
                          "free GPU memory (memctl status) or choose a smaller model", code="ollama.fit_failed")
    return {"model": row["model"], "derived_tag": dep.handle, "num_ctx": dep.context_tokens,
            "size_bytes": dep.detail.get("size"), "size_vram_bytes": dep.detail.get("size_vram"),
            "verified": backend.verify(dep), "stepped_down_from": [t["num_ctx"] for t in tries],
            "endpoint": dep.endpoint}


def cmd_ollama_fit(args: argparse.Namespace, given: Any) -> int:
    ctl = None
    try:
        if args.apply and not args.model:
            raise MemctlError("--apply needs one model", "name it: memctl ollama fit gpt-oss:20b --apply",
                              code="ollama.bad_name")
        ctl, backend = fit_context(given)
        rows = fit_rows(ctl, args.model, backend)
        applied = apply_fit(ctl, rows[0], backend) if args.apply else None
    except MemctlError as exc:
        return _fail(exc, args.json)
    finally:
        if ctl is not None and ctl is not given:
            ctl.close()  # the controller this command connected to (the owner's client)
    if args.json:
        out: dict[str, Any] = {"models": [_public(r) for r in rows]}
        if applied is not None:
            out["applied"] = applied
        print(json.dumps(out, ensure_ascii=False, indent=2))
    else:
        print(format_fit(rows))
        if applied is not None:
            print(f"✅ {applied['derived_tag']}: {applied['verified']}")
    return 0


register = add_commands  # memctl's sub-command modules expose register(subparsers)
