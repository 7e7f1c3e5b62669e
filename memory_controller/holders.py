"""Who holds the GPU: every process NVML reports, named and sorted into kinds (pure: values in, values out).

:func:`classify` turns a :class:`~memory_controller.types.SystemSnapshot` plus what the probe and the
backends know (process command lines, PID -> container, other holders' loaded models, memctl's own
deployments) into :class:`MemoryHolder` values. :func:`fit_with_holders` says whether a plan that
does not fit would fit once another holder's models are unloaded (an opt-in step) or only if a foreign
process stopped (a blocker naming it). :func:`remaining_by_device` is what an emergency clear reports
afterwards, with the advice for each holder. memctl frees only what it owns (``freeable_by ==
"memctl"``) and asks another holder (a :class:`HolderSource` a backend hands over) to unload its own
models (``freeable_by`` is the source's id); it never stops anything else.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import units
from .errors import MemctlError
from .types import Message, Outcome, SystemSnapshot, msg
from .units import fmt_bytes

# A holder's kind: "memctl_self", "memctl_other", "managed_container", "foreign_container", "process",
# "desktop", or for another holder's processes ``<source id>_server`` / ``<source id>_runner`` (holder_kind).
ROLES = ("server", "runner")  # what a holder source's process is: its idle server, or a runner holding models


def holder_kind(source_id: str, role: str) -> str:
    """The kind of a process of another holder: ``<source id>_<role>``."""
    return f"{source_id}_{role}"

# Command names of display servers, compositors and desktop shells: memory held for the screen.
DESKTOP_COMMANDS = frozenset({
    "xorg", "x", "xwayland", "gnome-shell", "kwin", "kwin_x11", "kwin_wayland", "plasmashell", "mutter",
    "sway", "hyprland", "weston", "gamescope", "cinnamon", "muffin", "xfwm4", "compiz", "marco", "budgie-wm",
    "enlightenment", "wayfire", "labwc", "river", "niri", "cosmic-comp", "gnome-remote-desktop-daemon",
})

MAX_NAME_CHARS = 120


def _escaped(text: str) -> str:
    """``text`` with control and format characters shown as escapes, uncut."""
    return units.escape_text(text, limit=sys.maxsize)


def shorten(text: str, max_chars: int = MAX_NAME_CHARS) -> str:
    """Escaped and cut to ``max_chars`` (an ellipsis marks the cut)."""
    text = _escaped(text)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def short_command(argv: Sequence[str], max_chars: int = MAX_NAME_CHARS) -> str:
    """A command line for display: the program's base name, then its arguments, escaped and shortened."""
    if not argv:
        return ""
    return shorten(" ".join([os.path.basename(argv[0]) or argv[0], *argv[1:]]), max_chars)


@dataclass(frozen=True)
class ProcessInfo:
    """What the probe found about one PID (memory_controller/probe/processes.py)."""

    pid: int
    name: str | None  # the process name (comm)
    argv: tuple[str, ...] = ()  # raw, bounded; shown only through short_command
    user: str | None = None
    is_self: bool = False
    is_memctl: bool = False  # another memctl process (CLI, dashboard, server)


class HeldModel(Protocol):
    """A model another holder has loaded: its name and the GPU memory it holds."""

    name: str
    size_vram: int


class HolderUnload(Protocol):
    """What one unload asked of another holder came to."""

    outcome: Outcome
    message: Message


class HolderSource(Protocol):
    """Another server holding models memctl did not load, which memctl may ask to unload them (a backend
    hands it over as ``holder_client``). The core knows it only through these members."""

    source: str  # its id: the kinds of its processes, ``freeable_by``, message codes
    label: str  # its name as shown
    base_url: str
    unloads_in_emergency: bool  # whether the emergency clear asks it to unload everything

    @property
    def last_error(self) -> MemctlError | None: ...  # why the last call failed, or None

    def role(self, argv: Sequence[str], name: str | None) -> str | None:
        """"server" or "runner" (one of ROLES) for a process of this holder, else None."""

    def loaded(self, max_age_s: float = 5.0) -> Sequence[HeldModel] | None:
        """Its loaded models, or None when it does not answer."""

    def unload(self, name: str, wait_s: float = 10.0) -> HolderUnload:
        """Unload one model; the result's ``message`` says what came back."""

    def emergency_unload(self, wait_s: float = 10.0) -> str:
        """Unload every model; one line saying what came back."""

    def advice(self, kind: str) -> str:
        """The advice for one of its processes (``kind``: "runner", "down" — a runner while it does not
        answer — or "server"); ``{models}`` is replaced by the runner's models."""


