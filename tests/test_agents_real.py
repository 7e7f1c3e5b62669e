"""The real-client tier (``pytest -m agents``): the coding agents' own CLIs — Continue's ``cn`` 1.5.47 and Kilo
Code's ``kilo`` 7.7.7, installed by ``scripts/agent-clis.sh`` into ``.cache/agent-clis`` — run one
non-interactive task each against ``memctl serve`` (a real owner process on the Transformers backend, CPU)
with tiny offline chat models (random weights, a real Qwen-style template that renders tools), using the
configs ``memctl ide continue`` and ``memctl ide kilo`` print.

* ``cn`` with a model served at 32,768 tokens: its first request (system prompt and tools) is admitted, the
  model is loaded on demand, and the stream completes: ``cn`` prints the answer and exits 0.
* ``cn`` with a deterministic model (real weights and template; its generation config biases it to call
  Continue's ``Read`` tool, then to answer once the tool result is in its context): a full tool round trip —
  memctl parses the call, ``cn`` reads the file and asks again, the answer comes back.
* ``kilo`` with a model served at 2,048 tokens: Kilo's first request (~37,000 tokens with this tiny tokenizer)
  is over the context: a plain 400 ``context_length_exceeded`` before anything loads, which Kilo prints as the
  server's message (and compacts, asking again smaller); the model is never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import closing
from pathlib import Path

import pytest

from memory_controller.settings import load_settings
from server.connect import controller_for
from tests import model_factory as mf
from tests.conftest import ROOT
from tests.model_factory import hf_env
from tests.test_owner import OWNER_SCRIPT, _env, start_owner, stop, wait_published

pytestmark = [pytest.mark.agents, pytest.mark.slow]

CLIS = ROOT / ".cache" / "agent-clis" / "node_modules" / ".bin"
LONG = f"{mf.TEST_ORG}/tiny-qwen-long"  # served at 32,768 tokens
SHORT = f"{mf.TEST_ORG}/tiny-qwen-short"  # served at 2,048 tokens
TOOLS_MODEL = f"{mf.TEST_ORG}/tiny-qwen-tools"  # deterministic: a Read tool call, then an answer
CN_CALL = '<tool_call>\n{"name": "Read", "arguments": {"filepath": "README.md"}}\n</tool_call>'
CN_ANSWER = "The file says hello."


def _clis() -> Path:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the real-client tier needs Node.js and npm")
    if not ((CLIS / "cn").exists() and (CLIS / "kilo").exists()):
        subprocess.run(["bash", str(ROOT / "scripts" / "agent-clis.sh")], check=False, timeout=300)
    if not ((CLIS / "cn").exists() and (CLIS / "kilo").exists()):
        pytest.fail("scripts/agent-clis.sh did not install cn and kilo (is the npm registry reachable?)")
    return CLIS


@pytest.fixture(scope="module")
def agent_hub(tmp_path_factory) -> Path:
    hub = tmp_path_factory.mktemp("hf_agents") / "hub"
    for name, max_pos, seed in (("tiny-qwen-long", 32768, 40), ("tiny-qwen-short", 2048, 41)):
        with tempfile.TemporaryDirectory(dir=hub.parent) as tmp:
            mf.build_chat_model(Path(tmp), "qwen", seed=seed, max_position_embeddings=max_pos)
            mf.add_to_hf_cache(Path(tmp), hub, f"{mf.TEST_ORG}/{name}")
    with tempfile.TemporaryDirectory(dir=hub.parent) as tmp:
        mf.build_tool_model(Path(tmp), call_text=CN_CALL, answer_text=CN_ANSWER)
        mf.add_to_hf_cache(Path(tmp), hub, TOOLS_MODEL)
    return hub


@pytest.fixture
def owner(agent_hub, tmp_path, monkeypatch):
    """``memctl serve`` in its own process, on the default backends (Transformers on the CPU here)."""
    for key, value in hf_env(agent_hub).items():
        monkeypatch.setenv(key, value)
    proc = start_owner(tmp_path, **hf_env(agent_hub))
    try:
        yield wait_published(load_settings(), proc)
    finally:
        stop(proc)


def memctl(tmp_path: Path, hub: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", OWNER_SCRIPT, *args], cwd=ROOT, env=_env(tmp_path, **hf_env(hub)),
                          capture_output=True, text=True, timeout=120)


def agent_env(home: Path, cwd: Path) -> dict[str, str]:
    """A clean HOME (the agents keep their state there; it must exist), no inherited API settings, and PWD =
    the folder it runs in (kilo takes its project, hence ./kilo.json, from PWD)."""
    for sub in ("", ".config", ".local"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMCTL_", "OPENAI_", "ANTHROPIC_"))}
    env.update({"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "XDG_DATA_HOME": str(home / ".local"),
                "NO_COLOR": "1", "CI": "1", "PWD": str(cwd)})
    return env


def test_continue_cli_runs_a_task_with_the_config_memctl_prints(owner, agent_hub, tmp_path):
    clis = _clis()
    cfg = memctl(tmp_path, agent_hub, "ide", "continue", "--model", LONG)
    assert cfg.returncode == 0, cfg.stderr
    assert "capabilities:\n      - tool_use" in cfg.stdout  # the template renders tools and they are parsed
    (tmp_path / "config.yaml").write_text(cfg.stdout)
    work = tmp_path / "project"
    work.mkdir()
    run = subprocess.run([str(clis / "cn"), "--config", str(tmp_path / "config.yaml"), "-p", "Say hi"],
                         cwd=work, env=agent_env(tmp_path / "home", work), capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.strip()  # the streamed answer (random weights: any text) reached the client

    with closing(controller_for(load_settings())) as client:  # what reached the server: the model loaded on demand
        assert [d.model_id for d in client.deployments()] == [LONG]
        loads = [r for r in client.history(20) if r.kind == "apply" and r.params.get("model") == LONG]
        assert loads and loads[0].params.get("on_demand") is True
    ps = json.loads(memctl(tmp_path, agent_hub, "ps", "--json").stdout)
    assert ps["models"][0]["model"] == LONG and ps["models"][0]["in_flight"] == 0


def test_kilo_cli_shows_the_servers_400_for_an_over_context_request_and_nothing_loads(owner, agent_hub, tmp_path):
    clis = _clis()
    work = tmp_path / "project"
    work.mkdir()
    cfg = memctl(tmp_path, agent_hub, "ide", "kilo", "--model", SHORT)
    assert cfg.returncode == 0, cfg.stderr
    kilo_json = json.loads(cfg.stdout)
    assert kilo_json["provider"]["memctl"]["models"][SHORT]["limit"]["context"] == 2048
    (work / "kilo.json").write_text(cfg.stdout)
    run = subprocess.run([str(clis / "kilo"), "run", "-m", f"memctl/{SHORT}", "Say hi"], cwd=work,
                         env=agent_env(tmp_path / "home", work), capture_output=True, text=True, timeout=150)
    printed = run.stdout + run.stderr
    assert "is served with a context of 2048 tokens" in printed, printed[-3000:]  # the server's own message
    with closing(controller_for(load_settings())) as client:
        assert client.deployments() == []  # refused before loading: nothing loaded, nothing evicted
        assert not [r for r in client.history(20) if r.kind == "apply"]


def test_continue_cli_completes_a_tool_round_trip(owner, agent_hub, tmp_path):
    clis = _clis()
    cfg = memctl(tmp_path, agent_hub, "ide", "continue", "--model", TOOLS_MODEL)
    assert cfg.returncode == 0, cfg.stderr
    (tmp_path / "config.yaml").write_text(cfg.stdout)
    work = tmp_path / "project"
    work.mkdir()
    (work / "README.md").write_text("hello\n")
    run = subprocess.run([str(clis / "cn"), "--config", str(tmp_path / "config.yaml"), "-p",
                          "Read README.md and tell me what it says"], cwd=work, env=agent_env(tmp_path / "home", work),
                         capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    # the answer is only generated once the tool's result is in the model's context: the call was parsed by
    # memctl, executed by cn, and its result sent back
    assert CN_ANSWER in run.stdout, run.stdout[-2000:]
    assert "<tool_call>" not in run.stdout
