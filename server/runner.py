"""Run the memctl server: uvicorn on a background thread (the dashboard) or in the foreground
(``memctl serve``), as the machine's one owner.

The listening socket is bound here, before uvicorn starts, so a busy port is a clear
:class:`PortBusyError` at once (uvicorn itself would log and exit the thread) and port 0 works
(tests). The owner lock is taken before binding and ``server.json`` is published only once the
server answers, so a client that finds the file can use it.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from memory_controller.errors import MemctlError

from .owner import OwnerExistsError, OwnerLock, read_owner

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

    from memory_controller.settings import Settings

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 3  # open streams get this long after Ctrl-C, then are cut


class PortBusyError(MemctlError):
    code = "port_busy"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart right after a stop binds
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortBusyError(
                f"port {port} on {host} is already in use",
                f"stop what listens there (`ss -ltnp 'sport = :{port}'` names it) or pick another port: "
                f"`memctl serve --port P` / MEMCTL_SERVE_PORT",
                args={"port": port, "host": host},
            ) from None
        raise PortBusyError(f"cannot listen on {host}:{port}: {exc.strerror}",
                            "check bind_address and serve_port", args={"port": port, "host": host}) from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _make_server(config: Any, on_shutdown: Any) -> Any:
    import asyncio

    import uvicorn

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            try:
                await asyncio.to_thread(on_shutdown)
            except Exception:  # shutting down: say it, go on
                log.warning("stopping the running work failed", exc_info=True)
            await super().shutdown(sockets)

    return _Server(config)


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    if ipaddress.ip_address(host).is_unspecified:  # 0.0.0.0 listens everywhere; clients use loopback
        shown = "127.0.0.1" if ipaddress.ip_address(host).version == 4 else "[::1]"
    return f"http://{shown}:{port}"


class ServerHandle:
    """The memctl server of this process. ``start()`` (background) or ``serve_forever()`` (foreground).

    ``ctl`` is the local :class:`~memory_controller.MemoryController`; ``port`` defaults to
    ``settings.serve_port`` (0 picks a free one). ``app`` replaces ``create_app(...)`` (tests).
    """

    def __init__(self, ctl: Any, settings: Settings, *, port: int | None = None,
                 app: FastAPI | None = None, log_level: str = "warning") -> None:
        self.ctl = ctl
        self.settings = settings
        self.port = settings.serve_port if port is None else port
        self.host = settings.bind_address
        self._app = app
        self.app: Any = app
        self._log_level = log_level
        self._lock: OwnerLock | None = None
        self._server: Any = None  # uvicorn.Server
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._app_closed = False
        self.url: str | None = None

    # ------------------------------------------------------------------ setup
    def _prepare(self) -> None:
        import uvicorn

        from memory_controller.safefiles import check_state_dir

        check_state_dir(self.settings.state_dir)  # a file, read-only or world-writable: said with the path
        lock = OwnerLock.try_acquire(self.settings)
        if lock is None:
            owner = read_owner(self.settings, wait_s=0.5)
            where = f" (PID {owner.pid}, {owner.url})" if owner else ""
            raise OwnerExistsError(
                f"another memctl process already runs the server{where}",
                "use that one (the CLI and the dashboard act through it), or stop it first",
            )
        try:
            sock = _bind(self.host, self.port)
        except BaseException:
            lock.release()
            raise
        self._lock, self._sock = lock, sock
        self.port = sock.getsockname()[1]
        self.url = _url(self.host, self.port)
        app = self._app
        if app is None:
            from .app import create_app

            app = create_app(self.ctl, self.settings, token=lock.token)
        self.app = app  # the FastAPI app being served (its state holds the OpenAI service)
        from .security import h11_protocol

        config = uvicorn.Config(app, host=self.host, port=self.port, log_level=self._log_level,
                                log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                                http=h11_protocol(), h11_max_incomplete_event_size=64 * 1024)
        self._server = _make_server(config, self._on_shutdown)

    def _on_shutdown(self) -> None:
        """Before uvicorn waits for open requests: stop generations (the app's close) and cancel the
        running operation (a load rolls back what it started), so requests end within the grace period."""
        self._close_app()
        runner = getattr(self.ctl, "runner", None)
        for op in (runner.running() if runner is not None else ()):
            op.cancel.set()

    @property
    def token(self) -> str:
        if self._lock is None:
            raise RuntimeError("the server is not started")
        return self._lock.token

    @property
    def running(self) -> bool:
        return self._server is not None and bool(getattr(self._server, "started", False)) \
            and not self._server.should_exit

    # ------------------------------------------------------------------ background (dashboard)
    def start(self, *, ready_timeout_s: float = 10.0) -> ServerHandle:
        """Start on a daemon thread; returns once it answers and ``server.json`` is published.

        Raises OwnerExistsError (another process owns the server), PortBusyError.
        """
        self._prepare()
        self._thread = threading.Thread(target=self._run, name="memctl-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + ready_timeout_s
        while not getattr(self._server, "started", False):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise MemctlError(f"the memctl server did not start on {self.url}",
                                  "see the log above; try another port (MEMCTL_SERVE_PORT)")
            time.sleep(0.02)
        assert self._lock is not None and self.url is not None
        self._lock.publish(self.url)
        return self

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException:  # a crash here must not go unnoticed by the dashboard
            log.exception("memctl server stopped with an error")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving (open streams get a few seconds), release the owner lock. Idempotent."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(2.0)
        self._cleanup()

    def _cleanup(self) -> None:
        self._close_app()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if self._lock is not None:
            self._lock.release()

    def _close_app(self) -> None:
        if self._app_closed or self._server is None:
            return
        self._app_closed = True
        close = getattr(getattr(self._server.config.app, "state", None), "memctl_close", None)
        if close is not None:
            try:
                close()
            except Exception:  # shutting down: say it, go on
                log.warning("closing the OpenAI-compatible API failed", exc_info=True)

    # ------------------------------------------------------------------ foreground (memctl serve)
    def serve_forever(self, *, on_ready: Any = None) -> None:
        """Serve in this thread until Ctrl-C / SIGTERM (uvicorn's handlers), then clean up.

        ``on_ready(url)`` is called once it answers (``memctl serve`` prints the URL).
        """
        self._prepare()
        assert self._lock is not None and self.url is not None
        lock, url = self._lock, self.url

        def announce() -> None:
            deadline = time.monotonic() + 10
            while not getattr(self._server, "started", False):
                if self._server.should_exit or time.monotonic() > deadline:
                    return
                time.sleep(0.02)
            try:
                lock.publish(url)
            except RuntimeError:  # stopped before it was ready
                return
            if on_ready is not None:
                on_ready(url)

        watcher = threading.Thread(target=announce, name="memctl-server-ready", daemon=True)
        watcher.start()
        previous = _term_like_int()
        try:
            self._server.run(sockets=[self._sock])
        finally:
            try:
                self._cleanup()
            finally:
                _restore_term(previous)


def _term_like_int() -> Any:
    """SIGTERM (what systemd and ``docker stop`` send) handled like Ctrl-C while the server runs in the
    foreground: uvicorn stops serving, then raises the signal again once it has stopped; with Python's
    default SIGTERM action that killed the process before the owner lock and ``server.json`` were
    cleaned up, so SIGTERM raises KeyboardInterrupt as SIGINT does. Returns the previous handler."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, signal.default_int_handler)


def _restore_term(previous: Any) -> None:
    import signal

    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
