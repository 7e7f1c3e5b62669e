"""Which controller an entry point talks to: :func:`controller_for` (every CLI command, the dashboard,
the diagnostic page) and :func:`connect` (a client of the live owner, or None).

With a live owner (``memctl serve`` or a dashboard that serves) every other process gets its client,
a :class:`~server.client.RemoteController`; without one, the caller becomes the owner (``serve``: the
dashboard) or gets this process's controller, both as ``memory_controller.api.ControllerAPI``.

This module joins :mod:`server.owner` (the lock, ``server.json``, the identity checks) and
:mod:`server.client` (the HTTP client), which do not import each other's way back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from memory_controller.api import ControllerAPI, InProcessController
from memory_controller.errors import MemctlError

from .client import RemoteController
from .owner import OwnerIdentityError, OwnerUnreachableError, listener_is_pid, lock_holder_pids, read_owner

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.settings import Settings


def connect(settings: Settings, *, timeout_s: float = 5.0) -> RemoteController | None:
    """A client of the live owner process, or None when there is none or this process is the owner.

    Before the token leaves this process, the owner's identity is checked (the PID in ``server.json``
    holds the lock and listens at its URL, and the server there proves it knows the token): a failed
    check raises :class:`~server.owner.OwnerIdentityError` and nothing is sent. Raises
    :class:`~server.owner.OwnerUnreachableError` when a live owner's server does not answer: acting
    on a second controller then would fight the first one over the same memory.
    """
    info = read_owner(settings)
    if info is None or info.pid == os.getpid():
        return None
    client = RemoteController(info, settings, timeout_s=timeout_s)
    try:
        client.verify(lock_pids=lock_holder_pids(settings), listener_ok=listener_is_pid(info.url, info.pid))
        client.ping()
    except OwnerIdentityError:
        client.close()
        raise
    except MemctlError as exc:
        client.close()
        if exc.code == "owner_bad_answer":
            raise OwnerIdentityError(exc.message, exc.hint, args=dict(exc.args_)) from None
        raise OwnerUnreachableError(
            f"the memctl owner process (PID {info.pid}) at {info.url} does not answer: {exc.message}",
            "check that process (it may be busy or stuck); stop it to let this one take over",
        ) from None
    return client


def controller_for(settings: Settings, *, make_controller: Callable[[], Any] | None = None) -> ControllerAPI:
    """The controller an entry point acts on: the live owner's client, else this process's controller
    (``make_controller()``, default a new ``MemoryController(settings)``) as a ControllerAPI.

    The dashboard, which may become the owner itself, goes through :func:`server.runner.own_or_connect`
    (the same rule, plus starting the server)."""
    client = connect(settings)
    if client is not None:
        return client
    return local_controller(settings, make_controller)


def local_controller(settings: Settings, make_controller: Callable[[], Any] | None = None) -> InProcessController:
    if make_controller is None:
        from memory_controller import MemoryController

        return InProcessController(MemoryController(settings))
    return InProcessController(make_controller())
