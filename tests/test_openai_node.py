"""The server under the `openai` npm package (the client Roo Code and Continue are built on), driven by
Node as Roo Code sends it: tests/node/roo_stream.cjs.

The package is installed once into ~/.cache/memctl-test-node (``MEMCTL_TEST_NODE_DIR`` overrides) with
npm; the test is skipped, with the reason, when node/npm or the package cannot be had.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures_models import TINY_ID
from tests.test_openai_api import base_settings, served  # noqa: F401 - the fixtures

NODE_SCRIPT = Path(__file__).with_name("node") / "roo_stream.cjs"
OPENAI_NPM_VERSION = "7.57.0"


def node_modules() -> Path:
    """A node_modules holding the openai package, or pytest.skip saying why not."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node or npm is not installed")
    base = Path(os.environ.get("MEMCTL_TEST_NODE_DIR", Path.home() / ".cache" / "memctl-test-node"))
    modules = base / "node_modules"
    if not (modules / "openai" / "package.json").exists():
        base.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent",
                               f"openai@{OPENAI_NPM_VERSION}"], cwd=base, capture_output=True, text=True,
                              timeout=300, check=False)
        if proc.returncode != 0 or not (modules / "openai").exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            pytest.skip(f"npm could not install openai@{OPENAI_NPM_VERSION}: {' | '.join(tail)}")
    return modules


def test_roo_code_style_streamed_chat_with_tools_from_node(served):  # noqa: F811
    modules = node_modules()
    served.ctl.ensure_deployment(TINY_ID)
    env = {**os.environ, "NODE_PATH": str(modules)}
    proc = subprocess.run(["node", str(NODE_SCRIPT), served.base_url, TINY_ID], capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    first, second = out["first"], out["second"]
    assert first["finish"] == ["tool_calls"]
    call = first["calls"]["0"]
    assert call["name"] == "read_file" and json.loads(call["arguments"]) == {"path": "src/app.ts"}
    assert call["id"]
    assert first["usage"]["prompt_tokens"] > 0
    assert "<tool_call>" not in first["text"]
    assert second["text"] == "echo: thanks" and second["finish"] == ["stop"]
    assert second["usage"]["completion_tokens"] == 2
    assert TINY_ID in out["models"]
