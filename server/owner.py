"""One owner per machine: the process that runs the memctl server holds a lock in the state dir and
publishes its URL, PID and a random token; every other memctl process acts through it.

* ``<state_dir>/server.lock`` — an ``flock`` held for the owner's lifetime. The kernel drops it when
  the process dies (even on ``kill -9``), so a dead owner's lock is simply taken by the next one.
* ``<state_dir>/server.json`` — ``{"url", "pid", "token", "started_at"}``, mode 0600, written to a
  temporary file and renamed into place (a reader never sees half a file).

:mod:`server.connect` builds on it (``connect``, ``controller_for``): a client of the live owner for a
CLI command, a second dashboard or the diagnostic page. Before that client sends the token, the
owner's identity is checked here: the PID in ``server.json`` holds the lock (:func:`lock_holder_pids`),
the URL is on loopback and the server there proves it knows the token (:func:`owner_proof`) without
the token being sent. This module imports neither the client nor a web framework.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from memory_controller.errors import CorruptDataError, MemctlError
from memory_controller.safejson import loads_bounded

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.settings import Settings

LOCK_NAME = "server.lock"
INFO_NAME = "server.json"
TOKEN_HEADER = "X-Memctl-Token"


class OwnerUnreachableError(MemctlError):
    """A live process holds the owner lock but its server does not answer."""

    code = "owner_unreachable"


class OwnerIdentityError(MemctlError):
    """What ``server.json`` names is not the process holding the owner lock: the token is not sent."""

    code = "owner_identity"


class OwnerExistsError(MemctlError):
    """Another live process already owns the controller and the server."""

    code = "owner_exists"


@dataclass(frozen=True)
class OwnerInfo:
    url: str  # http://127.0.0.1:8765 (no trailing slash)
    pid: int
    token: str
    started_at: float

    def __repr__(self) -> str:  # never print the token
        return f"OwnerInfo(url={self.url!r}, pid={self.pid}, started_at={self.started_at})"


def _paths(settings: Settings) -> tuple[Path, Path]:
    state = Path(settings.state_dir).expanduser()
    return state / LOCK_NAME, state / INFO_NAME


def _open_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_is_held(settings: Settings) -> bool:
    """True while some process (this one included) holds the owner lock."""
    lock_path, _ = _paths(settings)
    if not lock_path.exists():
        return False
    fd = _open_lock(lock_path)
    try:
        if _try_flock(fd):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


class OwnerLock:
    """The owner lock, held by this process until :meth:`release` (or until it dies)."""

    def __init__(self, settings: Settings, fd: int) -> None:
        self._settings = settings
        self._fd: int | None = fd
        self.token = secrets.token_urlsafe(32)
        self.info: OwnerInfo | None = None

    @classmethod
    def try_acquire(cls, settings: Settings) -> OwnerLock | None:
        """Take the lock, or None when a live process holds it. A dead owner's leftover file is removed."""
        lock_path, info_path = _paths(settings)
        fd = _open_lock(lock_path)
        if not _try_flock(fd):
            os.close(fd)
            return None
        with contextlib.suppress(FileNotFoundError):
            info_path.unlink()  # the previous owner died without cleaning up
        return cls(settings, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def publish(self, url: str) -> OwnerInfo:
        """Write ``server.json`` (mode 0600, atomically) once the server listens at ``url``."""
        if self._fd is None:
            raise RuntimeError("the owner lock was released")
        _, info_path = _paths(self._settings)
        info = OwnerInfo(url=url.rstrip("/"), pid=os.getpid(), token=self.token, started_at=time.time())
        payload = json.dumps({"url": info.url, "pid": info.pid, "token": info.token,
                              "started_at": info.started_at}) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".server.", suffix=".json", dir=info_path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, info_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self.info = info
        return info

    def release(self) -> None:
        """Remove ``server.json`` (when it is ours) and drop the lock. Idempotent."""
        if self._fd is None:
            return
        _, info_path = _paths(self._settings)
        current = _read_info(info_path)
        if current is not None and current.pid == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                info_path.unlink()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_info(path: Path) -> OwnerInfo | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        raw = loads_bounded(data, what=str(path), max_bytes=4096, expect=dict)
        url, pid, token, started = raw["url"], raw["pid"], raw["token"], raw.get("started_at", 0.0)
    except (CorruptDataError, KeyError):
        return None
    if not (isinstance(url, str) and url.startswith("http://") and isinstance(pid, int) and pid > 0
            and isinstance(token, str) and token and isinstance(started, (int, float))):
        return None
    return OwnerInfo(url=url, pid=pid, token=token, started_at=float(started))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_owner(settings: Settings, *, wait_s: float = 3.0) -> OwnerInfo | None:
    """The live owner, or None when no process holds the lock.

    While the lock is held but ``server.json`` is missing or names a dead process (an owner still
    starting), waits up to ``wait_s``; then raises :class:`OwnerUnreachableError`.
    """
    _, info_path = _paths(settings)
    deadline = time.monotonic() + wait_s
    while True:
        if not lock_is_held(settings):
            return None
        info = _read_info(info_path)
        if info is not None and _pid_alive(info.pid):
            return info
        if time.monotonic() >= deadline:
            raise OwnerUnreachableError(
                f"a memctl process holds the owner lock {info_path.parent / LOCK_NAME} but has not "
                f"published its server address in {info_path}",
                "wait for it to finish starting, or stop that process (`fuser -v` on the lock file names it)",
            )
        time.sleep(0.1)


# --------------------------------------------------------------------------- the owner's identity
PROOF_PATH = "/control/hello"


def owner_proof(token: str, nonce: str, pid: int) -> str:
    """What the owner answers to a nonce: HMAC-SHA256 under its token of the nonce and its PID. A
    client that read the token from ``server.json`` checks it before sending the token anywhere; a
    server that does not hold the token cannot make it."""
    import hashlib
    import hmac

    message = f"memctl-owner|{nonce}|{pid}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def lock_holder_pids(settings: Settings) -> set[int] | None:
    """The PIDs holding the owner lock per ``/proc/locks`` (Linux), or None when that cannot be told."""
    lock_path, _ = _paths(settings)
    try:
        inode = os.stat(lock_path).st_ino
        text = Path("/proc/locks").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    pids: set[int] = set()
    for line in text.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:02:5678 0 EOF" (a blocked waiter has "->" after the number)
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        try:
            pid, ino = int(parts[4]), int(parts[5].rsplit(":", 1)[1])
        except (ValueError, IndexError):
            continue
        if ino == inode:
            pids.add(pid)
    return pids or None  # none listed under this inode (an overlay filesystem shows another): unknown


def is_loopback_url(url: str) -> bool:
    """``http://127.0.0.1:P``, ``http://[::1]:P`` or ``http://localhost:P`` (no path, user or query)."""
    import ipaddress
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme != "http" or not parts.hostname or port is None or parts.username or parts.password \
            or parts.path not in ("", "/") or parts.query or parts.fragment:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def listener_is_pid(url: str, pid: int) -> bool | None:
    """Whether the socket listening on ``url``'s port belongs to ``pid`` (``/proc/net/tcp*`` and the
    process's fds, Linux); None when that cannot be read (another user's process, no ``/proc``)."""
    from urllib.parse import urlsplit

    try:
        port = urlsplit(url).port
    except ValueError:
        return False
    if port is None:
        return False
    inodes: set[str] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text(encoding="ascii", errors="replace").splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            parts = line.split()
            # sl local_address rem_address st ... inode (index 9); LISTEN is state 0A
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    if not readable or not inodes:  # nothing listens there: the connection itself will fail
        return None
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return None
    links = set()
    for name in names:
        with contextlib.suppress(OSError):  # an fd closed meanwhile
            links.add(os.readlink(fd_dir / name))
    return any(f"socket:[{inode}]" in links for inode in inodes)
