"""Who a PID is: command line, user, whether it is this process or another memctl (psutil; never raises).

The result feeds :func:`memory_controller.holders.classify`. A PID that is gone or in another PID
namespace is left out (the holder is then "not visible"); one whose command line cannot be read
(another user's process) keeps its name and user.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import psutil

from memory_controller.holders import ProcessInfo

MAX_ARGS = 64
MAX_ARG_CHARS = 4096

# A command line is memctl's when its program or an argument names memctl's entry points.
_MEMCTL_ENTRIES = ("memctl", "memory_controller", "memctl_cli", "test_memory_controller.py")


def _bounded(argv: Sequence[str]) -> tuple[str, ...]:
    return tuple(str(a)[:MAX_ARG_CHARS] for a in list(argv)[:MAX_ARGS])


def looks_like_memctl(argv: Sequence[str], cwd: str | None = None) -> bool:
    """True for ``memctl ...``, ``python -m memory_controller...``, ``streamlit run <memctl>/app.py``."""
    for i, arg in enumerate(argv[:8]):
        base = os.path.basename(arg)
        if base in _MEMCTL_ENTRIES or (i > 0 and argv[i - 1] == "-m" and arg.split(".")[0] in ("memory_controller", "memctl_cli")):
            return True
        if base == "app.py" and i > 0 and "run" in argv[:i]:
            where = os.path.dirname(arg if os.path.isabs(arg) or cwd is None else os.path.join(cwd, arg))
            if os.path.isfile(os.path.join(where, "memory_controller", "holders.py")):
                return True
    return False


def process_info(pids: Iterable[int], *, own_pid: int | None = None,
                 memctl_pids: Iterable[int] = ()) -> dict[int, ProcessInfo]:
    """PID -> :class:`ProcessInfo` for each PID that exists. ``memctl_pids``: PIDs known to be memctl
    (e.g. the owner process from its state file), added to what the command lines say."""
    me = os.getpid() if own_pid is None else own_pid
    known = set(memctl_pids)
    out: dict[int, ProcessInfo] = {}
    for pid in set(pids):
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            continue
        try:
            proc = psutil.Process(pid)
            name = proc.name()
        except (psutil.Error, OSError):
            continue  # gone, or not visible from here
        argv: tuple[str, ...] = ()
        user = cwd = None
        try:
            argv = _bounded(proc.cmdline())
        except (psutil.Error, OSError):
            pass
        try:
            user = proc.username()
        except (psutil.Error, OSError, KeyError):
            pass
        try:
            cwd = proc.cwd()
        except (psutil.Error, OSError):
            pass
        out[pid] = ProcessInfo(pid=pid, name=name, argv=argv, user=user, is_self=pid == me,
                               is_memctl=pid != me and (pid in known or looks_like_memctl(argv, cwd)))
    return out
