"""HTTP protections in front of every memctl route (a pure ASGI middleware, installed where the app is built).

A web page in the user's browser can send requests to ``127.0.0.1``: "simple" POSTs (``text/plain``,
no preflight) and, through DNS rebinding, requests whose ``Host`` is the attacker's name. So:

* ``Host`` must be a loopback name/address or the configured bind address (421 otherwise). A
  rebinding page's requests carry the attacker's host name and stop here.
* A state-changing request (any method but GET/HEAD/OPTIONS) from a foreign ``Origin`` is 403; no
  ``Origin`` (IDE clients, the CLI), ``vscode-webview://`` and the origins in
  ``serve_allowed_origins`` (``MEMCTL_SERVE_ALLOWED_ORIGINS``, comma-separated) are allowed, and so is
  the server's own origin.
* A state-changing request with a body must say ``Content-Type: application/json`` (415 otherwise):
  a browser cannot send that cross-origin without a CORS preflight, which memctl never answers.
* Bodies: a ``Content-Length`` over the limit is 413 before anything is read; a chunked body is read
  only up to the limit (413 then); a body that stops arriving is 408; a JSON body nested deeper than
  the limit is 400 here, so no route's parser meets it.

Errors have the OpenAI shape (``{"error": {"message", "type", "param", "code"}}``) plus the control
API's ``hint``/``error`` fields, so both kinds of client read them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from memory_controller.safejson import MAX_DEPTH

log = logging.getLogger("memctl.server.security")

MAX_BODY_BYTES = 32 * 1024 * 1024
BODY_READ_TIMEOUT_S = 30.0  # the longest pause between two pieces of a request body (then 408)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
BUILTIN_ORIGIN_SCHEMES = ("vscode-webview://",)
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost", "ip6-loopback"})

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def split_host(host: str) -> str:
    """The name or address of a ``Host`` header value, without the port (``[::1]:80`` -> ``::1``)."""
    host = host.strip()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        return host.rsplit(":", 1)[0]
    return host  # a bare IPv6 address (no brackets) or a name


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def host_allowed(host: str, bind_address: str) -> bool:
    """Loopback names and addresses, the bind address, and (when it listens on every address, 0.0.0.0
    or ::) any IP literal: an IP literal cannot be rebound, only a name can."""
    name = split_host(host).lower()
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    ip = _ip(name)
    if ip is None:
        return False
    if ip.is_loopback:
        return True
    bind = _ip(bind_address)
    if bind is None:
        return False
    return ip == bind or bind.is_unspecified


def origin_allowed(origin: str, host: str | None, allowed: Iterable[str]) -> bool:
    """Whether a state-changing request from ``origin`` is the user's own client."""
    origin = origin.strip().rstrip("/")
    low = origin.lower()
    if any(low.startswith(s) for s in BUILTIN_ORIGIN_SCHEMES):
        return True
    for entry in allowed:
        entry = entry.strip().lower()
        if not entry.endswith("://"):
            entry = entry.rstrip("/")
        if not entry:
            continue
        if entry == "*" or entry == low or (entry.endswith("://") and low.startswith(entry)):
            return True
    if host and low in (f"http://{host.lower()}", f"https://{host.lower()}"):
        return True  # the server's own pages (same origin)
    return False


_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def nested_deeper_than(body: bytes, max_depth: int) -> bool:
    """Whether JSON ``body`` nests ``[]``/``{}`` (outside strings) deeper than ``max_depth``; no recursion."""
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    depth = 0
    for m in _TOKEN.finditer(body):
        tok = m.group()
        if tok in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                return True
        elif tok in (b"]", b"}"):
            depth -= 1
    return False


def _is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def error_body(status: int, message: str, hint: str, code: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": f"{message} — {hint}", "type": "invalid_request_error",
                                 "param": param, "code": code, "hint": hint, "error": "MemctlError"}}).encode()


