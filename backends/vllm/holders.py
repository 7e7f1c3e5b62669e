"""Who holds the GPU: a host PID -> the Docker container it runs in (via ``/proc/<pid>/cgroup``).

cgroup v2 (systemd driver): ``0::/system.slice/docker-<64 hex>.scope``; cgroupfs driver (v1 or v2):
``.../docker/<64 hex>``. A process that is in no container, gone, or unreadable is left out.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .labels import MODEL_LABEL, is_managed, label_text

_ID_RE = re.compile(r"/docker[-/]([0-9a-f]{64})(?:\.scope)?(?=/|$)")
LOOKUP_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ContainerHolder:
    """The container a GPU-holding process belongs to (text escaped for display)."""

    container_id: str
    name: str
    image: str
    managed: bool  # carries memctl.managed=true
    model_id: str | None  # memctl.model of a managed container


def container_id_of(pid: int, proc_root: Path = Path("/proc")) -> str | None:
    """The 64-hex container id in ``/proc/<pid>/cgroup``, or None (no container, gone, unreadable)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        text = (proc_root / str(pid) / "cgroup").read_text(errors="replace")[:65536]
    except OSError:
        return None
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        ids = _ID_RE.findall(path)
        if ids:
            return ids[-1]  # the innermost container (Docker in Docker)
    return None


def holders_for_pids(pids: Iterable[int], lookup: Callable[[set[str]], dict[str, Any]],
                     timeout_s: float = LOOKUP_TIMEOUT_S, proc_root: Path = Path("/proc")) -> dict[int, ContainerHolder]:
    """Map each PID in a container to a :class:`ContainerHolder`.

    ``lookup(ids)`` returns ``{container id: docker-py container}``; it runs on a helper thread and
    whatever it has not answered within ``timeout_s`` is reported with the id only (name "?").
    """
    by_pid = {pid: cid for pid in set(pids) if (cid := container_id_of(pid, proc_root))}
    if not by_pid:
        return {}
    found: dict[str, Any] = {}

    def run() -> None:
        try:
            found.update(lookup(set(by_pid.values())))
        except Exception:  # noqa: BLE001 - Docker down: the ids are still worth reporting
            pass

    worker = threading.Thread(target=run, name="memctl-vllm-holders", daemon=True)
    worker.start()
    worker.join(timeout_s)
    answered = dict(found)  # a late answer must not change the result under our feet
    out: dict[int, ContainerHolder] = {}
    for pid, cid in by_pid.items():
        c = answered.get(cid)
        if c is None:
            out[pid] = ContainerHolder(cid, "?", "?", False, None)
            continue
        labels = c.labels if isinstance(getattr(c, "labels", None), dict) else {}
        managed = is_managed(labels)
        model = labels.get(MODEL_LABEL) if managed else None
        image = ((c.attrs or {}).get("Config") or {}).get("Image") or "?"
        out[pid] = ContainerHolder(cid, label_text(str(c.name)), label_text(str(image)), managed,
                                   label_text(model) if isinstance(model, str) else None)
    return out


def docker_lookup(access: Any, timeout_s: float) -> Callable[[set[str]], dict[str, Any]]:
    """A lookup for :func:`holders_for_pids` on its own short-timeout client (``access``: DockerAccess)."""

    def lookup(ids: set[str]) -> dict[str, Any]:
        client = access.new_client(timeout_s)
        try:
            out = {}
            for cid in ids:
                with contextlib.suppress(Exception):  # gone meanwhile: reported with its id only
                    out[cid] = client.containers.get(cid)
            return out
        finally:
            client.close()

    return lookup
