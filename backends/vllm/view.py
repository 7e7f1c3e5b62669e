"""A managed container as a :class:`Deployment` (labels read as untrusted input, health probed on
memctl's own bind address), and the measured :class:`ReleaseReport` of a stop."""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from memory_controller.backend import Deployment, DeploymentState, Message, ReleaseReport, msg
from memory_controller.types import Outcome
from memory_controller.units import fmt_bytes

from . import client as dc
from .labels import LabelInfo, label_text, read_labels

if TYPE_CHECKING:  # pragma: no cover
    from memory_controller.settings import Settings

BACKEND_ID = "vllm"
HEALTH_PROBE_TIMEOUT_S = 0.5
# A release counts as complete when at most this share of the claim is still held.
STILL_HELD_TOLERANCE = 0.10
RELEASE_POLL_S = 0.25  # after a stop, NVML is read every 0.25 s until the memory is back or 5 s pass
RELEASE_WAIT_S = 5.0


def parse_docker_time(value: Any) -> float | None:
    if not isinstance(value, str) or not value or value.startswith("0001-01-01"):
        return None
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d{1,6})?\d*(Z|[+-]\d\d:\d\d)?$", value)
    if not m:
        return None
    try:
        return datetime.fromisoformat(m.group(1) + (m.group(2) or "") + (m.group(3) or "Z")
                                      .replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def endpoint_for(settings: Settings, port: int | None) -> str | None:
    """The OpenAI base URL, built only from memctl's own bind address and a validated port."""
    if port is None or not 1 <= port <= 65535:
        return None
    return f"http://{dc.url_host(settings.bind_address)}:{port}/v1"


def probe_health(settings: Settings, port: int | None) -> str:
    """"ready" | "starting" | "unhealthy" | "unknown" from GET /health on memctl's bind address."""
    if port is None:
        return "unknown"
    code, _ = dc.http_get(f"http://{dc.url_host(settings.bind_address)}:{port}/health", HEALTH_PROBE_TIMEOUT_S)
    return "ready" if code == 200 else ("starting" if code in (0, 404) else "unhealthy")


def unreadable_warning(name: str, info: LabelInfo) -> Message:
    return msg("deployment.unreadable_labels",
               f"{name}: memctl cannot read this container's labels ({'; '.join(info.problems)}); "
               "it is shown as is and can be stopped", container=name, problems=list(info.problems))


def settings_mismatch(settings: Settings, attrs: dict, info: LabelInfo) -> list[str]:
    """How a managed container differs from what memctl's settings would start now: another image (tag), another
    port, no API key where one is now required, or another key (compared, never shown). Such a container is not
    served as is: it is failed, and the next load replaces it."""
    from .args import API_KEY_ENV

    config = attrs.get("Config") if isinstance(attrs.get("Config"), dict) else {}
    problems: list[str] = []
    image = config.get("Image")
    if isinstance(image, str) and image and image != settings.vllm_image_ref:
        problems.append(f"it runs image {label_text(image)}, the settings ask for {settings.vllm_image_ref}")
    if info.readable and info.port is not None and info.port != settings.vllm_port:
        problems.append(f"it listens on port {info.port}, the settings ask for {settings.vllm_port}")
    env = config.get("Env") if isinstance(config.get("Env"), list) else []
    prefix = API_KEY_ENV + "="
    found = [e[len(prefix):] for e in env if isinstance(e, str) and e.startswith(prefix)]
    want = settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None
    if want is not None and not found:
        problems.append("it runs without the API key the settings now require (vllm_api_key)")
    elif want is not None and not hmac.compare_digest(found[-1].encode(), want.encode()):
        problems.append("it runs with another API key than the settings' vllm_api_key")
    elif want is None and found and found[-1]:
        problems.append("it requires an API key, and the settings now have none (vllm_api_key)")
    return problems


def to_deployment(settings: Settings, c: Any, *, probe: bool = True, health: str | None = None,
                  stopping: bool = False, starting: bool = False) -> Deployment:
    """A Deployment for docker-py container ``c`` (freshly reloaded). Never raises on bad labels."""
    attrs = c.attrs if isinstance(getattr(c, "attrs", None), dict) else {}
    info = read_labels(c.labels)
    state_d = attrs.get("State") if isinstance(attrs.get("State"), dict) else {}
    status = state_d.get("Status") or c.status
    name = label_text(str(c.name))
    if health is None:
        if status != "running":
            health = "stopped" if status in ("exited", "dead", "created") else "unknown"
        elif not probe or not info.readable:
            health = "unknown"
        else:
            health = probe_health(settings, info.port)
    if stopping or status == "removing":
        state = DeploymentState.STOPPING
    elif status == "running":
        state = {"ready": DeploymentState.READY, "starting": DeploymentState.STARTING}.get(
            health, DeploymentState.STARTING if starting or (health == "unknown" and info.readable)
            else DeploymentState.FAILED)
    elif status in ("created", "restarting"):
        state = DeploymentState.STARTING
    else:
        state = DeploymentState.FAILED
    mismatch = settings_mismatch(settings, attrs, info) if status == "running" and not stopping else []
    started = parse_docker_time(state_d.get("StartedAt")) or 0.0
    if (state is DeploymentState.STARTING and health == "starting" and not starting and started > 0
            and time.time() - started > float(settings.vllm_ready_timeout_s)):
        # running, but its API has not answered for longer than a cold start may take: it is dead inside
        mismatch = [*mismatch, f"its API has not answered in the {settings.vllm_ready_timeout_s:g} s a start may take"]
    if mismatch and state in (DeploymentState.READY, DeploymentState.STARTING):
        state = DeploymentState.FAILED  # never served as is; the next load of the model replaces it
    # An unreadable container is not vouched for: none of its numbers are used.
    claim = dict(info.claim_bytes) if info.readable else {}
    gpu_keys = sorted(claim, key=lambda k: int(k[4:]))
    warnings = (unreadable_warning(name, info),) if not info.readable else ()
    if mismatch:
        warnings += (msg("deployment.settings_mismatch", f"{name} is not usable as it is ("
                         + "; ".join(mismatch) + "): it is not used; loading the model again replaces it",
                         container=name, problems=mismatch),)
    detail = {
        "container_id": c.id, "image": label_text(str((attrs.get("Config") or {}).get("Image") or "")),
        "docker_state": status, "health": health, "port": info.port, "gpu_util": info.gpu_util,
        "served_name": info.raw_served_name,  # the exact name vLLM serves (None unless plain text)
        "tool_parser": info.tool_parser,
        "tools_parsed": info.tool_parser is not None,
        "settings_mismatch": mismatch,
    }
    if not info.readable:
        detail["raw_labels"] = dict(info.raw)  # raw values only here, never in name/model_id
    return Deployment(
        backend_id=BACKEND_ID, handle=c.id, model_id=info.model_id or "(unknown)", profile=info.profile,
        state=state, memory_bytes=claim, endpoint=endpoint_for(settings, info.port),
        started_at=parse_docker_time(state_d.get("StartedAt")) or 0.0, name=name,
        device="cuda:" + ",".join(k[4:] for k in gpu_keys) if gpu_keys else "cuda", warnings=warnings,
        detail=detail)


def gone_report(handle: str) -> ReleaseReport:
    return ReleaseReport(BACKEND_ID, handle, "", "", 0, 0, 0, "docker", Outcome.SUCCESS,
                         msg("release.already_gone", f"container {handle} is already gone (nothing to stop)",
                             handle=handle))


def release_report(handle: str, name: str, info: LabelInfo, before: dict[str, int | None],
                   after: dict[str, int | None], seconds: float) -> ReleaseReport:
    """Freed = NVML used before − after on the claimed GPUs; when NVML says nothing, the claim
    (measure "docker": Docker removed the container, so its memory went with it)."""
    claim = dict(info.claim_bytes) if info.readable else {}  # an unreadable container's numbers are not used
    expected = sum(claim.values())
    keys = list(claim)
    measured = bool(keys) and all(before.get(k) is not None and after.get(k) is not None for k in keys)
    if measured:
        freed = sum(max(0, (before[k] or 0) - (after[k] or 0)) for k in keys)
        measure = "nvml_used"
    else:
        freed, measure = expected, "docker"
    still = max(0, expected - freed)
    model = info.model_id or "(unknown)"
    device = "cuda:" + ",".join(k[4:] for k in keys) if keys else "cuda"
    args = dict(container=name, model=model, freed_bytes=freed, expected_bytes=expected, still_held_bytes=still,
                seconds=round(seconds, 2), measure=measure)
    if still > expected * STILL_HELD_TOLERANCE:
        return ReleaseReport(BACKEND_ID, handle, model, device, expected, freed, still, measure, Outcome.WARNING,
                             msg("release.partial", f"{name} stopped and removed in {seconds:.1f} s, but only "
                                 f"{fmt_bytes(freed)} of {fmt_bytes(expected)} came back on the GPU", **args))
    return ReleaseReport(BACKEND_ID, handle, model, device, expected, freed, still, measure, Outcome.SUCCESS,
                         msg("release.freed", f"{name} stopped and removed in {seconds:.1f} s, "
                             f"{fmt_bytes(freed)} freed ({measure})", **args))


def wait_released(used: Callable[[], dict[str, int | None]], before: dict[str, int | None],
                  claim: dict[str, int]) -> dict[str, int | None]:
    """NVML used bytes after a stop, read again every RELEASE_POLL_S until 75% of the claim is
    back or RELEASE_WAIT_S pass (the driver frees a dead process's memory with a delay)."""
    after = used()
    keys = [k for k in claim if before.get(k) is not None]
    if not keys:
        return after
    deadline = time.monotonic() + RELEASE_WAIT_S
    while True:
        freed = sum(max(0, (before[k] or 0) - (after.get(k) or 0)) for k in keys)
        if freed >= 0.75 * sum(claim[k] for k in keys) or time.monotonic() >= deadline:
            return after
        time.sleep(RELEASE_POLL_S)
        after = used()
