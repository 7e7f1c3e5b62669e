"""A client of the owner process with the controller's Python surface (the part the CLI, the dashboard
and the diagnostic page use), over the control API.

:class:`RemoteController` implements ``memory_controller.api.ControllerAPI``. Results come back as the
same dataclasses the controller returns (:func:`from_jsonable` rebuilds them from their JSON by their
type hints); an answer that is not what the call returns (a foreign ``200 {}``) is refused with
:class:`OwnerAnswerError`, never believed. Errors come back as the same ``MemctlError`` subclasses,
message, hint and code included.

The token is sent only after the server proved it is the owner (:meth:`RemoteController.verify`:
a loopback URL, the lock held by the PID ``server.json`` names, that PID listening there, and an
HMAC of a fresh nonce under the token). No web framework here: only httpx.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import hmac
import secrets
import types
import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Union

import httpx

from memory_controller import errors
from memory_controller.api import MemorySample, OperationView
from memory_controller.backend import Availability, Capabilities, Deployment, ReleaseReport
from memory_controller.clusterfit import ExportResult
from memory_controller.holders import HolderSource, MemoryHolder
from memory_controller.planning import Plan
from memory_controller.reports import ClearReport, EmergencyReport
from memory_controller.types import (
    CachedModel,
    CatalogResult,
    DeviceSnapshot,
    Level,
    OperationRecord,
    Profile,
    ProgressCallback,
    ProgressEvent,
    Recommendation,
    SystemSnapshot,
)

from .owner import PROOF_PATH, TOKEN_HEADER, OwnerIdentityError, OwnerInfo, is_loopback_url, owner_proof

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.settings import Settings

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
        if not isinstance(data, (list, tuple)):
            raise TypeError(f"expected a list, got {type(data).__name__}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_jsonable(args[0], x) for x in data)
        if args:
            return tuple(from_jsonable(a, x) for a, x in zip(args, data, strict=True))
        return tuple(data)
    if origin in (set, frozenset, collections.abc.Set):
        if not isinstance(data, (list, tuple)):
            raise TypeError(f"expected a list, got {type(data).__name__}")
        (arg,) = typing.get_args(tp) or (Any,)
        return (frozenset if origin is frozenset else set)(from_jsonable(arg, x) for x in data)
    if origin in (list, collections.abc.Sequence, collections.abc.Iterable):
        if not isinstance(data, (list, tuple)):
            raise TypeError(f"expected a list, got {type(data).__name__}")
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


def _error_classes() -> dict[str, type[errors.MemctlError]]:
    """Every MemctlError subclass this process has loaded, by name (the core's and its modules')."""
    found: dict[str, type[errors.MemctlError]] = {}
    todo: list[type[errors.MemctlError]] = [errors.MemctlError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return found


def error_from_body(body: Any, status_code: int) -> errors.MemctlError:
    """The MemctlError (same class when known) the owner raised, from its JSON error body."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return errors.MemctlError(f"the memctl owner answered HTTP {status_code}",
                                  "see the owner process's log", code="owner_error")
    cls = _error_classes().get(str(err.get("error", "")), errors.MemctlError)
    exc = cls.__new__(cls)
    errors.MemctlError.__init__(exc, str(err.get("message") or f"HTTP {status_code}"), err.get("hint"),
                                details=err.get("details"), code=err.get("code"), args=err.get("args") or {})
    if isinstance(exc, errors.InsufficientMemoryError):
        exc.needed_bytes, exc.free_bytes = err.get("needed_bytes"), err.get("free_bytes")
    if isinstance(exc, errors.ContainerStartError):
        exc.log_tail, exc.cause = [], None
    return exc


class OwnerAnswerError(errors.MemctlError):
    """The owner's server answered something that is not what the call returns."""

    code = "owner_bad_answer"


RESULT_TYPES: dict[str, type] = {t.__name__: t for t in (OperationRecord, ReleaseReport, ClearReport,
                                                         EmergencyReport, Deployment)}