@dataclass(frozen=True)
class OtherHolder:
    """One holder source as a census saw it: the source, and its loaded models (None: it did not answer)."""

    source: HolderSource
    models: tuple[HeldModel, ...] | None


@dataclass(frozen=True)
class MemoryHolder:
    """One process holding memory on one device. ``bytes`` is None when the driver does not say."""

    device_key: str
    pid: int | None
    bytes: int | None
    kind: str  # see the kinds above
    name: str  # shortened, control characters escaped
    user: str | None = None
    detail: str = ""
    freeable_by: str | None = None  # "memctl" | a holder source's id | None (memctl never stops it)
    models: tuple[str, ...] = ()  # models it serves (memctl's, a managed container's, another holder's)
    advice: Message | None = None
    role: str | None = None  # for another holder's process: one of ROLES


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _program(argv: Sequence[str], name: str | None) -> str:
    prog = os.path.basename(argv[0]) if argv else (name or "")
    return prog.lower()


def role_of(others: Sequence[OtherHolder], argv: Sequence[str], name: str | None) -> tuple[OtherHolder | None, str | None]:
    """The first holder source that knows the process, and its role ("server"/"runner"); (None, None)."""
    for other in others:
        role = other.source.role(argv, name)
        if role in ROLES:
            return other, role
    return None, None


def is_desktop(argv: Sequence[str], name: str | None) -> bool:
    return _program(argv, name) in DESKTOP_COMMANDS or (name or "").lower() in DESKTOP_COMMANDS


def _match_runners(runner_bytes: Mapping[int, int | None], models: Sequence[HeldModel]) -> dict[int, tuple[str, ...]]:
    """A holder source's models per runner PID. With as many runners as models, pair them by size (largest with
    largest); otherwise every runner is said to hold one of all the loaded models."""
    names = tuple(_escaped(str(m.name)) for m in models)
    if len(runner_bytes) == len(models) and models:
        pids = sorted(runner_bytes, key=lambda p: -(runner_bytes[p] or 0))
        ordered = sorted(models, key=lambda m: -int(m.size_vram or 0))
        return {pid: (_escaped(str(m.name)),) for pid, m in zip(pids, ordered, strict=True)}
    return {pid: names for pid in runner_bytes}


def classify(snapshot: SystemSnapshot, processes_info: Mapping[int, ProcessInfo],
             containers_by_pid: Mapping[int, Any], others: Sequence[OtherHolder],
             own_deployments: Iterable[Any], own_pid: int) -> list[MemoryHolder]:
    """Name every process NVML reports on every GPU, largest first per device.

    Args:
        processes_info: PID -> :class:`ProcessInfo` (a PID missing here is "not visible").
        containers_by_pid: PID -> the container it runs in: any value with ``container_id``, ``name``,
            ``image``, ``managed``, ``model_id`` (backends/vllm ``containers_for_pids``; a dict works too).
        others: the other holder sources and their loaded models (``name``, ``size_vram``; None when one
            did not answer: its runners are then named but not freeable).
        own_deployments: this process's in-process deployments (``model_id``, ``memory_bytes``).
        own_pid: this process's PID.
    """
    own = list(own_deployments)
    holders: list[MemoryHolder] = []
    for gpu in snapshot.gpus:
        key = gpu.key
        runner_models: dict[int, tuple[str, ...]] = {}
        for other in others:
            runner_bytes = {}
            for pm in gpu.processes:
                info = processes_info.get(pm.pid)
                if pm.pid != own_pid and info is not None and role_of(others, info.argv, info.name) == (other, "runner"):
                    runner_bytes[pm.pid] = pm.used_bytes
            runner_models.update(_match_runners(runner_bytes, other.models or ()))
        for pm in gpu.processes:
            holders.append(_one(key, pm.pid, pm.used_bytes, pm.name, processes_info.get(pm.pid),
                                containers_by_pid.get(pm.pid), others, runner_models, own, own_pid))
    return holders


