"""What the memctl server serves, as the dashboard and the CLI both show it: one row per deployment
(``memctl ps``), the context the server enforces for a model (``memctl ide``, the IDE section) and whether
it parses the model's tool calls. Each takes a ``ControllerAPI`` from :func:`server.connect.controller_for`:
the owner's client when one runs (then the owner's base URL is the endpoint), else this process's controller.
"""

from __future__ import annotations

from typing import Any

from memory_controller import errors


def owner_of(ctl: Any) -> Any | None:
    """The owner's OwnerInfo when ``ctl`` is its client, else None (this process's controller)."""
    from .client import RemoteController

    return ctl.owner if isinstance(ctl, RemoteController) else None


def base_url(ctl: Any) -> str | None:
    owner = owner_of(ctl)
    return f"{owner.url}/v1" if owner is not None else None


def ps_rows(ctl: Any) -> list[dict[str, Any]]:
    """One JSON-ready row per deployment, with the server's queue and idle countdown when it runs."""
    serve = ctl.serve_status()
    in_flight = ctl.in_flight()
    served_at = base_url(ctl)
    rows = []
    for d in ctl.deployments():
        s = serve.get(d.model_id, {})
        rows.append({
            "model": d.model_id,
            "backend": d.backend_id,
            "state": getattr(d.state, "value", d.state),
            "endpoint": served_at or d.endpoint,
            "backend_endpoint": d.endpoint,
            "context_tokens": d.context_tokens,
            "precision": getattr(getattr(d.profile, "precision", None), "value", None),
            "memory_bytes": dict(d.memory_bytes),
            "mapped_bytes": getattr(d, "mapped_bytes", 0),  # resident pages of memory-mapped weight files
            "in_flight": s.get("in_flight", in_flight.get(d.model_id, 0)),
            "queued": s.get("queued", 0),
            "idle_unload_in_s": s.get("idle_unload_in_s"),
            "tools_parsed": s.get("tools_parsed"),
            "tools": s.get("tools"),
        })
    return rows


def serving_pause_of(ctl: Any) -> dict | None:
    """The server's on-demand pause (None: not paused, or the owner could not say)."""
    try:
        return ctl.serving_pause()
    except errors.MemctlError:
        return None


def running_deployment(ctl: Any, model_id: str | None) -> Any | None:
    ready = [d for d in ctl.deployments() if getattr(d.state, "value", d.state) == "ready"]
    if model_id is None:
        if len(ready) > 1:
            names = ", ".join(d.model_id for d in ready)
            raise errors.InvalidModelIdError(f"several models run ({names})", "name one: --model M")
        return ready[0] if ready else None
    return next((d for d in ready if d.model_id == model_id), None)


def served_context(ctl: Any, model_id: str | None) -> tuple[str, int, tuple[Any, ...]]:
    """(model id, the context the server enforces for it, notes): a running deployment's context,
    else what ``ctl.plan(..., purpose="ide")`` would serve it with."""
    dep = running_deployment(ctl, model_id)
    if dep is not None and dep.context_tokens:
        return dep.model_id, int(dep.context_tokens), ()
    if model_id is None:
        raise errors.InvalidModelIdError("no model runs", "name one: --model M (`memctl models` lists them)")
    plan = ctl.plan(default_backend_id(ctl, model_id), model_id, purpose="ide")
    get = plan.get if isinstance(plan, dict) else (lambda k, d=None: getattr(plan, k, d))
    profile = get("profile")
    ctx = profile.get("context_tokens") if isinstance(profile, dict) else getattr(profile, "context_tokens", None)
    blockers = tuple(get("blockers", ()) or ())
    if not get("fits", True) or not ctx:
        why = "; ".join(message_text(b) for b in blockers) or "it does not fit in free memory"
        raise errors.InsufficientMemoryError(f"{model_id} cannot be served here: {why}",
                                             message_text(get("suggestion")) or "free memory or pick a smaller model")
    return model_id, int(ctx), tuple(get("notes", ()) or ())


def default_backend_id(ctl: Any, model_id: str) -> str:
    """The backend an on-demand load of ``model_id`` would use (the server's choice)."""
    return str(ctl.serving_backend_id())


def message_text(m: Any) -> str:
    if m is None:
        return ""
    if isinstance(m, dict):
        return str(m.get("text") or m.get("code") or "")
    return str(m)


def tools_honoured(ctl: Any, model_id: str) -> bool:
    """Whether the server parses ``model_id``'s tool calls (its template renders tools and its family is known,
    or the engine parses them): what IDE settings may promise. Asks the owner's /v1/models when one runs."""
    owner = owner_of(ctl)
    if owner is not None:
        import httpx

        key = ctl.settings.serve_api_key
        headers = {"authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}
        try:
            data = httpx.get(f"{owner.url}/v1/models", headers=headers, timeout=30, trust_env=False).json()
            entry = next((m for m in data.get("data", []) if m.get("id") == model_id), None)
        except (httpx.HTTPError, ValueError, AttributeError):
            return False
        info = (entry or {}).get("memctl") or {}
        return info.get("tool_parser") == "engine" or info.get("tools") is True
    from memory_controller.serving import ControllerEffects

    ctl = getattr(ctl, "local", ctl)  # the in-process ControllerAPI wraps this process's controller
    try:
        return ControllerEffects(ctl, ctl.settings).tools_supported(ctl.resolve(model_id), None) is True
    except errors.MemctlError:
        return False