def decode_operation(data: Any) -> OperationView:
    """An :class:`OperationView` from the control API's JSON (see ``server.control.encode_operation``)."""
    if not isinstance(data, dict):
        raise TypeError(f"expected an object, got {type(data).__name__}")
    result_type = data.get("result_type")
    result = data.get("result")
    if result_type is not None:
        if result_type not in RESULT_TYPES:
            raise TypeError(f"unknown result type {result_type!r:.60}")
        result = from_jsonable(RESULT_TYPES[result_type], result)
    error = data.get("error")
    return OperationView(
        op_id=from_jsonable(str, data["op_id"]), kind=from_jsonable(str, data["kind"]),
        title=from_jsonable(str, data["title"]), params=from_jsonable(dict[str, Any], data["params"]),
        started_at=from_jsonable(float, data["started_at"]),
        record=from_jsonable(OperationRecord, data["record"]), running=from_jsonable(bool, data["running"]),
        ended_at=from_jsonable(float | None, data.get("ended_at")),
        events=from_jsonable(tuple[ProgressEvent, ...], data.get("events") or []),
        result=result, error=None if error is None else error_from_body(error, 500))


# --------------------------------------------------------------------------- the client
class RemoteController:
    """The owner's controller, seen from another process: ``ControllerAPI`` over the control API,
    plus ``owner`` (its :class:`~server.owner.OwnerInfo`)."""

    def __init__(self, owner: OwnerInfo, settings: Settings, *, timeout_s: float = 5.0) -> None:
        self.owner = owner
        self.settings = settings
        self._timeout_s = timeout_s
        self._verified = False
        # trust_env=False: a proxy from the environment must never see the token. The token header is
        # added per request, and only once verify() succeeded.
        self._http = httpx.Client(base_url=owner.url + "/control", timeout=timeout_s, trust_env=False)
        self._holders: dict[str, HolderSource | None] = {}
        self._capabilities: dict[str, Capabilities] = {}

    def __repr__(self) -> str:
        return f"RemoteController(owner={self.owner!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemoteController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ identity
    def verify(self, lock_pids: set[int] | None = None, listener_ok: bool | None = None) -> None:
        """Check that the server at ``owner.url`` is the owner before the token is sent there.

        ``lock_pids`` (the PIDs holding the owner lock) and ``listener_ok`` (whether ``owner.pid``
        listens on the URL's port) come from ``server.owner`` where the system tells; None: unknown.
        Raises :class:`~server.owner.OwnerIdentityError` (nothing sent) or an unreachable error.
        """
        info = self.owner
        where = f"{info.url} (named in {self.settings.state_dir}/server.json)"
        hint = ("stop what listens there, or remove server.json when no memctl owner runs; "
                "memctl did not send its token")
        if not is_loopback_url(info.url):
            raise OwnerIdentityError(f"the memctl owner address {info.url!r:.200} is not a loopback http URL",
                                     hint, args={"url": info.url})
        if lock_pids is not None and info.pid not in lock_pids:
            raise OwnerIdentityError(f"server.json names PID {info.pid}, which does not hold the memctl owner "
                                     f"lock (held by {sorted(lock_pids) or 'nobody'})", hint,
                                     args={"pid": info.pid})
        if listener_ok is False:
            raise OwnerIdentityError(f"the server at {where} is not the memctl owner process (PID {info.pid})",
                                     hint, args={"url": info.url, "pid": info.pid})
        nonce = secrets.token_urlsafe(24)
        try:
            resp = self._http.get(PROOF_PATH.removeprefix("/control"), params={"nonce": nonce},
                                  timeout=self._timeout_s)
        except httpx.HTTPError as exc:
            raise self._unreachable(PROOF_PATH, exc) from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        expected = owner_proof(info.token, nonce, info.pid)
        proof = body.get("proof") if isinstance(body, dict) else None
        if resp.status_code != 200 or not isinstance(proof, str) or not hmac.compare_digest(proof, expected):
            raise OwnerIdentityError(
                f"the server at {where} did not prove it is the memctl owner (PID {info.pid}): "
                f"HTTP {resp.status_code}", hint, args={"url": info.url, "pid": info.pid})
        self._verified = True

    def _unreachable(self, path: str, exc: Exception) -> errors.MemctlError:
        if isinstance(exc, httpx.TimeoutException):
            return errors.OperationTimeoutError(
                f"the memctl owner (PID {self.owner.pid}, {self.owner.url}) did not answer {path} in time",
                "it may be busy with a long operation; try again, or look at that process",
                code="owner_unreachable",
            )
        return errors.MemctlError(
            f"cannot reach the memctl owner (PID {self.owner.pid}) at {self.owner.url}: {type(exc).__name__}",
            "check that the process still runs; when it is gone, run the command again to take over",
            code="owner_unreachable",
        )

    # ------------------------------------------------------------------ transport
    def _call(self, method: str, path: str, *, json: Any = None, params: dict | None = None,
              timeout_s: float | None = None) -> Any:
        if not self._verified:
            self.verify()
        if method == "POST" and json is None:
            json = {}  # every state-changing request is JSON (a server may refuse other content types)
        try:
            resp = self._http.request(method, path, json=json, params=params, headers={TOKEN_HEADER: self.owner.token},
                                      timeout=timeout_s if timeout_s is not None else self._timeout_s)
        except httpx.HTTPError as exc:
            raise self._unreachable(path, exc) from None
        if resp.status_code == 401:
            raise errors.MemctlError("the memctl owner refused this process's token (HTTP 401)",
                                     "the owner restarted: run the command again", code="owner_token")
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code >= 400:
            raise error_from_body(body, resp.status_code)
        if resp.status_code != 200:
            raise self._bad(path, f"HTTP {resp.status_code}")
        return body

    def _bad(self, path: str, why: str) -> OwnerAnswerError:
        return OwnerAnswerError(f"the memctl owner (PID {self.owner.pid}) answered {path} with something that "
                                f"is not its result: {why}",
                                "check the process at " + self.owner.url + "; nothing was taken from that answer",
                                args={"path": path})

    def _typed(self, tp: Any, method: str, path: str, **kw: Any) -> Any:
        body = self._call(method, path, **kw)
        try:
            return from_jsonable(tp, body)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise self._bad(path, f"{type(exc).__name__}: {str(exc)[:200]}") from None

    def _op_id(self, path: str, body: Any) -> str:
        answer = self._typed(dict[str, str], "POST", path, json=body)
        op_id = answer.get("op_id")
        if not op_id:
            raise self._bad(path, "no op_id")
        return op_id

    @property
    def _long_s(self) -> float:
        return float(self.settings.operation_timeout_s) + 60.0

    @property
    def _slow_s(self) -> float:
        return max(self._timeout_s, 60.0)

    def ping(self) -> dict:
        answer = self._typed(dict[str, Any], "GET", "/ping")
        if answer.get("pid") != self.owner.pid:
            raise self._bad("/ping", f"PID {answer.get('pid')!r:.20} instead of {self.owner.pid}")
        return answer

    # ------------------------------------------------------------------ read calls
    def devices(self) -> SystemSnapshot:
        return self._typed(SystemSnapshot, "GET", "/devices")

    def memory_history(self) -> list[MemorySample]:
        raw = self._typed(list[tuple[float, dict[str, tuple[int | None, int | None]]]], "GET", "/memory_history")
        return [(ts, dict(values)) for ts, values in raw]

    def models(self, refresh: bool = False) -> CatalogResult:
        return self._typed(CatalogResult, "GET", "/models", params={"refresh": refresh}, timeout_s=self._slow_s)

    def resolve(self, model: str | CachedModel) -> CachedModel:
        """The owner's catalog entry for a model id (InvalidModelIdError / ModelNotFoundError as there)."""
        if isinstance(model, CachedModel):
            return model
        return self._typed(CachedModel, "GET", "/resolve", params={"model_id": model}, timeout_s=self._slow_s)

    def deployments(self, fresh: bool = False) -> list[Deployment]:
        return self._typed(list[Deployment], "GET", "/deployments", params={"fresh": fresh},
                           timeout_s=self._slow_s if fresh else None)

    def backend_ids(self) -> list[str]:
        return self._typed(list[str], "GET", "/backend_ids")

    def availability(self, backend_id: str, snapshot: SystemSnapshot | None = None) -> Availability:
        """The owner's answer (it reads its own snapshot; ``snapshot`` is for the in-process call)."""
        return self._typed(Availability, "GET", "/availability", params={"backend_id": backend_id},
                           timeout_s=self._slow_s)

    def capabilities(self, backend_id: str) -> Capabilities:
        """A backend's capabilities (fixed for the owner's lifetime: asked once per backend)."""
        if backend_id not in self._capabilities:
            self._capabilities[backend_id] = self._typed(Capabilities, "GET", "/capabilities",
                                                         params={"backend_id": backend_id})
        return self._capabilities[backend_id]

    def recommend(self, model: str | CachedModel | None = None, device_key: str | None = None,
                  snapshot: SystemSnapshot | None = None) -> Recommendation:
        model_id = None if model is None else _model_id(model)
        params = {k: v for k, v in (("model", model_id), ("device_key", device_key)) if v is not None}
        return self._typed(Recommendation, "GET", "/recommend", params=params, timeout_s=self._slow_s)

    def recommend_in_view(self, device_key: str | None = None,
                          snapshot: SystemSnapshot | None = None) -> Recommendation:
        """The recommendation for the model in view (the owner's: what it runs, else its first cached)."""
        params = {"device_key": device_key} if device_key is not None else {}
        return self._typed(Recommendation, "GET", "/recommend_in_view", params=params, timeout_s=self._slow_s)

    def max_context(self, model: str | CachedModel, profile: Profile, free_bytes: int | None = None) -> int:
        return self._typed(int, "POST", "/max_context", json={"model_id": _model_id(model), "profile": to_json(profile),
                                                             "free_bytes": free_bytes}, timeout_s=self._slow_s)

    def plan(self, backend_id: str, model: str | CachedModel, profile: Profile | None = None, *,
             purpose: str = "switch", free_holders: bool = False) -> Plan:
        body = {"backend_id": backend_id, "model_id": _model_id(model), "profile": to_json(profile),
                "purpose": purpose, "free_holders": free_holders}
        return self._typed(Plan, "POST", "/plan", json=body, timeout_s=self._slow_s)

    def plans(self, backend_id: str, models: Sequence[str | CachedModel],
              profile: Profile) -> dict[str, Plan | None]:
        body = {"backend_id": backend_id, "model_ids": [_model_id(m) for m in models], "profile": to_json(profile)}
        return self._typed(dict[str, Plan | None], "POST", "/plans", json=body, timeout_s=self._slow_s)

    def export_formats(self) -> tuple[str, ...]:
        return self._typed(tuple[str, ...], "GET", "/export_formats")

    def export(self, fmt: str, model: str | CachedModel, *, gpu_bytes: int | None = None, gpus: int = 1,
               context: int | None = None, batch: int | None = None, accelerator: str | None = None,
               max_replicas: int = 2) -> ExportResult:
        body = {"fmt": fmt, "model_id": _model_id(model), "gpu_bytes": gpu_bytes, "gpus": gpus, "context": context,
                "batch": batch, "accelerator": accelerator, "max_replicas": max_replicas}
        return self._typed(ExportResult, "POST", "/export", json=body, timeout_s=self._slow_s)

    def holders(self, snapshot: SystemSnapshot | None = None) -> list[MemoryHolder]:
        return self._typed(list[MemoryHolder], "GET", "/holders", timeout_s=self._slow_s)

    def history(self, limit: int = 50) -> list[OperationRecord]:
        return self._typed(list[OperationRecord], "GET", "/history", params={"limit": limit})

    def log_write_errors(self) -> list[str]:
        return self._typed(list[str], "GET", "/log_write_errors")

    def log_warnings(self) -> list[str]:
        return self._typed(list[str], "GET", "/log_warnings")

    def acknowledge_log_errors(self) -> None:
        self._call("POST", "/acknowledge_log_errors")

    def status(self) -> dict:
        answer = self._typed(dict[str, Any], "GET", "/status", timeout_s=self._slow_s)
        missing = [k for k in ("devices", "deployments", "backends") if k not in answer]
        if missing:
            raise self._bad("/status", f"no {', '.join(missing)}")
        return answer

    def serving_backend_id(self) -> str:
        return self._typed(str, "GET", "/serving_backend_id")

    def in_flight(self) -> dict[str, int]:
        return self._typed(dict[str, int], "GET", "/in_flight")

    def serving_pause(self) -> dict | None:
        """The owner's on-demand pause (reason, since, models), or None."""
        return self._call("GET", "/serving_pause").get("pause")

    def resume_serving(self) -> bool:
        """Lift the owner's on-demand pause; True when there was one."""
        return bool(self._call("POST", "/resume_serving", json={}).get("resumed"))

    def serve_status(self) -> dict[str, dict]:
        return self._typed(dict[str, dict], "GET", "/serve_status")

    def current_operation(self) -> dict | None:
        return self._typed(dict[str, Any] | None, "GET", "/current_operation")

    # ------------------------------------------------------------------ operations
    def submit_apply(self, plan_or_backend: Plan | str, model: str | CachedModel | None = None,
                     profile: Profile | None = None, *, force: bool = False,
                     cancel_generation: bool = False) -> str:
        return self._op_id("/submit_apply", _apply_body(plan_or_backend, model, profile, force, cancel_generation))

    def submit_unload(self, model: str) -> str:
        return self._op_id("/submit_unload", {"model_id": _deployment_key(model)})

    def submit_clear(self) -> str:
        return self._op_id("/submit_clear", None)

    def submit_emergency(self) -> str:
        return self._op_id("/submit_emergency", None)

    def operation(self, op_id: str) -> OperationView | None:
        body = self._call("GET", "/operation", params={"op_id": op_id})
        try:
            return None if body is None else decode_operation(body)
        except (TypeError, ValueError, KeyError) as exc:
            raise self._bad("/operation", f"{type(exc).__name__}: {str(exc)[:200]}") from None

    def operations(self, limit: int = 5) -> list[OperationView]:
        body = self._call("GET", "/operations", params={"limit": limit})
        try:
            if not isinstance(body, list):
                raise TypeError(f"expected a list, got {type(body).__name__}")
            return [decode_operation(x) for x in body]
        except (TypeError, ValueError, KeyError) as exc:
            raise self._bad("/operations", f"{type(exc).__name__}: {str(exc)[:200]}") from None

    def apply(self, plan_or_backend: Plan | str, model: str | CachedModel | None = None,
              profile: Profile | None = None, force: bool = False, progress: ProgressCallback | None = None,
              cancel_generation: bool = False) -> OperationRecord:
        """``apply(plan)`` runs exactly that plan in the owner (StalePlanError when it no longer holds,
        nothing touched); ``apply(backend_id, model, profile)`` plans and applies there. ``progress``
        is not called across processes (the owner's ``operations()`` show it)."""
        return self._typed(OperationRecord, "POST", "/apply",
                           json=_apply_body(plan_or_backend, model, profile, force, cancel_generation),
                           timeout_s=self._long_s)

    def unload(self, model: str, *, progress: ProgressCallback | None = None) -> ReleaseReport:
        return self._typed(ReleaseReport, "POST", "/unload", json={"model_id": _deployment_key(model)},
                           timeout_s=self._long_s)

    def clear_memory(self, *, progress: ProgressCallback | None = None) -> ClearReport:
        return self._typed(ClearReport, "POST", "/clear_memory", timeout_s=self._long_s)

    def emergency_clear(self, *, progress: ProgressCallback | None = None) -> EmergencyReport:
        return self._typed(EmergencyReport, "POST", "/emergency_clear", timeout_s=self._long_s)

    # ------------------------------------------------------------------ answered in this process
    def level(self, device: DeviceSnapshot) -> Level:
        from memory_controller.recommend import level_for

        return level_for(device.free_bytes, self.settings.green_min_bytes, self.settings.yellow_min_bytes)

    def holder_source(self, source_id: str) -> HolderSource | None:
        """This process's client of another holder (it is its own server): the ``holder_client`` of the
        configured backend ``source_id``, built as the controller builds it; None when there is none."""
        if source_id not in self._holders:
            from memory_controller.registry import BackendRegistry

            cfg = self.settings.backends.get(source_id)
            if cfg is None:
                return None
            try:
                backend = BackendRegistry({source_id: cfg.factory}, self.settings, None).get(source_id)
                self._holders[source_id] = backend.holder_client
            except errors.MemctlError:
                return None
        return self._holders[source_id]


def _apply_body(plan_or_backend: Any, model: Any, profile: Any, force: bool, cancel_generation: bool) -> dict:
    opts = {"force": force, "cancel_generation": cancel_generation}
    if isinstance(plan_or_backend, str):
        return {"backend_id": plan_or_backend, "model_id": None if model is None else _model_id(model),
                "profile": to_json(profile), **opts}
    return {"plan": to_json(plan_or_backend), **opts}


def _deployment_key(model: Any) -> str:
    return getattr(model, "model_id", None) or getattr(model, "handle", None) or str(model)


def _model_id(model: Any) -> str:
    if isinstance(model, str):
        return model
    model_id = getattr(model, "model_id", None)
    if not isinstance(model_id, str):
        raise errors.InvalidModelIdError(f"not a model: {model!r:.80}", "pass a model id such as org/name")
    return model_id