def _one(key: str, pid: int, used: int | None, nvml_name: str | None, info: ProcessInfo | None,
         container: Any, others: Sequence[OtherHolder],
         runner_models: Mapping[int, tuple[str, ...]], own: list[Any], own_pid: int) -> MemoryHolder:
    user = info.user if info else None
    command = short_command(info.argv) if info and info.argv else shorten(nvml_name or (info.name if info else "") or "")
    base = {"device_key": key, "pid": pid, "bytes": used, "user": user}
    if pid == own_pid or (info is not None and info.is_self):
        models = tuple(_escaped(str(d.model_id)) for d in own if int(_get(d, "memory_bytes", {}).get(key, 0)) > 0)
        return MemoryHolder(**base, kind="memctl_self", name="memctl (this process)",
                            detail=", ".join(models) or "CUDA context, no model", freeable_by="memctl",
                            models=models, advice=advice_for("memctl_self", pid=pid))
    if container is not None and _get(container, "managed", False):
        model = _get(container, "model_id")
        models = (_escaped(str(model)),) if model else ()
        return MemoryHolder(**base, kind="managed_container", name=shorten(str(_get(container, "name", "?"))),
                            detail=", ".join(models), freeable_by="memctl", models=models,
                            advice=advice_for("managed_container", name=str(_get(container, "name", "?"))))
    other, role = role_of(others, info.argv, info.name) if info is not None else (None, None)
    where = f" in container {shorten(str(_get(container, 'name', '?')), 60)}" if container is not None else ""
    if other is not None and role == "runner":
        sid, label = other.source.source, other.source.label
        models = runner_models.get(pid, ())
        answered = other.models is not None
        detail = (", ".join(models) if models else f"no model listed by {label}") if answered else f"{label} does not answer"
        return MemoryHolder(**base, kind=holder_kind(sid, "runner"), name=f"{label} runner{where}", detail=detail,
                            freeable_by=sid if answered and models else None, models=models, role=role,
                            advice=source_advice(other.source, "runner" if answered else "down", models=", ".join(models)))
    if other is not None and role == "server":
        return MemoryHolder(**base, kind=holder_kind(other.source.source, "server"), name=f"{other.source.label} server{where}",
                            detail=command, role=role, advice=source_advice(other.source, "server"))
    if container is not None:
        cname = shorten(str(_get(container, "name", "?")), 60)
        image = shorten(str(_get(container, "image", "?")), 60)
        return MemoryHolder(**base, kind="foreign_container", name=f"container {cname}",
                            detail=f"image {image}; {command}".rstrip("; "),
                            advice=advice_for("foreign_container", name=cname))
    if info is None:
        return MemoryHolder(**base, kind="process", name=command or f"PID {pid}",
                            detail="not visible to memctl (exited, or in another PID namespace)",
                            advice=advice_for("process", pid=pid))
    if info.is_memctl:
        return MemoryHolder(**base, kind="memctl_other", name="another memctl", detail=command,
                            advice=advice_for("memctl_other", pid=pid))
    if is_desktop(info.argv, info.name):
        return MemoryHolder(**base, kind="desktop", name=command or shorten(info.name or "desktop"),
                            advice=advice_for("desktop"))
    return MemoryHolder(**base, kind="process", name=command or shorten(info.name or f"PID {pid}"),
                        advice=advice_for("process", pid=pid))


# --------------------------------------------------------------------------- advice (the guide's "Решение проблем")
_ADVICE = {
    "memctl_self": "memctl's own model: unload it (🗑️) or press 🧹 Очистить память; if it stays, restart the application",
    "memctl_other": "another memctl process (PID {pid}): unload its models there, or stop that process",
    "managed_container": "memctl's container {name} did not stop: check Docker's status by hand, restart the "
                         "Docker service",
    "foreign_container": "container {name} was not started by memctl: stop it yourself (docker stop {name}) "
                         "if you do not need it",
    "process": "another program (PID {pid}): close it if you do not need it; memctl never stops it",
    "desktop": "the desktop's graphics: freed only by logging out; choose a lighter model",
    "unattributed": "memory no process is reported for (another PID namespace, the driver): "
                    "if it stays, restart the machine",
}


def advice_for(kind: str, **args: Any) -> Message:
    return msg(f"holder.advice.{kind}", _ADVICE[kind].format(**args), **args)


def source_advice(source: HolderSource, kind: str, **args: Any) -> Message:
    """The advice a holder source gives for one of its processes (code ``holder.advice.<source id>_<kind>``)."""
    return msg(f"holder.advice.{holder_kind(source.source, kind)}", source.advice(kind).format(**args), **args)


