"""A private Docker engine for the tests and the bench (scripts/dockerd.sh in a temp dir).

``MEMCTL_TEST_DOCKER_HOST`` (exported by scripts/test.sh) wins; otherwise a daemon of our own
is started and stopped again. Nothing here touches the machine's default engine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DOCKERD_SCRIPT = PROJECT_ROOT / "scripts" / "dockerd.sh"
ENV_VAR = "MEMCTL_TEST_DOCKER_HOST"


@dataclass
class PrivateEngine:
    """A Docker host URL; ``workdir`` is set when we started the daemon ourselves."""

    docker_host: str
    workdir: Path | None = None
    notes: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """Stop the daemon we started (no-op for one given through the environment)."""
        if self.workdir is not None:
            subprocess.run(["bash", str(DOCKERD_SCRIPT), "stop", str(self.workdir)], check=False,
                           capture_output=True, timeout=60)
            self.workdir = None


def ping(docker_host: str, timeout_s: float = 5.0) -> str | None:
    """None when an engine answers at ``docker_host``; else why not, in plain words."""
    import docker

    try:
        client = docker.DockerClient(base_url=docker_host, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - any failure means "no engine"
        return f"{type(exc).__name__}: {exc}"
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


def start_engine() -> PrivateEngine:
    """Use ``$MEMCTL_TEST_DOCKER_HOST`` or start a private dockerd; raise RuntimeError saying why not."""
    notes: list[str] = []
    env_host = os.environ.get(ENV_VAR)
    if env_host:
        problem = ping(env_host)
        if problem is None:
            return PrivateEngine(env_host)
        notes.append(f"{ENV_VAR}={env_host} does not answer ({problem})")
    if shutil.which("dockerd") is None:
        raise RuntimeError("; ".join([*notes, "dockerd not installed (apt-get install -y docker.io)"]))
    if os.geteuid() != 0:
        raise RuntimeError("; ".join([*notes, "a private dockerd needs root"]))
    # Short path: the unix socket path must stay under 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="memctl-dd.", dir="/tmp"))
    proc = subprocess.run(["bash", str(DOCKERD_SCRIPT), "start", str(workdir)], capture_output=True,
                          text=True, timeout=120, check=False)
    if proc.returncode != 0:
        subprocess.run(["bash", str(DOCKERD_SCRIPT), "stop", str(workdir)], capture_output=True, check=False)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError("; ".join([*notes, "scripts/dockerd.sh start failed: " + " | ".join(tail)]))
    host = proc.stdout.strip().splitlines()[-1]
    return PrivateEngine(host, workdir, notes)


_shared: PrivateEngine | None = None
_shared_error: str | None = None


def shared_engine() -> PrivateEngine:
    """One engine per process, however many test modules import the fixtures; stopped at exit.

    Raises RuntimeError (remembered: later calls fail fast with the same reason).
    """
    global _shared, _shared_error
    if _shared is not None:
        return _shared
    if _shared_error is not None:
        raise RuntimeError(_shared_error)
    try:
        _shared = start_engine()
    except RuntimeError as exc:
        _shared_error = str(exc)
        raise
    import atexit

    atexit.register(_shared.stop)
    return _shared
