"""The holder census: who holds GPU memory at run time (the probe's processes, backends' containers, other
holders' models), named.

Glue between the pure classifier (holders.py) and what can only be asked at run time. A server holding
models memctl did not load is another holder memctl may ask to unload: a configured backend hands it over
as ``holder_client`` (the core never names it). A backend that can map PIDs to what it runs offers
``Backend.containers_for_pids``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backend import DeploymentState
from .errors import CorruptDataError, MemctlError
from .holders import HolderSource, MemoryHolder, OtherHolder, classify
from .safejson import loads_bounded
from .types import SystemSnapshot

if TYPE_CHECKING:
    from .fleet import Fleet

OWNER_FILE = "server.json"  # written by the owner process (server/owner.py): {"url", "pid", "token", ...}


class HolderCensus:
    """Other holders are handed over by backends (``holder_client``: a :class:`~.holders.HolderSource`)."""

    def __init__(self, probe: Any, fleet: Fleet, state_dir: Path) -> None:
        self.probe, self.fleet, self.state_dir = probe, fleet, state_dir

    def source(self, source_id: str) -> HolderSource | None:
        """The client of one other holder (``source_id``: the id of the backend that hands it over, or its own
        ``source``), or None."""
        return next((c for bid, c in self._clients() if source_id in (bid, c.source)), None)

    def sources(self) -> list[HolderSource]:
        """Every other holder the configured backends hand over."""
        return [c for _bid, c in self._clients()]

    def _clients(self) -> list[tuple[str, HolderSource]]:
        out = []
        for bid, b in self.fleet.backends().items():
            try:
                client = b.holder_client
            except MemctlError:
                client = None
            if client is not None:
                out.append((bid, client))
        return out

    def others(self) -> list[OtherHolder]:
        """Each other holder with its loaded models (None for one that does not answer), read at most 5 s old."""
        out = []
        for c in self.sources():
            models = c.loaded(max_age_s=5.0)
            out.append(OtherHolder(c, None if models is None else tuple(models)))
        return out

    def holders(self, snap: SystemSnapshot | None = None, others: list[OtherHolder] | None = None) -> list[MemoryHolder]:
        """Every process NVML reports on a GPU, named (this memctl, its containers, foreign containers, other
        holders' servers, other processes, the desktop), with its bytes. ``others``: as :meth:`others` read them."""
        from .probe.processes import process_info

        snap = snap or self.probe.snapshot()
        pids = sorted({p.pid for g in snap.gpus for p in g.processes})
        if not pids:
            return []
        procs = process_info(pids, memctl_pids=self.owner_pids())
        containers: dict = {}
        backends = self.fleet.backends()
        for b in backends.values():
            try:
                containers.update(b.containers_for_pids(pids, timeout_s=2.0))
            except Exception:  # noqa: BLE001 - unknown containers are named as plain processes
                continue
        own = [d for d in self.fleet.deployments()
               if d.state is not DeploymentState.STOPPED and d.backend_id in backends
               and backends[d.backend_id].capabilities.generates_in_process]
        return classify(snap, procs, containers, self.others() if others is None else others, own, os.getpid())

    def owner_pids(self) -> tuple[int, ...]:
        """The owner process's PID (another memctl holding models), read from the state dir; the token in
        that file is never read into memory beyond the parse."""
        try:
            data = loads_bounded((self.state_dir / OWNER_FILE).read_bytes(), what=OWNER_FILE,
                                 max_bytes=64 * 1024, expect=dict)
        except (OSError, CorruptDataError):
            return ()
        pid = data.get("pid")
        return (pid,) if isinstance(pid, int) and not isinstance(pid, bool) and pid != os.getpid() else ()