# --------------------------------------------------------------------------- sums, plans, reports
def held_by_others(holders: Iterable[MemoryHolder], device_key: str) -> int:
    """Bytes on ``device_key`` held by anything but memctl itself and its containers (unknown bytes count 0)."""
    return sum(h.bytes or 0 for h in holders
               if h.device_key == device_key and h.kind not in ("memctl_self", "managed_container"))


@dataclass(frozen=True)
class HolderFit:
    """What a plan that is short of ``shortfall_bytes`` on a device can do about other holders."""

    shortfall_bytes: int  # needed − free after memctl's own unloads (<= 0: fits already)
    others_bytes: int  # held by others on the device
    models: tuple[str, ...] = ()  # unload these from ``source`` (opt-in step) ...
    freed_bytes: int = 0  # ... which frees about this much (the source's size_vram)
    fits_if_freed: bool = False
    blocking: tuple[MemoryHolder, ...] = ()  # foreign holders that would have to stop (memctl never does)
    notes: tuple[Message, ...] = ()
    blockers: tuple[Message, ...] = ()
    step: Message | None = None  # the opt-in step's label
    source: str = ""  # the holder source the opt-in step asks (a MemoryHolder's freeable_by)


def fit_with_holders(holders: Sequence[MemoryHolder], device_key: str, shortfall_bytes: int,
                     others: Sequence[OtherHolder] = ()) -> HolderFit:
    """The plan's view of other holders on ``device_key``.

    ``shortfall_bytes`` = needed − free after memctl's own unloads. Always a note "held by others" when
    others hold memory. When short: if one holder source's freeable runners cover it, the fewest of its
    models (largest first) to unload, as an opt-in step; otherwise a blocker naming the foreign holders (largest
    first) that would have to stop — or none when even all of them would not be enough.
    """
    here = sorted((h for h in holders if h.device_key == device_key and h.kind not in ("memctl_self", "managed_container")),
                  key=lambda h: -(h.bytes or 0))
    others_bytes = sum(h.bytes or 0 for h in here)
    notes: list[Message] = []
    if others_bytes:
        who = ", ".join(f"{h.name} {fmt_bytes(h.bytes)}" for h in here if h.bytes)
        notes.append(msg("plan.held_by_others", f"held by others on {device_key}: {fmt_bytes(others_bytes)} ({who})",
                         device=device_key, bytes=others_bytes, size=fmt_bytes(others_bytes), who=who,
                         holders=[h.name for h in here if h.bytes]))
    if shortfall_bytes <= 0:
        return HolderFit(shortfall_bytes, others_bytes, notes=tuple(notes))
    sources = {o.source.source: o for o in others}
    freeable_all = sum(h.bytes or 0 for h in here if h.freeable_by in sources)
    for sid, other in sources.items():
        runners = [h for h in here if h.freeable_by == sid]
        if not runners or sum(h.bytes or 0 for h in runners) < shortfall_bytes:
            continue
        chosen_models = _to_unload(runners, shortfall_bytes)
        sizes = {_escaped(str(m.name)): int(m.size_vram or 0) for m in (other.models or ())}
        nbytes = sum(sizes.get(n, 0) for n in chosen_models) or sum(
            h.bytes or 0 for h in runners if set(h.models) & set(chosen_models))
        names = ", ".join(chosen_models)
        step = msg(f"plan.unload_{sid}", f"also unload from {other.source.label}: {names}, {fmt_bytes(nbytes)}",
                   models=list(chosen_models), names=names, bytes=nbytes, size=fmt_bytes(nbytes))
        return HolderFit(shortfall_bytes, others_bytes, chosen_models, nbytes, True, notes=tuple(notes), step=step,
                         source=sid)
    freeable = freeable_all
    rest = [h for h in here if h.freeable_by is None and h.bytes]
    need = shortfall_bytes - freeable
    blocking: list[MemoryHolder] = []
    covered = 0
    for h in rest:
        if covered >= need:
            break
        blocking.append(h)
        covered += h.bytes or 0
    if covered < need:  # even stopping everything else would not make room: the plain "does not fit"
        return HolderFit(shortfall_bytes, others_bytes, notes=tuple(notes))
    names = ", ".join(f"{h.name} (PID {h.pid}, {fmt_bytes(h.bytes)})" for h in blocking)
    labels = ", ".join(o.source.label for o in others if any(h.freeable_by == o.source.source for h in here))
    also = f" and the models of {labels} were unloaded" if freeable else ""
    blocker = msg("plan.blocked_by_holder",
                  f"fits only if {names} stopped{also}; memctl never stops a process it did not start",
                  device=device_key, names=names, with_holders=bool(freeable),
                  holders=[{"name": h.name, "pid": h.pid, "bytes": h.bytes, "kind": h.kind} for h in blocking])
    return HolderFit(shortfall_bytes, others_bytes, blocking=tuple(blocking), notes=tuple(notes), blockers=(blocker,))


