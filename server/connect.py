"""Which controller an entry point talks to: :func:`controller_for` (every CLI command) and
:func:`attach` (the same rule, for the dashboard and the diagnostic page, which may also become the
owner), built on :func:`connect` (a client of the live owner, or None).

With a live owner (``memctl serve`` or a dashboard that serves) every other process gets its client,
a :class:`~server.client.RemoteController`; without one, the caller becomes the owner (``serve``: the
dashboard) or gets this process's controller, both as ``memory_controller.api.ControllerAPI``.

This module joins :mod:`server.owner` (the lock, ``server.json``, the identity checks),
:mod:`server.client` (the HTTP client) and, for the process that becomes the owner, :mod:`server.runner`
(the server itself); none of them imports this one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from memory_controller.api import ControllerAPI, InProcessController
from memory_controller.errors import MemctlError

from .client import RemoteController
from .owner import (
    OwnerExistsError,
    OwnerIdentityError,
    OwnerUnreachableError,
    listener_is_pid,
    lock_holder_pids,
    read_owner,
)

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.settings import Settings

    from .runner import ServerHandle


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
    (``make_controller()``, default a new ``MemoryController(settings)``) as a ControllerAPI."""
    return attach(settings, make_controller=make_controller).ctl


def attach(settings: Settings, *, serve: bool = False, make_controller: Callable[[], Any] | None = None,
           port: int | None = None) -> Any:
    """The one rule every entry point follows, as a ``server.runner.Ownership``: with a live owner its
    client; else, with ``serve`` (the dashboard), this process becomes the owner (its controller plus
    the server on a background thread, :func:`server.runner.own_or_connect`); else this process's
    controller. Raises what :func:`connect` raises."""
    if serve:
        make = make_controller or (lambda: _new_controller(settings))
        return own_or_connect(settings, make, port=port)
    client = connect(settings)
    if client is not None:
        return Ownership(client, None)
    return Ownership(local_controller(settings, make_controller), None)


def _new_controller(settings: Settings) -> Any:
    from memory_controller import MemoryController

    return MemoryController(settings)


def local_controller(settings: Settings, make_controller: Callable[[], Any] | None = None) -> InProcessController:
    return InProcessController(make_controller() if make_controller is not None else _new_controller(settings))


# --------------------------------------------------------------------------- the dashboard's one call
class Ownership:
    """What :func:`own_or_connect` found: ``ctl`` (the ``ControllerAPI`` to act on: this process's
    controller or a client of the owner), ``handle`` (this process's server when it became the owner)
    and ``error`` (why it serves nothing although it owns the controller, e.g. the port is taken)."""

    def __init__(self, ctl: Any, handle: ServerHandle | None, error: MemctlError | None = None) -> None:
        self.ctl, self.handle, self.error = ctl, handle, error

    @property
    def is_owner(self) -> bool:
        return not isinstance(self.ctl, RemoteController)


def own_or_connect(settings: Settings, make_controller: Any, *, port: int | None = None) -> Ownership:
    """A client of the live owner; else become the owner: ``make_controller()`` (a MemoryController)
    plus the server on a background thread, ``ctl`` its ControllerAPI. Two processes racing: the loser
    connects to the winner.

    A port already taken by something else leaves this process with its own controller, no server and
    ``error`` set (the dashboard shows it); OwnerUnreachableError (a live owner that does not answer)
    and OwnerIdentityError (what server.json names is not the owner) are raised, so nothing acts on
    memory behind that owner's back.
    """
    from .runner import PortBusyError, ServerHandle

    for _ in range(3):
        client = connect(settings)
        if client is not None:
            return Ownership(client, None)
        ctl = make_controller()
        try:
            return Ownership(InProcessController(ctl), ServerHandle(ctl, settings, port=port).start())
        except OwnerExistsError:
            owner = read_owner(settings, wait_s=3.0)
            if owner is not None and owner.pid == os.getpid():
                raise OwnerExistsError("this process already runs the memctl server",
                                       "reuse the controller it was started with") from None
            continue  # another process won the race: connect to it
        except PortBusyError as exc:
            return Ownership(InProcessController(ctl), None, exc)
    raise OwnerExistsError("another memctl process keeps taking and dropping the owner lock",
                           "stop the other memctl processes and start again")
