"""The composition root: the core's services built once from settings, each owning its own state.

The facade (controller.py) holds one :class:`Services` and forwards to it; services receive the other
services or plain values they need, never the facade.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .applying import Executor
from .backend import Backend
from .catalog import Catalog
from .fleet import Fleet
from .holding import HolderCensus
from .maintenance import Maintenance
from .monitor import MemoryMonitor
from .oplog import Journal, OperationLog
from .planner import Planner
from .registry import BackendRegistry
from .runner import OperationRunner
from .serving import ServingState
from .settings import Settings
from .sizing import Sizer


@dataclass
class Services:
    settings: Settings
    probe: Any
    registry: BackendRegistry  # the backends, built on first use
    monitor: MemoryMonitor  # snapshots and the memory history
    fleet: Fleet  # what runs, on which backend
    catalog: Catalog  # cached models (the last scan)
    sizer: Sizer  # estimates, fits, recommendations (no state)
    census: HolderCensus  # who holds GPU memory
    ledger: ServingState  # requests generating now (leases) and the on-demand pause
    planner: Planner  # live state -> Plan (the batch-verdict cache)
    executor: Executor  # runs a plan's steps, rolls back
    maintenance: Maintenance  # unload, clear, emergency clear
    log: OperationLog  # finished and interrupted operations, on disk
    runner: OperationRunner  # one operation at a time


def build(settings: Settings, probe: Any, backends: dict[str, Backend] | None = None) -> Services:
    """``backends``: ready-made ones used instead of the configured ones (tests, benchmarks)."""
    s = settings
    specs = {} if backends is not None else {bid: cfg.factory for bid, cfg in s.backends.items()}
    registry = BackendRegistry(specs, s, probe, backends)
    monitor = MemoryMonitor(probe, s.poll_interval_s, s.memory_history_s)
    fleet = Fleet(registry)
    catalog = Catalog(s, fleet.backends)
    sizer = Sizer(s, fleet.capabilities)
    census = HolderCensus(probe, fleet, s.state_dir)
    ledger = ServingState()
    planner = Planner(sizer, fleet, census, monitor.snapshot)
    executor = Executor(s, probe, fleet, catalog, planner, census, ledger)
    maintenance = Maintenance(s, probe, fleet, census, ledger, executor.stop_deadline, monitor.used_by_device)
    log = OperationLog(s.state_dir)
    try:
        log.interrupted()  # operations whose process died mid-way are marked interrupted
    except Exception:  # noqa: BLE001 - a log we cannot read is reported by history(), not here
        pass
    journal = Journal(log, monitor.used_by_device)
    runner = OperationRunner(on_start=journal.started, on_end=journal.ended)
    return Services(s, probe, registry, monitor, fleet, catalog, sizer, census, ledger, planner, executor,
                    maintenance, log, runner)
