"""A client of an Ollama server: what it has loaded, and unloading a model the way Ollama documents.

Only three documented endpoints are used: ``GET /api/version``, ``GET /api/ps`` and ``POST
/api/generate {"model": NAME, "keep_alive": 0}`` (unload at once). After an unload the client polls
``/api/ps`` every 250 ms until the model is gone and, given a reader of free GPU memory, until 75% of
its ``size_vram`` is back or the wait ends — as Ollama itself does after an unload. Every body is read
with a size limit and parsed with :mod:`memory_controller.safejson`; every failure is an
:class:`OllamaError` saying whether Ollama is down, slow, refusing or answering nonsense.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from memory_controller.errors import CorruptDataError, MemctlError, SettingsError
from memory_controller.safejson import loads_bounded
from memory_controller.types import Message, Outcome, msg
from memory_controller.units import escape_text, fmt_bytes

DEFAULT_PORT = 11434
UNCUT = 1 << 30  # escape only: the caller has cut the text already
REQUEST_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 1.0
UNLOAD_REQUEST_TIMEOUT_S = 15.0  # Ollama answers an unload once the runner is told to stop
POLL_INTERVAL_S = 0.25
MEMORY_BACK_SHARE = 0.75
MAX_BODY_BYTES = 1024 * 1024
SHOW_MAX_BYTES = 16 * 1024 * 1024
MAX_MODELS = 256

# Ollama's name parts: [host[:port]/][namespace/]model[:tag]; each part starts with a letter or digit.
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}"
_NAME_RE = re.compile(rf"^(?:[A-Za-z0-9][A-Za-z0-9._-]{{0,253}}(?::[0-9]{{1,5}})?/)?(?:{_PART}/)?{_PART}(?::{_PART})?$")


class OllamaError(MemctlError):
    code = "ollama.error"


class OllamaUnavailableError(OllamaError):
    code = "ollama.down"


class OllamaTimeoutError(OllamaError):
    code = "ollama.slow"


class OllamaRefusedError(OllamaError):
    code = "ollama.refused"

    def __init__(self, message: str, hint: str | None = None, *, status: int = 0, **kw: Any) -> None:
        super().__init__(message, hint, **kw)
        self.status = status


class OllamaMalformedError(OllamaError, CorruptDataError):
    code = "ollama.malformed"


class InvalidOllamaNameError(OllamaError):
    code = "ollama.bad_name"


class OllamaHostError(OllamaError, SettingsError):
    """The configured host is no address (``parse_host`` refused it): nothing can be asked of Ollama."""


def validate_model_name(name: object) -> str:
    """``name`` if it is a well-formed Ollama model name (``gpt-oss:20b``, ``library/llama3:8b``,
    ``hf.co/org/repo:Q4_K_M``); raises InvalidOllamaNameError saying what is wrong."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidOllamaNameError("no Ollama model name given", "name a model as `memctl ollama ps` lists it",
                                     args={"name": ""})
    shown = escape_text(name[:100], limit=UNCUT)
    if len(name) > 350:
        raise InvalidOllamaNameError(f"Ollama model name is too long ({len(name)} characters): {shown}…",
                                     "copy the name from `memctl ollama ps`", args={"name": shown})
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidOllamaNameError(
            f"not an Ollama model name: {shown!r}",
            "a name is [host/][namespace/]model[:tag] of letters, digits, '.', '_', '-' (e.g. gpt-oss:20b); "
            "copy it from `memctl ollama ps`", args={"name": shown})
    return name


