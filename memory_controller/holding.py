"""Who holds memory, at run time: the probe's processes, backends' containers, Ollama's models, named.

Glue between the pure classifier (holders.py) and what can only be asked at run time. A server holding
models memctl did not load (Ollama) is another holder memctl may ask to unload: a configured backend
hands it over as ``holder_client`` (the core never names it). A backend that can map PIDs to what it
runs offers ``containers_for_pids(pids, timeout_s)``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .backend import DeploymentState
from .errors import MemctlError
from .holders import MemoryHolder, classify
from .types import SystemSnapshot

if TYPE_CHECKING:
    from .controller import MemoryController

def ollama_client(ctl: MemoryController) -> Any | None:
    """The other holder a configured backend hands over (its ``holder_client``: a server holding models memctl
    did not load, which it may ask to unload); None when no backend offers one."""
    for b in ctl.backends().values():
        try:
            client = getattr(b, "holder_client", None)
        except MemctlError:
            client = None
        if client is not None:
            return client
    return None


def ollama_models(ctl: MemoryController) -> list | None:
    client = ollama_client(ctl)
    return None if client is None else client.loaded(max_age_s=5.0)


def holders(ctl: MemoryController, snap: SystemSnapshot | None = None) -> list[MemoryHolder]:
    """Every process NVML reports on a GPU, named (this memctl, its containers, foreign containers, Ollama,
    other processes, the desktop), with its bytes."""
    from .probe.processes import process_info

    snap = snap or ctl.probe.snapshot()
    pids = sorted({p.pid for g in snap.gpus for p in g.processes})
    if not pids:
        return []
    procs = process_info(pids, memctl_pids=_owner_pids(ctl))
    containers: dict = {}
    backends = ctl.backends()
    for b in backends.values():
        mapper = getattr(b, "containers_for_pids", None)
        if mapper is None:
            continue
        try:
            containers.update(mapper(pids, timeout_s=2.0))
        except Exception:  # noqa: BLE001 - unknown containers are named as plain processes
            continue
    own = [d for d in ctl.deployments()
           if d.state is not DeploymentState.STOPPED and d.backend_id in backends
           and backends[d.backend_id].capabilities.generates_in_process]
    return classify(snap, procs, containers, ollama_models(ctl), own, os.getpid())


OWNER_FILE = "server.json"  # written by the owner process (server/owner.py): {"url", "pid", "token", ...}


def _owner_pids(ctl: MemoryController) -> tuple[int, ...]:
    """The owner process's PID (another memctl holding models), read from the state dir; the token in
    that file is never read into memory beyond the parse."""
    from .errors import CorruptDataError
    from .safejson import loads_bounded

    try:
        data = loads_bounded((ctl.settings.state_dir / OWNER_FILE).read_bytes(), what=OWNER_FILE,
                             max_bytes=64 * 1024, expect=dict)
    except (OSError, CorruptDataError):
        return ()
    pid = data.get("pid")
    return (pid,) if isinstance(pid, int) and not isinstance(pid, bool) and pid != os.getpid() else ()
