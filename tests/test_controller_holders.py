"""Plans and the emergency clear count other holders of the GPU: a stand-in Ollama, foreign processes.

The fake NVML GPU is shared by the in-memory backend (its ledger) and the stand-in Ollama (its runners),
so what one frees the other's plan sees. Nothing foreign is ever stopped: the foreign process here is
this test's own parent, named by the plan and left alone.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from backends.ollama import create as ollama_backend
from memory_controller import MemoryController
from memory_controller.errors import MemctlError
from memory_controller.probe import DeviceProbe
from memory_controller.types import Outcome, Precision, Profile
from tests.fake_ollama import FakeOllama, FakeOllamaModel
from tests.fake_pynvml import GIB, FakeGpu, FakeNvml, FakeProcess
from tests.fixtures_models import TINY_ID
from tests.inmemory_backend import InMemoryBackend

MIB = 1024**2
PROFILE = Profile(mode="inmem", precision=Precision.FP16, context_tokens=1024, batch=1, device="cuda", gpu_ids=(0,))


def make(hf_settings, tmp_path, gpu, ollama_host: str) -> MemoryController:
    def ledger(key: str, delta: int) -> None:
        gpu.used_bytes += delta

    settings = hf_settings.model_copy(update={"state_dir": tmp_path / "state"}).with_backend_options("ollama",
                                                                                                   host=ollama_host)
    probe = DeviceProbe(FakeNvml([gpu]).module())
    # Ollama comes in as a configured backend does: its holder_client is what the plans ask
    return MemoryController(settings, probe=probe, backends={"inmem": InMemoryBackend(ledger=ledger),
                                                             "ollama": ollama_backend(settings, probe)})


@pytest.fixture
def runner_pid(tmp_path):
    """A real process whose command line reads ``ollama runner``: what the probe finds on a real machine."""
    script = tmp_path / "runner"
    script.write_text("sleep 120; :\n")
    proc = subprocess.Popen(["ollama", "runner"], executable="/bin/sh", cwd=tmp_path)
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def crowded(runner_pid):
    """24 GiB GPU: 300 MiB free while Ollama's runner holds gpt-oss:20b (13.1 GiB)."""
    gpu = FakeGpu(total_bytes=24 * GIB, used_bytes=24 * GIB - int(13.1 * GIB) - 300 * MIB)
    with FakeOllama([FakeOllamaModel("gpt-oss:20b", int(13.1 * GIB), gpu=gpu, runner_pid=runner_pid)],
                    unload_delay_s=0.1, memory_delay_s=0.2) as fake:
        yield gpu, fake


def test_a_plan_that_fits_only_with_ollamas_models_unloaded_offers_it_and_succeeds_after(hf_settings, tmp_path,
                                                                                         crowded):
    gpu, fake = crowded
    ctl = make(hf_settings, tmp_path, gpu, fake.host)
    plan = ctl.plan("inmem", TINY_ID, PROFILE)
    assert not plan.fits
    assert plan.holder_offer is not None and plan.holder_offer.code == "plan.unload_ollama"
    assert "gpt-oss:20b" in plan.holder_offer.text and "13.10 GiB" in plan.holder_offer.text
    assert any(n.code == "plan.held_by_others" and "13.10 GiB" in n.text for n in plan.notes)
    with pytest.raises(MemctlError):  # not ticked: refused, Ollama untouched
        ctl.apply(plan)
    assert [m["name"] for m in fake._ps()[1]["models"]] == ["gpt-oss:20b"]

    ticked = ctl.plan("inmem", TINY_ID, PROFILE, free_holders=True)
    assert ticked.fits and "unload_ollama" in ticked.step_names
    rec = ctl.apply(ticked)
    assert rec.outcome is Outcome.SUCCESS
    assert fake._ps()[1]["models"] == []
    assert [d.model_id for d in ctl.deployments()] == [TINY_ID]
    ctl.emergency_clear()