async def _answer(send: Send, status: int, message: str, hint: str, code: str, param: str | None = None) -> None:
    body = error_body(status, message, hint, code, param)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-should-retry", b"false"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class SecurityMiddleware:
    """The checks above, in front of ``app``. ``bind_address`` and ``allowed_origins`` come from settings;
    ``max_body_bytes`` and ``max_depth`` bound request bodies."""

    def __init__(self, app: Any, *, bind_address: str = "127.0.0.1", allowed_origins: Iterable[str] = (),
                 max_body_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_DEPTH,
                 body_timeout_s: float = BODY_READ_TIMEOUT_S) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.bind_address = str(bind_address)
        self.allowed_origins = tuple(allowed_origins)
        self.max_body_bytes = max_body_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for k, v in scope.get("headers") or ():
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        host = headers.get("host")
        if host is not None and not host_allowed(host, self.bind_address):
            shown = host[:100].encode("unicode_escape").decode("ascii")
            await _answer(send, 421, f"Host {shown!r} is not this memctl server's name",
                          "connect to http://127.0.0.1:PORT (or localhost); memctl answers only loopback names and "
                          "its bind address, so a web page cannot reach it by DNS rebinding", "host_not_allowed")
            return
        method = str(scope.get("method", "GET")).upper()
        if method in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(origin, host, self.allowed_origins):
            shown = origin[:100].encode("unicode_escape").decode("ascii")
            await _answer(send, 403, f"requests from the web origin {shown!r} are refused",
                          "memctl takes state-changing requests only from local clients (no Origin) and "
                          "vscode-webview://; to allow another origin add it to serve_allowed_origins "
                          "(MEMCTL_SERVE_ALLOWED_ORIGINS, comma-separated)", "origin_not_allowed")
            return
        length_text = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if length_text is not None:
            try:
                length = int(length_text)
                if length < 0:
                    raise ValueError
            except ValueError:
                await _answer(send, 400, f"Content-Length {length_text[:40]!r} is not a byte count",
                              "send a valid Content-Length", "bad_content_length")
                return
        else:
            length = 0
        if length > self.max_body_bytes:
            await _answer(send, 413, f"the request body of {length} bytes is over the "
                                     f"{self.max_body_bytes // (1024 * 1024)} MiB limit",
                          "send a smaller request (shorten the conversation or the files attached)", "body_too_large")
            return
        has_body = length > 0 or chunked
        content_type = headers.get("content-type")
        if (has_body or content_type is not None) and not _is_json_type(content_type or ""):
            shown = (content_type or "none")[:80]
            await _answer(send, 415, f"Content-Type {shown!r} is not accepted",
                          "send the body as JSON with 'Content-Type: application/json'", "unsupported_media_type")
            return
        if not has_body:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except TimeoutError:
                await _answer(send, 408, f"the request body stopped arriving (nothing for {self.body_timeout_s:g} s)",
                              "send the whole body at once", "body_timeout")
                return
            if message["type"] == "http.disconnect":
                return  # the client went away before its body was complete: nothing to answer
            piece = message.get("body", b"")
            total += len(piece)
            if total > self.max_body_bytes:
                await _answer(send, 413, f"the request body is over the {self.max_body_bytes // (1024 * 1024)} MiB "
                                         "limit", "send a smaller request", "body_too_large")
                return
            chunks.append(piece)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        brackets = body.count(b"[") + body.count(b"{")  # C speed; a scan only when there are enough to matter
        if brackets > self.max_depth and await asyncio.to_thread(nested_deeper_than, body, self.max_depth):
            await _answer(send, 400, f"the request body is nested deeper than {self.max_depth} levels",
                          "send flatter JSON (tool schemas and arguments included)", "body_too_deep", "body")
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def install(app: Any, settings: Any) -> None:
    """Put the protections in front of a Starlette/FastAPI ``app`` built for ``settings``."""
    app.add_middleware(SecurityMiddleware, bind_address=str(getattr(settings, "bind_address", "127.0.0.1")),
                       allowed_origins=tuple(getattr(settings, "serve_allowed_origins", ()) or ()),
                       body_timeout_s=BODY_READ_TIMEOUT_S)


HEADER_TIMEOUT_S = 10.0  # a client has this long to send a request's headers (a new connection or kept alive)


def h11_protocol(header_timeout_s: float = HEADER_TIMEOUT_S) -> type:
    """uvicorn's h11 protocol with a read timeout for request headers: a connection that opens and then
    sends nothing, or half a request line, is closed after ``header_timeout_s`` (uvicorn has no such
    timeout of its own: 200 half-sent requests would hold 200 connections open for ever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        _memctl_timer: Any = None
        _memctl_armed_for: Any = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._memctl_arm()

        def _memctl_arm(self) -> None:
            self._memctl_disarm()
            self._memctl_armed_for = self.cycle
            self._memctl_timer = self.loop.call_later(header_timeout_s, self._memctl_expired)

        def _memctl_disarm(self) -> None:
            if self._memctl_timer is not None:
                self._memctl_timer.cancel()
                self._memctl_timer = None

        def _memctl_expired(self) -> None:
            self._memctl_timer = None
            if self.cycle is self._memctl_armed_for and not self.transport.is_closing():
                log.info("closed a connection that sent no complete request headers within %.0f s",
                         header_timeout_s)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._memctl_timer is not None and self.cycle is not self._memctl_armed_for:
                self._memctl_disarm()  # the headers of a request are in

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._memctl_arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._memctl_disarm()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol
