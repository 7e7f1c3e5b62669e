"""Build the fake vLLM image from Debian's busybox-static: no registry, no network.

The rootfs holds ``/bin/busybox`` with its applet links and ``/entrypoint.sh``; it is tarred and
imported with ``ENV PATH=/bin`` and ``ENTRYPOINT ["/entrypoint.sh"]`` (about 0.2 s).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

FAKE_IMAGE_REPO = "memctl-test/fake-vllm"
FAKE_IMAGE_TAG = "test"
ENTRYPOINT = Path(__file__).with_name("entrypoint.sh")
SERVE = Path(__file__).with_name("serve.sh")  # one HTTP request per connection (chat, completions, files)


def find_busybox() -> str | None:
    """Path of a statically linked busybox (busybox-static), or None."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    info.mtime = int(time.time())
    tar.addfile(info)


def build_rootfs_tar(dest: Path, busybox: str) -> Path:
    """Write the rootfs tarball to ``dest``; raise RuntimeError when busybox cannot list applets."""
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    with tarfile.open(dest, "w") as tar:
        for d in ("bin", "www", "tmp", "etc", "proc", "sys", "dev"):
            _add_dir(tar, d, 0o1777 if d == "tmp" else 0o755)
        tar.add(busybox, arcname="bin/busybox")
        for applet in applets:
            if applet == "busybox":
                continue
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
        for script in (ENTRYPOINT, SERVE):
            data = script.read_bytes()
            info = tarfile.TarInfo(script.name)
            info.size = len(data)
            info.mode = 0o755
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
        passwd = b"root:x:0:0:root:/root:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(passwd))
    return dest


# Tags of the fake image, each with the environment baked in that selects a behaviour
# (the backend passes no test-only environment, so tests choose behaviour by image tag).
FAKE_VARIANTS: dict[str, dict[str, str]] = {
    FAKE_IMAGE_TAG: {},
    "slow": {"FAKE_VLLM_START_DELAY_S": "2"},
    "oom": {"FAKE_VLLM_CRASH": "oom"},
    "kv": {"FAKE_VLLM_CRASH": "kv"},
    "maxlen": {"FAKE_VLLM_CRASH": "maxlen"},
    "never-ready": {"FAKE_VLLM_NEVER_READY": "1"},
    "slow-tokens": {"FAKE_VLLM_TOKEN_DELAY_S": "0.2"},
}


def build_fake_image(
    client,
    repo: str = FAKE_IMAGE_REPO,
    tag: str = FAKE_IMAGE_TAG,
    variants: dict[str, dict[str, str]] | None = None,
) -> str:
    """Import the fake image into the engine behind ``client`` (a docker.DockerClient); return ``repo:tag``.

    Every tag of ``variants`` (default FAKE_VARIANTS; ``tag`` is always built) is imported too,
    with its environment baked in. Raises RuntimeError when busybox-static is missing.
    """
    busybox = find_busybox()
    if busybox is None:
        raise RuntimeError("busybox not found: apt-get install -y busybox-static")
    wanted = dict(FAKE_VARIANTS if variants is None else variants)
    wanted.setdefault(tag, {})
    with tempfile.TemporaryDirectory(prefix="memctl-fake-vllm-") as tmp:
        tar_path = build_rootfs_tar(Path(tmp) / "rootfs.tar", busybox)
        for variant_tag, env in wanted.items():
            changes = ["ENV PATH=/bin", 'ENTRYPOINT ["/entrypoint.sh"]']
            changes += [f"ENV {k}={v}" for k, v in env.items()]
            client.api.import_image(src=str(tar_path), repository=repo, tag=variant_tag, changes=changes)
    return f"{repo}:{tag}"
