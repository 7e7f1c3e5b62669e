"""Hostile HTTP against the real memctl server (ServerHandle + create_app over a MemoryController with the
in-memory backend, real uvicorn on 127.0.0.1): foreign Origins and "simple" content types (a web page in the
user's browser), DNS-rebinding Host headers, bodies over the limit, half-sent headers. Each refusal names
the cause and the fix; nothing is changed by a refused request; the server keeps serving."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from memory_controller import MemoryController
from memory_controller.settings import load_settings
from server.owner import TOKEN_HEADER, read_owner
from server.runner import ServerHandle
from server.security import host_allowed, nested_deeper_than, origin_allowed
from tests.fixtures_models import TINY_ID, TINY_UNTIED_ID
from tests.inmemory_backend import InMemoryBackend


@pytest.fixture()
def server(hf_cache, monkeypatch):
    """(controller, base url, owner token) of a running memctl server."""
    monkeypatch.setenv("MEMCTL_SERVE_ALLOWED_ORIGINS", "http://localhost:3000,vscode-file://")
    settings = load_settings(hf_cache_dir=hf_cache, local_model_dirs=[])
    backend = InMemoryBackend(settings)
    ctl = MemoryController(settings, backends={"inmem": backend})
    handle = ServerHandle(ctl, settings, port=0).start()
    owner = read_owner(settings)
    try:
        yield ctl, handle.url, owner.token
    finally:
        handle.stop()
        for d in ctl.deployments():
            backend.stop(d.handle)


def _chat(model: str = TINY_ID) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()


def _running(ctl) -> list[str]:
    return [d.model_id for d in ctl.deployments()]


def _error(r: httpx.Response) -> dict:
    body = r.json()["error"]
    assert body["message"] and body["code"]
    return body


# ------------------------------------------------------------------ 3: Origin and Content-Type
@pytest.mark.parametrize("origin", ["https://evil.example", "http://127.0.0.1.evil.example", "null",
                                    "http://localhost:9999", "file://"])
def test_a_foreign_origin_cannot_load_a_model_or_change_state(server, origin):
    ctl, url, token = server
    with httpx.Client(base_url=url, timeout=30) as c:
        for path, body, headers in (
            ("/v1/chat/completions", _chat(), {}),
            ("/v1/completions", json.dumps({"model": TINY_ID, "prompt": "x"}).encode(), {}),
            ("/control/apply", json.dumps({"backend_id": "inmem", "model_id": TINY_ID}).encode(),
             {TOKEN_HEADER: token}),
            ("/control/emergency_clear", b"", {TOKEN_HEADER: token}),
        ):
            r = c.post(path, content=body, headers={"Origin": origin, "Content-Type": "application/json", **headers})
            assert r.status_code == 403, (path, r.text)
            err = _error(r)
            assert err["code"] == "origin_not_allowed" and "serve_allowed_origins" in err["message"]
    assert _running(ctl) == []


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                                   "text/plain; charset=utf-8", None])
def test_a_simple_post_without_json_content_type_is_refused(server, ctype):
    ctl, url, token = server
    headers = {} if ctype is None else {"Content-Type": ctype}
    with httpx.Client(base_url=url, timeout=30) as c:
        for path, extra in (("/v1/chat/completions", {}),
                            ("/control/apply", {TOKEN_HEADER: token})):
            body = _chat() if path.startswith("/v1") else json.dumps(
                {"backend_id": "inmem", "model_id": TINY_ID}).encode()
            r = c.post(path, content=body, headers={**headers, **extra})
            assert r.status_code == 415, (path, ctype, r.text)
            assert "application/json" in _error(r)["message"]
    assert _running(ctl) == []


@pytest.mark.parametrize("origin", [None, "vscode-webview://1a2b3c", "http://localhost:3000", "vscode-file://vscode-app"])
def test_local_clients_the_ide_and_configured_origins_are_served(server, origin):
    ctl, url, _ = server
    headers = {"Content-Type": "application/json; charset=utf-8"}
    if origin:
        headers["Origin"] = origin
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/chat/completions", content=_chat(), headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


def test_origin_rules_as_a_function():
    assert origin_allowed("vscode-webview://abc", "127.0.0.1:1", ())
    assert origin_allowed("http://127.0.0.1:8765", "127.0.0.1:8765", ())  # the server's own page
    assert not origin_allowed("http://127.0.0.1:8766", "127.0.0.1:8765", ())
    assert origin_allowed("https://ide.example", None, ("https://ide.example/",))
    assert not origin_allowed("https://ide.example.evil", None, ("https://ide.example",))


# ------------------------------------------------------------------ 4: Host (DNS rebinding)
@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8765", "127.0.0.1.nip.io", "10.0.0.5",
                                  "localhost.evil", "[fe80::1]:80"])
def test_a_foreign_host_header_is_misdirected(server, host):
    ctl, url, token = server
    with httpx.Client(base_url=url, timeout=30) as c:
        for method, path, kw in (("GET", "/v1/models", {}), ("GET", "/health", {}),
                                 ("POST", "/v1/chat/completions", {"content": _chat()}),
                                 ("GET", "/control/status", {"headers": {TOKEN_HEADER: token}})):
            headers = {"Host": host, "Content-Type": "application/json", **kw.pop("headers", {})}
            r = c.request(method, path, headers=headers, **kw)
            assert r.status_code == 421, (host, path, r.text)
            assert "DNS rebinding" in _error(r)["message"]
    assert _running(ctl) == []


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "LOCALHOST:1", "[::1]:8765", "127.0.0.2"])
def test_loopback_names_are_served(server, host):
    _, url, _ = server
    r = httpx.get(url + "/v1/models", headers={"Host": host}, timeout=30)
    assert r.status_code == 200 and {TINY_ID, TINY_UNTIED_ID} <= {m["id"] for m in r.json()["data"]}


def test_host_rules_as_a_function():
    assert host_allowed("192.168.1.7:8765", "192.168.1.7")
    assert host_allowed("192.168.1.7", "0.0.0.0")  # listening everywhere: any IP literal, never a name
    assert not host_allowed("lan.example", "0.0.0.0")
    assert not host_allowed("192.168.1.8", "192.168.1.7")


# ------------------------------------------------------------------ 8: bodies and half-sent headers
def _raw(url: str, data: bytes, *, read: bool = True, timeout: float = 30) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        while True:
            try:
                piece = s.recv(65536)
            except TimeoutError:
                break
            if not piece:
                break
            out += piece
        return out


@pytest.mark.parametrize("length", [32 * 1024 * 1024 + 1, 10_000_000_000, 10**30])
def test_a_content_length_over_the_limit_is_refused_before_the_body_is_read(server, length):
    _, url, _ = server
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()
    answer = _raw(url, head + b"{")  # one byte of the announced body: the answer cannot wait for the rest
    if length > 10**20:  # h11 itself refuses a length it cannot hold, also at once
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        return
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"body_too_large" in answer


def test_a_chunked_body_is_cut_at_the_limit(server):
    ctl, url, _ = server
    chunk = b"x" * (1024 * 1024)
    pieces = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(40))
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    try:
        answer = _raw(url, head + pieces + b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):  # the server answered and closed while we still sent
        answer = b"HTTP/1.1 413"
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    assert _running(ctl) == []


@pytest.mark.parametrize("depth", [65, 1000, 200_000])
def test_deep_nesting_is_a_400_naming_it_on_v1_and_control(server, depth, caplog):
    _, url, token = server
    deep = "[" * depth + "]" * depth
    chat = {"model": TINY_ID, "messages": [{"role": "user", "content": "@"}]}
    tools = {**chat, "tools": [{"type": "function", "function": {"name": "f", "parameters": "@"}}]}
    plan = {"backend_id": "inmem", "model_id": "x", "profile": "@"}
    bodies = [("/v1/chat/completions", {}, json.dumps(chat).replace('"@"', deep)),
              ("/v1/chat/completions", {}, json.dumps(tools).replace('"@"', deep)),
              ("/control/plan", {TOKEN_HEADER: token}, json.dumps(plan).replace('"@"', deep))]
    with httpx.Client(base_url=url, timeout=60) as c:
        for path, extra, body in bodies:
            r = c.post(path, content=body.encode(), headers={"Content-Type": "application/json", **extra})
            assert r.status_code == 400, (path, r.text[:200])
            assert "nested deeper" in _error(r)["message"]
    assert "Traceback" not in caplog.text


def test_nesting_check_skips_brackets_inside_strings():
    assert not nested_deeper_than(json.dumps({"a": "[" * 1000}).encode(), 4)
    assert nested_deeper_than(b'{"a": [[[[[]]]]]}', 4)
    assert not nested_deeper_than(b'{"a": "\\"[[[[[[", "b": [[]]}', 4)


def test_half_sent_headers_are_closed_by_a_read_timeout(server):
    """A connection that sends half a request line and waits is closed by the server (not held forever):
    recv returns EOF well before the client's own 60 s limit."""
    import server.security as security

    _, url, _ = server
    host, port = url.removeprefix("http://").split(":")
    socks = []
    try:
        for _ in range(5):
            s = socket.create_connection((host, int(port)), timeout=60)
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            socks.append(s)
        assert httpx.get(url + "/health", timeout=30).status_code == 200  # others are served meanwhile
        assert security.HEADER_TIMEOUT_S < 60
        for s in socks:
            assert s.recv(1024) == b""  # closed by the server (a socket left open would time out: an error)
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("sent", [b"", b'{"model": "x", '])
def test_a_body_that_stops_arriving_is_a_408_and_others_are_served(hf_cache, monkeypatch, sent):
    import server.security as security

    monkeypatch.setattr(security, "BODY_READ_TIMEOUT_S", 1.0)
    settings = load_settings(hf_cache_dir=hf_cache, local_model_dirs=[])
    backend = InMemoryBackend(settings)
    ctl = MemoryController(settings, backends={"inmem": backend})
    handle = ServerHandle(ctl, settings, port=0).start()
    try:
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n")
        host, port = handle.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(head + sent)
            assert httpx.get(handle.url + "/health", timeout=30).status_code == 200
            answer = b""
            while piece := s.recv(65536):  # until the server closes
                answer += piece
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer
    finally:
        handle.stop()