def _to_unload(runners: Sequence[MemoryHolder], shortfall_bytes: int) -> tuple[str, ...]:
    chosen: list[str] = []
    covered = 0
    for h in runners:  # largest first
        if covered >= shortfall_bytes:
            break
        covered += h.bytes or 0
        chosen.extend(m for m in h.models if m not in chosen)
    return tuple(chosen)


@dataclass(frozen=True)
class DeviceHolders:
    """What holds memory on one device: named holders plus what no process is reported for."""

    device_key: str
    used_bytes: int | None
    holders: tuple[MemoryHolder, ...] = ()
    unattributed_bytes: int | None = None
    advice: tuple[Message, ...] = field(default_factory=tuple)


def remaining_by_device(snapshot: SystemSnapshot, holders: Sequence[MemoryHolder]) -> list[DeviceHolders]:
    """Per GPU: every holder (largest first) with its advice, and the memory left unattributed."""
    out = []
    for gpu in snapshot.gpus:
        mine = tuple(sorted((h for h in holders if h.device_key == gpu.key), key=lambda h: -(h.bytes or 0)))
        known = sum(h.bytes or 0 for h in mine)
        unknown_bytes = any(h.bytes is None for h in mine)
        rest = None if gpu.used_bytes is None or unknown_bytes else max(0, gpu.used_bytes - known)
        advice: dict[str, Message] = {}
        for h in mine:
            if h.advice is not None:
                advice.setdefault(h.advice.text, h.advice)
        if rest and not mine:
            advice.setdefault("unattributed", advice_for("unattributed"))
        out.append(DeviceHolders(gpu.key, gpu.used_bytes, mine, rest, tuple(advice.values())))
    return out


BENIGN_KINDS = frozenset({"desktop"})
# Used memory no process accounts for, up to this much, is the driver's own reserve (seen at 0.3-1 GiB).
DRIVER_RESERVE_BYTES = 1024**3


def _benign(h: MemoryHolder) -> bool:
    """Expected to stay after a clear: the screen, another holder's idle server, this process's bare CUDA context."""
    return h.kind in BENIGN_KINDS or h.role == "server" or (h.kind == "memctl_self" and not h.models)


def after_emergency(remaining: Sequence[DeviceHolders]) -> tuple[Outcome, Message]:
    """The emergency clear's verdict from what still holds memory: SUCCESS only when nothing but the desktop,
    another holder's idle server and this process's bare CUDA context is left; else WARNING naming every holder
    per GPU (another memctl process included: it is never reported as "nothing loaded")."""
    lines, left = [], False
    for dev in remaining:
        parts = [f"{h.name} (PID {h.pid}{', ' + h.user if h.user else ''}) {fmt_bytes(h.bytes)}" for h in dev.holders]
        if dev.unattributed_bytes:
            parts.append(f"unattributed {fmt_bytes(dev.unattributed_bytes)}")
        if parts:
            lines.append(f"{dev.device_key}: " + "; ".join(parts))
        left = left or any(not _benign(h) for h in dev.holders) or bool(
            dev.unattributed_bytes and dev.unattributed_bytes > DRIVER_RESERVE_BYTES and not dev.holders)
    text = " | ".join(lines)
    if left:
        return Outcome.WARNING, msg("emergency.still_held", f"memory is still held: {text}", holders=text)
    if lines:
        return Outcome.SUCCESS, msg("emergency.freed_rest_expected", f"freed; what remains is expected: {text}",
                                    holders=text)
    return Outcome.SUCCESS, msg("emergency.all_free", "freed: nothing holds GPU memory")


def holder_rows(holders: Sequence[MemoryHolder]) -> list[dict[str, Any]]:
    """JSON-ready rows (``memctl status --json`` "holders", the dashboard's table)."""
    return [{"device": h.device_key, "pid": h.pid, "bytes": h.bytes, "kind": h.kind, "name": h.name,
             "user": h.user, "detail": h.detail, "freeable_by": h.freeable_by, "models": list(h.models),
             "advice": h.advice.text if h.advice else None,
             "advice_code": h.advice.code if h.advice else None, "role": h.role} for h in holders]