def test_a_plan_that_needs_a_foreign_process_stopped_names_it_and_refuses(hf_settings, tmp_path):
    foreign = os.getppid()  # a real process memctl did not start
    gpu = FakeGpu(total_bytes=24 * GIB, used_bytes=24 * GIB - 200 * MIB,
                  processes=[FakeProcess(pid=foreign, usedGpuMemory=20 * GIB)])
    with FakeOllama([]) as fake:
        ctl = make(hf_settings, tmp_path, gpu, fake.host)
        plan = ctl.plan("inmem", TINY_ID, PROFILE)
        blocker = next(b for b in plan.blockers if b.code == "plan.blocked_by_holder")
        assert f"PID {foreign}" in blocker.text and "never stops" in blocker.text
        with pytest.raises(MemctlError, match=f"PID {foreign}"):
            ctl.apply(plan)
        assert ctl.deployments() == []
        assert os.getppid() == foreign  # still there: never touched


def test_emergency_clear_frees_ollama_and_lists_every_remaining_holder(hf_settings, tmp_path, crowded):
    gpu, fake = crowded
    gpu.processes.append(FakeProcess(pid=os.getppid(), usedGpuMemory=2 * GIB))
    ctl = make(hf_settings, tmp_path, gpu, fake.host)
    report = ctl.emergency_clear()
    names = [s.name for s in report.steps]
    assert "unload_ollama" in names
    assert next(s for s in report.steps if s.name == "unload_ollama").outcome is Outcome.SUCCESS
    assert fake._ps()[1]["models"] == []
    assert report.outcome is Outcome.WARNING  # a foreign process still holds memory ...
    assert report.verdict is not None and f"PID {os.getppid()}" in report.verdict.text  # ... and is named
    (dev,) = report.remaining
    assert any(h.pid == os.getppid() for h in dev.holders)


@pytest.mark.parametrize("mode", ["refuse", "slow"])
def test_emergency_clear_with_ollama_refusing_or_slow_still_clears_memctls_own(hf_settings, tmp_path, crowded, mode):
    gpu, fake = crowded
    fake.fail["/api/generate"] = mode
    fake.slow_s = 30
    ctl = make(hf_settings, tmp_path, gpu, fake.host)
    gpu.used_bytes -= 1 * GIB  # room for the tiny model
    ctl.apply("inmem", TINY_ID, PROFILE)
    report = ctl.emergency_clear()
    by = {s.name: s for s in report.steps}
    assert by["stop_inmem"].outcome is Outcome.SUCCESS and TINY_ID in by["stop_inmem"].message
    assert by["unload_ollama"].outcome is Outcome.ERROR
    assert report.outcome is Outcome.WARNING
    assert ctl.deployments() == []


def test_emergency_clear_with_ollama_down_does_not_fail_on_it(hf_settings, tmp_path):
    gpu = FakeGpu(total_bytes=24 * GIB, used_bytes=1 * GIB)
    ctl = make(hf_settings, tmp_path, gpu, "127.0.0.1:9")  # nothing listens there
    report = ctl.emergency_clear()
    assert report.outcome is Outcome.SUCCESS, report.steps
    # issue 20.9: the clear promised Ollama's unload, so it says Ollama did not answer (not an error)
    line = next(s for s in report.steps if s.name == "unload_ollama")
    assert line.outcome is Outcome.SUCCESS and line.code == "emergency.ollama_silent", line
    assert "127.0.0.1:9" in line.message
    status = ctl.status()
    assert status["ollama"]["answered"] is False and status["ollama"]["error"]


def test_status_lists_every_holder_source_and_none_overwrites_a_core_key(hf_settings, tmp_path):
    """Each other holder's status is under ``holder_sources``; under its own id at the top level too, unless
    that id is one of the status's own keys."""
    from tests.test_holders import OtherServer

    class WithHolders(InMemoryBackend):
        holder_client = property(lambda self: OtherServer(source="devices", label="Odd"))

    class WithOther(InMemoryBackend):
        holder_client = property(lambda self: OtherServer())

    settings = hf_settings.model_copy(update={"state_dir": tmp_path / "state"})
    ctl = MemoryController(settings, probe=DeviceProbe(FakeNvml([FakeGpu(total_bytes=24 * GIB)]).module()),
                           backends={"a": WithHolders(), "b": WithOther()})
    status = ctl.status()
    assert isinstance(status["devices"], list) and status["devices"][0]["key"] == "gpu:0"
    assert set(status["holder_sources"]) == {"devices", "llamaswap"}
    assert status["holder_sources"]["llamaswap"]["models"][0]["name"] == "qwen-coder"
    assert status["llamaswap"] == status["holder_sources"]["llamaswap"]
