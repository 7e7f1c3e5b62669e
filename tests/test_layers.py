"""The layering rule cannot silently switch off: a forbidden import injected into each layer fails the lint.

Each case hands ruff a file's source on stdin under a real path of the tree (``--stdin-filename``), so
the folder's own ruff.toml applies exactly as it does to the committed file.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")

pytestmark = pytest.mark.skipif(RUFF is None, reason="ruff is not installed")


def lint(path: str, source: str) -> subprocess.CompletedProcess:
    return subprocess.run([RUFF, "check", "--no-cache", "--select", "TID251", "--stdin-filename", path, "-"],
                          input=source, text=True, capture_output=True, cwd=ROOT, timeout=60)


def with_import(path: str, statement: str) -> str:
    real = ROOT / path
    body = real.read_text() if real.is_file() else '"""probe file"""\n'
    return body + f"\n{statement}  # injected by the test\n"


FORBIDDEN = [
    # the core
    ("memory_controller/types.py", "import streamlit"),
    ("memory_controller/types.py", "import backends"),
    ("memory_controller/types.py", "import torch"),
    ("memory_controller/planning.py", "from backends.vllm import create"),
    ("memory_controller/controller.py", "import docker"),
    ("memory_controller/controller.py", "import pynvml"),
    ("memory_controller/controller.py", "import psutil"),
    ("memory_controller/runner.py", "import fastapi"),
    ("memory_controller/applying.py", "import pages.dashboard"),
    ("memory_controller/probe/devices.py", "import torch"),
    ("memory_controller/probe/devices.py", "import streamlit"),
    # UI pages and the entry scripts
    ("pages/dashboard.py", "import backends"),
    ("pages/dashboard.py", "import docker"),
    ("pages/dashboard.py", "import torch"),
    ("pages/dashboard.py", "import pynvml"),
    ("app.py", "from backends.transformers import create"),
    ("app.py", "import transformers"),
    ("test_memory_controller.py", "import docker"),
    ("test_memory_controller.py", "import psutil"),
    # each backend: neither the other backend nor its library
    ("backends/transformers/_injected.py", "import docker"),
    ("backends/transformers/_injected.py", "from backends.vllm import create"),
    ("backends/vllm/_injected.py", "import torch"),
    ("backends/vllm/_injected.py", "import bitsandbytes"),
    ("backends/vllm/_injected.py", "import backends.transformers"),
    # the Ollama client (a holder memctl may ask, not a backend)
    ("backends/ollama/_injected.py", "import docker"),
    ("backends/ollama/_injected.py", "import torch"),
    ("backends/ollama/_injected.py", "from backends.vllm import create"),
    # the command line (an entry layer)
    ("memctl_cli/main.py", "import torch"),
    ("memctl_cli/containers.py", "import docker"),
    ("memctl_cli/ollama.py", "from backends.ollama import create"),
    # the server
    ("server/_injected.py", "import torch"),
    ("server/_injected.py", "import backends"),
    ("server/_injected.py", "import docker"),
]

ALLOWED = [
    ("memory_controller/probe/devices.py", "import pynvml"),
    ("memory_controller/probe/processes.py", "import psutil"),
    ("memctl_cli/main.py", "import server.connect"),
    ("backends/transformers/_injected.py", "import torch"),
    ("backends/vllm/_injected.py", "import docker"),
    ("server/_injected.py", "import fastapi"),
    ("pages/dashboard.py", "import streamlit"),
    ("tests/_injected.py", "import torch"),
]


@pytest.mark.parametrize(("path", "statement"), FORBIDDEN)
def test_a_forbidden_import_fails_the_lint(path, statement):
    result = lint(path, with_import(path, statement))
    assert result.returncode != 0, f"{statement!r} in {path} passed the lint:\n{result.stdout}"
    assert "TID251" in result.stdout


@pytest.mark.parametrize(("path", "statement"), ALLOWED)
def test_the_owner_of_a_library_may_import_it(path, statement):
    result = lint(path, with_import(path, statement))
    assert result.returncode == 0, result.stdout


def test_the_committed_tree_passes_the_layer_rules():
    result = subprocess.run([RUFF, "check", "--no-cache", "--select", "TID251", "."], text=True,
                            capture_output=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout
