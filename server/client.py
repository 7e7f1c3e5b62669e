"""A client of the owner process with the controller's Python surface (the part the CLI, the dashboard
and the diagnostic page use), over the control API.

Results come back as the same dataclasses the controller returns (:func:`from_jsonable` rebuilds them
from their JSON by their type hints): ``SystemSnapshot``, ``CatalogResult``, ``Deployment``, ``Plan``,
``OperationRecord``, ``ReleaseReport``, ``ClearReport``, ``EmergencyReport``; ``status()`` and
``current_operation()`` are plain dicts, as locally. A type this checkout cannot rebuild comes back as
a plain dict. Errors come back as the same ``MemctlError`` subclasses, message, hint and code included.

No web framework here: only httpx.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import importlib
import types
import typing
from typing import TYPE_CHECKING, Any, Union

import httpx

from memory_controller import errors

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.settings import Settings

    from .owner import OwnerInfo

T = typing.TypeVar("T")


# --------------------------------------------------------------------------- JSON -> dataclasses
def from_jsonable(tp: Any, data: Any) -> Any:
    """Rebuild a value of type ``tp`` from ``to_jsonable`` output (dataclasses, enums, tuples,
    Optionals, mappings, lists), recursively. Raises TypeError/ValueError/KeyError on a mismatch."""
    if tp is Any or tp is object or isinstance(tp, typing.TypeVar):
        return data
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if data is None:
            return None
        last: Exception | None = None
        for option in options:
            try:
                return from_jsonable(option, data)
            except (TypeError, ValueError, KeyError) as exc:
                last = exc
        raise TypeError(f"{data!r:.80} matches none of {tp}") from last
    if data is None:
        return None
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(data, dict):
            raise TypeError(f"{tp.__name__}: expected an object, got {type(data).__name__}")
        hints = typing.get_type_hints(tp)
        kwargs = {f.name: from_jsonable(hints.get(f.name, Any), data[f.name])
                  for f in dataclasses.fields(tp) if f.init and f.name in data}
        return tp(**kwargs)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            # Profile.mode holds a backend id ("inmem") where the hint says Mode: keep the string
            if issubclass(tp, str) and isinstance(data, str):
                return data
            raise
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_jsonable(args[0], x) for x in data)
        if args:
            return tuple(from_jsonable(a, x) for a, x in zip(args, data, strict=True))
        return tuple(data)
    if origin in (set, frozenset, collections.abc.Set):
        (arg,) = typing.get_args(tp) or (Any,)
        return (frozenset if origin is frozenset else set)(from_jsonable(arg, x) for x in data)
    if origin in (list, collections.abc.Sequence, collections.abc.Iterable):
        (arg,) = typing.get_args(tp) or (Any,)
        return [from_jsonable(arg, x) for x in data]
    if origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        args = typing.get_args(tp)
        value_t = args[1] if len(args) == 2 else Any
        if not isinstance(data, dict):
            raise TypeError(f"expected an object, got {type(data).__name__}")
        return {k: from_jsonable(value_t, v) for k, v in data.items()}
    if tp is float and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    if isinstance(tp, type) and tp in (int, float, str, bool) and not isinstance(data, tp):
        raise TypeError(f"expected {tp.__name__}, got {type(data).__name__}")
    if tp is tuple and isinstance(data, list):
        return tuple(data)
    return data


_TYPE_MODULES = ("memory_controller.types", "memory_controller.backend", "memory_controller.planning",
                 "memory_controller.reports", "memory_controller.controller")


def _find_type(name: str) -> type | None:
    for mod_name in _TYPE_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        found = getattr(mod, name, None)
        if isinstance(found, type):
            return found
    return None


def decode(type_name: str, data: Any) -> Any:
    """``data`` as the controller's ``type_name`` dataclass, or as it came when this checkout has no
    such type or the JSON does not match it."""
    tp = _find_type(type_name)
    if tp is None or data is None:
        return data
    try:
        return from_jsonable(tp, data)
    except (TypeError, ValueError, KeyError, NameError):
        return data


def to_json(value: Any) -> Any:
    """``to_jsonable`` plus sets (a plan's basis) as lists: what httpx can send."""
    from memory_controller.types import to_jsonable

    def plain(v: Any) -> Any:
        if isinstance(v, (set, frozenset)):
            return [plain(x) for x in sorted(v, key=repr)]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(to_jsonable(value))


def error_from_body(body: Any, status_code: int) -> errors.MemctlError:
    """The MemctlError (same class when known) the owner raised, from its JSON error body."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return errors.MemctlError(f"the memctl owner answered HTTP {status_code}",
                                  "see the owner process's log", code="owner_error")
    cls = getattr(errors, str(err.get("error", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.MemctlError)):
        cls = errors.MemctlError
    exc = cls.__new__(cls)
    errors.MemctlError.__init__(exc, str(err.get("message") or f"HTTP {status_code}"), err.get("hint"),
                                details=err.get("details"), code=err.get("code"), args=err.get("args") or {})
    if isinstance(exc, errors.InsufficientMemoryError):
        exc.needed_bytes, exc.free_bytes = err.get("needed_bytes"), err.get("free_bytes")
    if isinstance(exc, errors.ContainerStartError):
        exc.log_tail, exc.cause = [], None
    return exc


# --------------------------------------------------------------------------- the client
class RemoteController:
    """The owner's controller, seen from another process. Same method names and results as
    :class:`~memory_controller.MemoryController` for: devices, deployments, models, plan, apply,
    unload, clear_memory, emergency_clear, history, status, current_operation, in_flight,
    serving_backend_id; plus
    ``serve_status()`` (the server's per-model queue and idle-unload countdown) and ``owner``.
    """

    remote = True

    def __init__(self, owner: OwnerInfo, settings: Settings, *, timeout_s: float = 5.0) -> None:
        from .owner import TOKEN_HEADER

        self.owner = owner
        self.settings = settings
        self._timeout_s = timeout_s
        # trust_env=False: a proxy from the environment must never see the token
        self._http = httpx.Client(base_url=owner.url + "/control", headers={TOKEN_HEADER: owner.token},
                                  timeout=timeout_s, trust_env=False)

    def __repr__(self) -> str:
        return f"RemoteController(owner={self.owner!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemoteController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transport
    def _call(self, method: str, path: str, *, json: Any = None, params: dict | None = None,
              timeout_s: float | None = None) -> Any:
        try:
            resp = self._http.request(method, path, json=json, params=params,
                                      timeout=timeout_s if timeout_s is not None else self._timeout_s)
        except httpx.TimeoutException:
            raise errors.OperationTimeoutError(
                f"the memctl owner (PID {self.owner.pid}, {self.owner.url}) did not answer {path} in time",
                "it may be busy with a long operation; try again, or look at that process",
            ) from None
        except httpx.HTTPError as exc:
            raise errors.MemctlError(
                f"cannot reach the memctl owner (PID {self.owner.pid}) at {self.owner.url}: {type(exc).__name__}",
                "check that the process still runs; when it is gone, run the command again to take over",
                code="owner_unreachable",
            ) from None
        if resp.status_code == 401:
            raise errors.MemctlError("the memctl owner refused this process's token (HTTP 401)",
                                     "the owner restarted: run the command again", code="owner_token")
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code >= 400:
            raise error_from_body(body, resp.status_code)
        return body

    @property
    def _long_s(self) -> float:
        return float(self.settings.operation_timeout_s) + 60.0

    def ping(self) -> dict:
        return self._call("GET", "/ping")

    # ------------------------------------------------------------------ the controller's surface
    def devices(self) -> Any:
        return decode("SystemSnapshot", self._call("GET", "/devices"))

    def deployments(self) -> list[Any]:
        return [decode("Deployment", d) for d in self._call("GET", "/deployments")]

    def models(self, refresh: bool = False) -> Any:
        return decode("CatalogResult", self._call("GET", "/models", params={"refresh": refresh},
                                                  timeout_s=max(self._timeout_s, 60.0)))

    def plan(self, backend_id: str, model: Any, profile: Any = None, *, purpose: str = "switch") -> Any:
        body = {"backend_id": backend_id, "model_id": _model_id(model), "profile": to_json(profile),
                "purpose": purpose}
        return decode("Plan", self._call("POST", "/plan", json=body, timeout_s=max(self._timeout_s, 60.0)))

    def apply(self, plan_or_backend: Any, model: Any = None, profile: Any = None, force: bool = False,
              progress: Any = None, cancel_generation: bool = False) -> Any:
        """``apply(plan)`` runs exactly that plan in the owner (StalePlanError when it no longer holds,
        nothing touched); ``apply(backend_id, model, profile)`` plans and applies there. ``progress``
        is not called across processes (the owner's ``current_operation()`` shows it)."""
        opts = {"force": force, "cancel_generation": cancel_generation}
        if isinstance(plan_or_backend, str):
            body = {"backend_id": plan_or_backend, "model_id": _model_id(model), "profile": to_json(profile),
                    **opts}
        else:
            body = {"plan": to_json(plan_or_backend), **opts}
        return decode("OperationRecord", self._call("POST", "/apply", json=body, timeout_s=self._long_s))

    def serving_backend_id(self) -> str:
        return str(self._call("GET", "/serving_backend")["backend_id"])

    def unload(self, model: Any) -> Any:
        model_id = getattr(model, "model_id", None) or getattr(model, "handle", None) or str(model)
        return decode("ReleaseReport", self._call("POST", "/unload", json={"model_id": model_id},
                                                  timeout_s=self._long_s))

    def clear_memory(self) -> Any:
        return decode("ClearReport", self._call("POST", "/clear_memory", timeout_s=self._long_s))

    def emergency_clear(self) -> Any:
        return decode("EmergencyReport", self._call("POST", "/emergency_clear", timeout_s=self._long_s))

    def history(self, limit: int = 50) -> list[Any]:
        return [decode("OperationRecord", r) for r in self._call("GET", "/history", params={"limit": limit})]

    def status(self) -> dict:
        return self._call("GET", "/status")

    def current_operation(self) -> dict | None:
        return self._call("GET", "/current_operation")

    def in_flight(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self._call("GET", "/in_flight").items()}

    def serving_pause(self) -> dict | None:
        """The owner's on-demand pause (reason, since, models), or None."""
        return self._call("GET", "/serving").get("pause")

    def resume_serving(self) -> bool:
        """Lift the owner's on-demand pause; True when there was one."""
        return bool(self._call("POST", "/serving/resume", json={}).get("resumed"))

    def serve_status(self) -> dict[str, dict]:
        return self._call("GET", "/serve_status")


def _model_id(model: Any) -> str:
    if isinstance(model, str):
        return model
    model_id = getattr(model, "model_id", None)
    if not isinstance(model_id, str):
        raise errors.InvalidModelIdError(f"not a model: {model!r:.80}", "pass a model id such as org/name")
    return model_id