def parse_host(value: str | None) -> str:
    """The base URL for an ``OLLAMA_HOST`` value: ``host:port``, ``host``, ``:port``, ``http(s)://host[:port]``.
    Default 127.0.0.1:11434; a wildcard listen address (0.0.0.0, ::) means this machine. Raises SettingsError."""
    s = (value or "").strip()
    scheme, sep, rest = s.partition("://")
    if not sep:
        scheme, rest = "http", s
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise SettingsError(f"invalid MEMCTL_OLLAMA_HOST = {value!r}: scheme {scheme!r} is not http or https",
                            "set MEMCTL_OLLAMA_HOST like 127.0.0.1:11434 or http://127.0.0.1:11434")
    default_port = DEFAULT_PORT if not sep else (443 if scheme == "https" else 80)
    hostport = rest.split("/", 1)[0]
    host, port_text = hostport, ""
    if hostport.startswith("["):
        host, _, tail = hostport[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    elif hostport.count(":") == 1:
        host, port_text = hostport.split(":")
    host = host or "127.0.0.1"
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        port = -1
    if not 0 < port < 65536 or not re.fullmatch(r"[A-Za-z0-9.:_-]{1,253}", host):
        raise SettingsError(f"invalid MEMCTL_OLLAMA_HOST = {value!r}: bad host or port",
                            "set MEMCTL_OLLAMA_HOST like 127.0.0.1:11434")
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


def is_local(base_url: str) -> bool:
    host = httpx.URL(base_url).host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class OllamaModel:
    """One model Ollama has loaded (``/api/ps``); sizes in bytes, names with control characters escaped."""

    name: str
    size: int
    size_vram: int
    expires_at: str | None = None  # as Ollama sends it (RFC 3339)
    context_length: int | None = None

    def expires_in_s(self, now: float | None = None) -> float | None:
        """Seconds until Ollama unloads it by itself; None when unknown."""
        if not self.expires_at:
            return None
        text = re.sub(r"(\.\d{6})\d+", r"\1", self.expires_at.replace("Z", "+00:00"))
        try:
            at = datetime.fromisoformat(text).timestamp()
        except ValueError:
            return None
        return at - (time.time() if now is None else now)


@dataclass(frozen=True)
class OllamaUnloadReport:
    name: str
    size_vram_bytes: int
    gone: bool  # no longer in /api/ps
    freed_bytes: int | None  # measured on NVML (None: not measured)
    waited_s: float
    outcome: Outcome
    message: Message

    @property
    def already_gone(self) -> bool:
        return self.message.code == "ollama.unload.not_loaded"


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OllamaMalformedError(f"Ollama /api/ps: {what} is not a byte count ({str(value)[:40]!r})",
                                   "the server at MEMCTL_OLLAMA_HOST does not speak Ollama's API")
    return value


def parse_ps(data: Any) -> list[OllamaModel]:
    """``/api/ps``'s document -> models; raises OllamaMalformedError for anything else."""
    if not isinstance(data, dict):
        raise OllamaMalformedError("Ollama /api/ps: expected a JSON object", "the server at MEMCTL_OLLAMA_HOST is not Ollama")
    items = data.get("models")
    if items is None:
        return []
    if not isinstance(items, list) or len(items) > MAX_MODELS:
        raise OllamaMalformedError("Ollama /api/ps: 'models' is not a list of models",
                                   "the server at MEMCTL_OLLAMA_HOST is not Ollama")
    out = []
    for item in items:
        name = item.get("name") or item.get("model") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            raise OllamaMalformedError("Ollama /api/ps: a model without a name", "the server at MEMCTL_OLLAMA_HOST is not Ollama")
        expires = item.get("expires_at")
        ctx = item.get("context_length")
        out.append(OllamaModel(escape_text(name[:400], limit=UNCUT), _int(item.get("size", 0), "size"),
                               _int(item.get("size_vram", 0), "size_vram"),
                               escape_text(expires[:64], limit=UNCUT) if isinstance(expires, str) else None,
                               ctx if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0 else None))
    return out


class OllamaClient:
    """Talks to one Ollama server. ``free_bytes``: reads free GPU memory (bytes, all GPUs) or None."""

    def __init__(self, base_url: str, *, timeout_s: float = REQUEST_TIMEOUT_S,
                 free_bytes: Callable[[], int | None] | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._free_bytes = free_bytes
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: tuple[float, list[OllamaModel] | None] | None = None
        self.last_error: OllamaError | None = None

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, body: dict | None = None, timeout_s: float | None = None,
                 max_bytes: int = MAX_BODY_BYTES) -> Any:
        timeout = httpx.Timeout(timeout_s or self.timeout_s, connect=CONNECT_TIMEOUT_S)
        where = f"{self.base_url}{path}"
        try:
            # trust_env=False: an HTTP(S)_PROXY must not carry requests meant for a local Ollama
            with httpx.Client(timeout=timeout, trust_env=False, follow_redirects=False) as client, \
                    client.stream(method, where, json=body) as resp:
                raw = bytearray()
                for chunk in resp.iter_bytes():
                    raw += chunk
                    if len(raw) > max_bytes:
                        raise OllamaMalformedError(f"Ollama {path}: answer over {max_bytes} bytes",
                                                   "the server at MEMCTL_OLLAMA_HOST is not Ollama")
                status = resp.status_code
        except httpx.TimeoutException:
            raise OllamaTimeoutError(
                f"Ollama at {self.base_url} did not answer {path} within {timeout.read:g} s",
                "Ollama is busy or stuck: try again, or restart the Ollama service",
                args={"host": self.base_url, "path": path}) from None
        except httpx.HTTPError as exc:
            raise OllamaUnavailableError(
                f"Ollama does not answer at {self.base_url} ({type(exc).__name__})",
                "start Ollama (ollama serve / systemctl start ollama) or set MEMCTL_OLLAMA_HOST",
                args={"host": self.base_url}) from None
        data = self._parse(bytes(raw), path, max_bytes)
        if status >= 400:
            detail = data.get("error") if isinstance(data, dict) else None
            detail = escape_text(str(detail)[:300], limit=UNCUT) if detail else f"HTTP {status}"
            hint = ("Ollama has no such model loaded or installed: see `memctl ollama ps`" if status == 404
                    else "see Ollama's log (journalctl -u ollama)")
            raise OllamaRefusedError(f"Ollama refused {method} {path}: {detail}", hint, status=status,
                                     args={"host": self.base_url, "status": status, "detail": detail})
        if 300 <= status or status < 200:
            raise OllamaMalformedError(f"Ollama {path}: unexpected HTTP {status}", "the server at MEMCTL_OLLAMA_HOST is not Ollama")
        return data

    @staticmethod
    def _parse(raw: bytes, path: str, max_bytes: int = MAX_BODY_BYTES) -> Any:
        text = raw.strip()
        if b"\n" in text:  # a streamed answer (NDJSON): the last object is the final one
            text = text.rsplit(b"\n", 1)[-1]
        if not text:
            return {}
        try:
            return loads_bounded(text, what=f"Ollama {path} answer", max_bytes=max_bytes)
        except CorruptDataError as exc:
            raise OllamaMalformedError(exc.message, "the server at MEMCTL_OLLAMA_HOST does not speak Ollama's API") from None

    # ------------------------------------------------------------------ API
    def version(self) -> str:
        data = self._request("GET", "/api/version")
        v = data.get("version") if isinstance(data, dict) else None
        if not isinstance(v, str):
            raise OllamaMalformedError("Ollama /api/version: no version", "the server at MEMCTL_OLLAMA_HOST is not Ollama")
        return escape_text(v[:64], limit=UNCUT)

    def ps(self) -> list[OllamaModel]:
        """Loaded models, largest in VRAM first."""
        return sorted(parse_ps(self._request("GET", "/api/ps")), key=lambda m: -m.size_vram)

    def loaded(self, max_age_s: float = 5.0) -> list[OllamaModel] | None:
        """:meth:`ps` that never raises, for the live panel and plans: the last answer while younger than
        ``max_age_s``; None when Ollama did not answer (``last_error`` says why; asked again after
        ``max_age_s``, so a stopped Ollama costs one refused connection per period)."""
        with self._lock:
            cached = self._cache
        if cached is not None and self._clock() - cached[0] < max_age_s:
            return cached[1]
        try:
            models: list[OllamaModel] | None = self.ps()
            error = None
        except OllamaError as exc:
            models, error = None, exc
        with self._lock:
            self._cache = (self._clock(), models)
            self.last_error = error
        return models

    def _free(self) -> int | None:
        if self._free_bytes is None:
            return None
        try:
            return self._free_bytes()
        except Exception:  # noqa: BLE001 - a probe glitch must not fail an unload that Ollama did
            return None

    def unload(self, name: str, wait_s: float = 10.0) -> OllamaUnloadReport:
        """Ask Ollama to unload ``name`` (keep_alive 0) and wait until it is gone from /api/ps and 75% of its
        VRAM is back (when free memory can be read) or ``wait_s`` passes. A model that is not loaded is a
        success with nothing done (no request that could load it). Raises OllamaError subclasses."""
        name = validate_model_name(name)
        t0 = self._clock()
        loaded = {m.name: m for m in self.ps()}
        target = loaded.get(name) or loaded.get(f"{name}:latest")
        if target is None:
            return OllamaUnloadReport(name, 0, True, 0, 0.0, Outcome.SUCCESS,
                                      msg("ollama.unload.not_loaded", f"{name} is not loaded in Ollama", model=name))
        free_before = self._free()
        self._request("POST", "/api/generate", {"model": target.name, "keep_alive": 0, "stream": False},
                      timeout_s=UNLOAD_REQUEST_TIMEOUT_S)
        want = int(target.size_vram * MEMORY_BACK_SHARE)
        gone, freed = False, None
        while True:
            try:
                gone = all(m.name != target.name for m in self.ps())
            except OllamaError:
                gone = False  # Ollama busy mid-unload: ask again until the wait ends
            free_now = self._free()
            freed = None if free_before is None or free_now is None else max(0, free_now - free_before)
            back = freed is None or freed >= want
            if (gone and back) or self._clock() - t0 >= wait_s:
                break
            self._sleep(POLL_INTERVAL_S)
        waited = self._clock() - t0
        with self._lock:
            self._cache = None
        n, size = target.name, fmt_bytes(target.size_vram)
        if not gone:
            return OllamaUnloadReport(n, target.size_vram, False, freed, waited, Outcome.ERROR, msg(
                "ollama.unload.still_loaded", f"Ollama still lists {n} after {waited:.1f} s",
                model=n, waited_s=round(waited, 1)))
        if freed is not None and freed < want:
            return OllamaUnloadReport(n, target.size_vram, True, freed, waited, Outcome.WARNING, msg(
                "ollama.unload.memory_slow", f"{n} unloaded, but only {fmt_bytes(freed)} of {size} came back "
                f"within {waited:.1f} s", model=n, freed_bytes=freed, size_bytes=target.size_vram, waited_s=round(waited, 1),
                freed=fmt_bytes(freed), size=size))
        text = f"{n} unloaded from Ollama" + (f": {fmt_bytes(freed)} back (of {size})" if freed is not None else "")
        return OllamaUnloadReport(n, target.size_vram, True, freed, waited, Outcome.SUCCESS, msg(
            "ollama.unload.done", text, model=n, freed_bytes=freed, size_bytes=target.size_vram,
            waited_s=round(waited, 1), freed=fmt_bytes(freed), size=size))

    # ------------------------------------------------------------------ models (the serving backend)
    def tags(self) -> list[dict[str, Any]]:
        """Installed models (``/api/tags``): dicts with ``name``, ``size``, ``details``; names validated."""
        data = self._request("GET", "/api/tags")
        items = data.get("models") if isinstance(data, dict) else None
        if items is None:
            return []
        if not isinstance(items, list) or len(items) > MAX_MODELS * 16:
            raise OllamaMalformedError("Ollama /api/tags: 'models' is not a list", "the server at MEMCTL_OLLAMA_HOST is not Ollama")
        out = []
        for item in items:
            if not isinstance(item, dict):
                continue
            name = item.get("name") or item.get("model")
            try:
                validate_model_name(name)
            except InvalidOllamaNameError:
                continue  # a name memctl could not pass back safely is not listed
            out.append(item)
        return out

    def show(self, name: str) -> dict[str, Any]:
        """``/api/show`` for ``name``: ``model_info``, ``capabilities``, ``details``, ``parameters``."""
        # the answer lists every tensor and the license: larger than the other answers
        data = self._request("POST", "/api/show", {"model": validate_model_name(name)}, max_bytes=SHOW_MAX_BYTES)
        if not isinstance(data, dict):
            raise OllamaMalformedError("Ollama /api/show: expected a JSON object", "the server at MEMCTL_OLLAMA_HOST is not Ollama")
        return data

    def create(self, name: str, from_: str, parameters: dict[str, Any], timeout_s: float = 120.0) -> None:
        """A derived model (``/api/create`` with ``from`` and ``parameters``): no weights are copied."""
        data = self._request("POST", "/api/create", {"model": validate_model_name(name), "from": validate_model_name(from_),
                                                     "parameters": parameters, "stream": False}, timeout_s=timeout_s)
        status = data.get("status") if isinstance(data, dict) else None
        if status != "success":
            raise OllamaMalformedError(f"Ollama /api/create for {name} did not say success ({str(status)[:60]!r})",
                                       "see Ollama's log (journalctl -u ollama)")

    def delete(self, name: str) -> None:
        self._request("DELETE", "/api/delete", {"model": validate_model_name(name)})

    def load(self, name: str, keep_alive: str | int, timeout_s: float = 600.0) -> None:
        """Load ``name`` (``/api/generate`` without a prompt, with ``keep_alive``) and wait until it is."""
        self._request("POST", "/api/generate", {"model": validate_model_name(name), "keep_alive": keep_alive,
                                                "stream": False}, timeout_s=timeout_s)
        with self._lock:
            self._cache = None

    def emergency_unload(self, wait_s: float = 10.0) -> str:
        """The emergency clear's Ollama step: unload every model; a one-line summary of what came back.
        Raises OllamaError when Ollama does not answer or a model could not be unloaded."""
        reports = self.unload_all(wait_s)
        with self._lock:
            self._cache = None
        if not reports:
            return f"Ollama at {self.base_url} had no model loaded"
        failed = [r for r in reports if r.outcome is Outcome.ERROR]
        summary = "; ".join(r.message.text for r in reports)
        if failed:
            raise OllamaError(summary, "unload them with `ollama stop NAME` or restart the Ollama service",
                              code="ollama.unload.failed", args={"models": [r.name for r in failed]})
        return summary

    def unload_all(self, wait_s: float = 10.0) -> list[OllamaUnloadReport]:
        """Unload every loaded model, one after another (the emergency clear's Ollama step). A model whose
        unload fails is reported (outcome ERROR, the error's message) and the others are still tried;
        raises OllamaError only when the list itself cannot be read."""
        reports = []
        for m in self.ps():
            try:
                reports.append(self.unload(m.name, wait_s))
            except OllamaError as exc:
                reports.append(OllamaUnloadReport(m.name, m.size_vram, False, None, 0.0, Outcome.ERROR,
                                                  msg(exc.code, exc.message, model=m.name)))
        return reports


class UnaddressedClient(OllamaClient):
    """The client while the configured host is no address: every call raises the :class:`OllamaHostError`
    (the backend is unavailable with that reason, the holder view says Ollama does not answer and why, and
    Ollama's processes are still named as Ollama's), instead of the backend vanishing."""

    def __init__(self, value: object, error: SettingsError) -> None:
        super().__init__("http://ollama-host.invalid")  # never contacted: _request raises first
        self.base_url = escape_text(str(value)[:200], limit=UNCUT)
        self.error = OllamaHostError(error.message, error.hint, code=error.code, args={"host": self.base_url})
        self.last_error = self.error

    def _request(self, method: str, path: str, body: dict | None = None, timeout_s: float | None = None,
                 max_bytes: int = MAX_BODY_BYTES) -> Any:
        raise self.error

    def loaded(self, max_age_s: float = 5.0) -> list[OllamaModel] | None:
        self.last_error = self.error
        return None
