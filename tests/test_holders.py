"""Who holds the GPU: classification tables, the plan's view of other holders, what an emergency clear
reports afterwards, the process probe on real processes, and the stand-in Ollama end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from backends.ollama import HolderView
from memory_controller.holders import (
    MemoryHolder,
    OtherHolder,
    ProcessInfo,
    classify,
    fit_with_holders,
    held_by_others,
    holder_rows,
    remaining_by_device,
    short_command,
)
from memory_controller.probe import DeviceProbe
from memory_controller.probe.processes import looks_like_memctl, process_info
from tests.fake_pynvml import FakeGpu, FakeNvml, FakeProcess

GIB = 1024**3
ME = 1000
GONE = 4_194_000  # a PID no process has here


@dataclass(frozen=True)
class Container:  # the shape of backends/vllm's ContainerHolder
    container_id: str
    name: str
    image: str
    managed: bool
    model_id: str | None


@dataclass(frozen=True)
class Dep:  # the fields classify reads from a Deployment
    model_id: str
    memory_bytes: dict


@dataclass(frozen=True)
class OModel:
    name: str
    size_vram: int


OLLAMA = HolderView(SimpleNamespace(base_url="http://127.0.0.1:11434", last_error=None))


def ollama(models):
    """The ``ollama`` backend's holder source as a census sees it (``models`` None: it did not answer)."""
    return [OtherHolder(OLLAMA, None if models is None else tuple(models))]


def snapshot(*gpus: FakeGpu):
    return DeviceProbe(FakeNvml(list(gpus)).module()).snapshot()


def P(pid, *argv, user="alice", name=None, memctl=False):  # noqa: N802
    return ProcessInfo(pid=pid, name=name or (os.path.basename(argv[0]) if argv else None), argv=tuple(argv),
                       user=user, is_self=pid == ME, is_memctl=memctl)


PROCS = {
    ME: P(ME, "python", "-m", "streamlit", "run", "app.py"),
    11: P(11, "python3", "-m", "vllm.entrypoints.openai.api_server", user="root"),
    12: P(12, "python", "train.py", user="root"),
    13: P(13, "/usr/local/bin/ollama", "serve", user="ollama"),
    14: P(14, "/usr/local/bin/ollama", "runner", "--ollama-engine", "--model", "/blobs/sha256-1", user="ollama"),
    15: P(15, "/usr/bin/python3", "/usr/local/bin/memctl", "serve", memctl=True),
    16: P(16, "/usr/lib/xorg/Xorg", "vt2", "-displayfd", "3", user="gdm", name="Xorg"),
    17: P(17, "python", "finetune.py", "--lr", "3e-4", user="bob"),
    19: P(19, "/usr/bin/gnome-shell", user="alice"),
}
CONTAINERS = {
    11: Container("a" * 64, "memctl-vllm-qwen", "vllm/vllm-openai:v0.33.0", True, "Qwen/Qwen2.5-7B"),
    12: Container("b" * 64, "trainer", "pytorch/pytorch:2.5", False, None),
}
GPU_PROCS = [(ME, 2 * GIB), (11, 20 * GIB), (12, 3 * GIB), (13, 300 * 1024**2), (14, 13 * GIB), (15, GIB),
             (16, 200 * 1024**2), (17, 2 * GIB), (GONE, GIB), (19, None)]


def full_gpu():
    return FakeGpu(total_bytes=80 * GIB, used_bytes=44 * GIB,
                   processes=[FakeProcess(pid, used) for pid, used in GPU_PROCS])


def holders_of(models=(OModel("gpt-oss:20b", int(13.1 * GIB)),), procs=PROCS):
    own = [Dep("org/tiny", {"gpu:0": 2 * GIB}), Dep("org/on-cpu", {"host": GIB})]
    return {h.pid: h for h in classify(snapshot(full_gpu()), procs, CONTAINERS, ollama(models), own, ME)}


@pytest.mark.parametrize(("pid", "kind", "name", "freeable", "models"), [
    (ME, "memctl_self", "memctl (this process)", "memctl", ("org/tiny",)),
    (11, "managed_container", "memctl-vllm-qwen", "memctl", ("Qwen/Qwen2.5-7B",)),
    (12, "foreign_container", "container trainer", None, ()),
    (13, "ollama_server", "Ollama server", None, ()),
    (14, "ollama_runner", "Ollama runner", "ollama", ("gpt-oss:20b",)),
    (15, "memctl_other", "another memctl", None, ()),
    (16, "desktop", "Xorg vt2 -displayfd 3", None, ()),
    (17, "process", "python finetune.py --lr 3e-4", None, ()),
    (GONE, "process", f"PID {GONE}", None, ()),
    (19, "desktop", "gnome-shell", None, ()),
])
def test_every_kind_of_holder_is_named(pid, kind, name, freeable, models):
    h = holders_of()[pid]
    assert (h.kind, h.name, h.freeable_by, h.models) == (kind, name, freeable, models)
    assert h.device_key == "gpu:0"
    assert h.advice is not None and h.advice.code.startswith("holder.advice.")


def test_bytes_user_and_details_come_through():
    hs = holders_of()
    assert hs[11].bytes == 20 * GIB and hs[14].bytes == 13 * GIB
    assert hs[19].bytes is None  # NVML NotSupported: unknown, not zero
    assert hs[17].user == "bob" and hs[16].user == "gdm"
    assert "pytorch/pytorch:2.5" in hs[12].detail and "train.py" in hs[12].detail
    assert "not visible" in hs[GONE].detail
    assert hs[14].detail == "gpt-oss:20b"


def test_ollama_not_answering_leaves_its_runner_named_but_not_freeable():
    h = holders_of(models=None)[14]
    assert h.kind == "ollama_runner" and h.freeable_by is None
    assert h.advice.code == "holder.advice.ollama_down" and h.detail == "Ollama does not answer"


def test_two_runners_are_paired_with_models_by_size():
    procs = {1: P(1, "ollama", "runner", "--model", "x"), 2: P(2, "ollama", "runner", "--model", "y")}
    gpu = FakeGpu(processes=[FakeProcess(1, 4 * GIB), FakeProcess(2, 13 * GIB)])
    hs = classify(snapshot(gpu), procs, {}, ollama([OModel("codellama:7b", 4 * GIB), OModel("gpt-oss:20b", 13 * GIB)]),
                  [], ME)
    assert {h.pid: h.models for h in hs} == {1: ("codellama:7b",), 2: ("gpt-oss:20b",)}


def test_an_ollama_runner_in_a_container_is_still_ollamas():
    procs = {5: P(5, "/bin/ollama", "runner", "--model", "/root/.ollama/blobs/x", user="root")}
    (h,) = classify(snapshot(FakeGpu(processes=[FakeProcess(5, GIB)])), procs,
                    {5: Container("c" * 64, "ollama", "ollama/ollama", False, None)}, ollama([OModel("llama3:8b", GIB)]), [], ME)
    assert h.kind == "ollama_runner" and h.freeable_by == "ollama" and "in container ollama" in h.name


def test_names_are_escaped_and_shortened():
    argv = ["/opt/bin/evil\x1b[2J", "--x=" + "y" * 500, "\u2028"]
    assert "\x1b" not in short_command(argv) and short_command(argv).startswith("evil\\x1b[2J --x=")  # an escape, not the byte
    assert len(short_command(argv)) == 120 and short_command(argv).endswith("…")
    procs = {7: P(7, *argv)}
    (h,) = classify(snapshot(FakeGpu(processes=[FakeProcess(7, GIB)])), procs,
                    {7: Container("d" * 64, "bad\nname", "img\x07", False, None)}, [], [], ME)
    assert "\n" not in h.name and "bad\\" in h.name  # shown as an escape (\\n or \\x0a)
    assert "\x07" not in h.detail and "img\\" in h.detail


def test_each_gpu_gets_its_own_rows():
    g0 = FakeGpu(uuid="GPU-a", processes=[FakeProcess(17, GIB)])
    g1 = FakeGpu(uuid="GPU-b", processes=[FakeProcess(17, 3 * GIB), FakeProcess(ME, GIB)])
    hs = classify(snapshot(g0, g1), PROCS, {}, [], [], ME)
    assert [(h.device_key, h.pid, h.bytes) for h in hs] == [("gpu:0", 17, GIB), ("gpu:1", 17, 3 * GIB),
                                                           ("gpu:1", ME, GIB)]
    assert held_by_others(hs, "gpu:1") == 3 * GIB and held_by_others(hs, "gpu:0") == GIB


def test_held_by_others_leaves_out_memctl_and_its_containers():
    hs = list(holders_of().values())
    # 3 + 0.3 + 13 + 1 + 0.2 + 2 + 1 GiB (+ unknown = 0); not memctl's 2 nor its container's 20
    assert held_by_others(hs, "gpu:0") == 3 * GIB + 300 * 1024**2 + 13 * GIB + GIB + 200 * 1024**2 + 2 * GIB + GIB
    assert held_by_others(hs, "gpu:1") == 0


def test_rows_are_json_ready():
    rows = {r["pid"]: r for r in holder_rows(list(holders_of().values()))}
    assert rows[ME]["kind"] == "memctl_self" and rows[ME]["models"] == ["org/tiny"]
    assert rows[14]["advice_code"] == "holder.advice.ollama_runner" and rows[19]["bytes"] is None
    rows = list(rows.values())
    assert {r["kind"] for r in rows} >= {"ollama_runner", "foreign_container", "desktop"}


# --------------------------------------------------------------------------- the plan's view
def _h(pid, kind, nbytes, freeable=None, models=(), name=None):
    return MemoryHolder("gpu:0", pid, nbytes, kind, name or f"proc{pid}", freeable_by=freeable, models=models)


def test_fits_already_only_notes_who_holds_what():
    fit = fit_with_holders([_h(1, "process", GIB)], "gpu:0", shortfall_bytes=-5)
    assert not fit.blockers and fit.step is None and fit.others_bytes == GIB
    assert fit.notes[0].code == "plan.held_by_others" and "proc1 1.00 GiB" in fit.notes[0].text


def test_fits_only_with_ollama_unloaded_offers_the_step():
    hs = [_h(1, "ollama_runner", int(13.1 * GIB), "ollama", ("gpt-oss:20b",), "Ollama runner"),
          _h(2, "ollama_runner", 4 * GIB, "ollama", ("codellama:7b",), "Ollama runner"),
          _h(3, "desktop", GIB)]
    fit = fit_with_holders(hs, "gpu:0", shortfall_bytes=10 * GIB, others=ollama([OModel("gpt-oss:20b", int(13.1 * GIB))]))
    assert fit.fits_if_freed and fit.models == ("gpt-oss:20b",) and not fit.blockers and fit.source == "ollama"
    assert fit.step.code == "plan.unload_ollama" and fit.step.text == "also unload from Ollama: gpt-oss:20b, 13.10 GiB"
    assert fit.step.args == {"models": ["gpt-oss:20b"], "names": "gpt-oss:20b", "bytes": int(13.1 * GIB),
                             "size": "13.10 GiB"}
    # 15 GiB short: both Ollama models
    fit = fit_with_holders(hs, "gpu:0", shortfall_bytes=15 * GIB, others=ollama([]))
    assert fit.models == ("gpt-oss:20b", "codellama:7b")


def test_fits_only_if_a_foreign_process_stopped_is_a_blocker_naming_it():
    hs = [_h(1, "ollama_runner", 2 * GIB, "ollama", ("codellama:7b",)),
          _h(7, "process", 6 * GIB, name="python finetune.py"), _h(8, "foreign_container", GIB)]
    fit = fit_with_holders(hs, "gpu:0", shortfall_bytes=5 * GIB, others=ollama([]))
    assert not fit.fits_if_freed and [h.pid for h in fit.blocking] == [7]
    (b,) = fit.blockers
    assert b.code == "plan.blocked_by_holder" and "python finetune.py (PID 7, 6.00 GiB)" in b.text
    assert "never stops" in b.text and "and the models of Ollama were unloaded" in b.text and b.args["with_holders"]


def test_too_big_even_if_everything_stopped_adds_no_blocker():
    fit = fit_with_holders([_h(7, "process", GIB)], "gpu:0", shortfall_bytes=5 * GIB)
    assert not fit.blockers and not fit.fits_if_freed


def test_memctls_own_holders_never_count_as_others():
    hs = [_h(ME, "memctl_self", 10 * GIB, "memctl"), _h(11, "managed_container", 10 * GIB, "memctl")]
    fit = fit_with_holders(hs, "gpu:0", shortfall_bytes=GIB)
    assert fit.others_bytes == 0 and not fit.notes and not fit.blockers


# --------------------------------------------------------------------------- after an emergency clear
def test_remaining_lists_every_holder_per_gpu_with_advice_and_unattributed_memory():
    g0 = FakeGpu(total_bytes=24 * GIB, used_bytes=6 * GIB, processes=[FakeProcess(17, 2 * GIB), FakeProcess(16, GIB)])
    g1 = FakeGpu(total_bytes=24 * GIB, used_bytes=3 * GIB, uuid="GPU-b")
    snap = snapshot(g0, g1)
    report = remaining_by_device(snap, classify(snap, PROCS, {}, [], [], ME))
    assert [d.device_key for d in report] == ["gpu:0", "gpu:1"]
    d0, d1 = report
    assert [h.pid for h in d0.holders] == [17, 16] and d0.unattributed_bytes == 3 * GIB
    assert [a.code for a in d0.advice] == ["holder.advice.process", "holder.advice.desktop"]
    assert d1.holders == () and d1.unattributed_bytes == 3 * GIB
    assert [a.code for a in d1.advice] == ["holder.advice.unattributed"]


# --------------------------------------------------------------------------- the process probe (real processes)
def test_process_info_reads_real_processes():
    child = subprocess.Popen(["memctl", "-c", "import time; time.sleep(30)", "serve"], executable=sys.executable)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        info = process_info([os.getpid(), child.pid, other.pid, gone.pid, -1])
        assert set(info) == {os.getpid(), child.pid, other.pid}
        assert info[os.getpid()].is_self and not info[os.getpid()].is_memctl
        assert info[child.pid].is_memctl and info[child.pid].argv[0] == "memctl"
        assert not info[other.pid].is_memctl and info[other.pid].user
        assert process_info([other.pid], memctl_pids=[other.pid])[other.pid].is_memctl
    finally:
        for p in (child, other):
            p.kill()
            p.wait()


@pytest.mark.parametrize(("argv", "yes"), [
    (["/usr/bin/python3", "/home/a/.local/bin/memctl", "status"], True),
    (["python", "-m", "memctl_cli", "status"], True),
    (["python", "-m", "streamlit", "run", "app.py"], None),  # decided by the cwd
    (["python", "-m", "streamlit", "run", "other/app.py"], False),
    (["python", "train.py"], False),
])
def test_memctl_command_lines(argv, yes):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if yes is None:
        assert looks_like_memctl(argv, cwd=root) and not looks_like_memctl(argv, cwd="/tmp")
    else:
        assert looks_like_memctl(argv, cwd="/tmp") is yes


# --------------------------------------------------------------------------- end to end with the stand-in Ollama
def test_a_plan_short_of_memory_fits_once_ollama_unloads_its_model():
    from backends.ollama import OllamaClient, gpu_free_reader, parse_host
    from tests.fake_ollama import FakeOllama, FakeOllamaModel

    gpu = FakeGpu(total_bytes=24 * GIB, used_bytes=2 * GIB, processes=[])
    probe = DeviceProbe(FakeNvml([gpu]).module())
    procs = {4242: P(4242, "/usr/local/bin/ollama", "runner", "--model", "/blobs/x", user="ollama")}
    with FakeOllama([FakeOllamaModel("gpt-oss:20b", int(13.1 * GIB), gpu=gpu, runner_pid=4242)]) as fake:
        client = OllamaClient(parse_host(fake.host), free_bytes=gpu_free_reader(probe))
        snap = probe.snapshot()
        needed = 16 * GIB
        hs = classify(snap, procs, {}, ollama(client.ps()), [], ME)
        fit = fit_with_holders(hs, "gpu:0", needed - snap.gpus[0].free_bytes, ollama(client.ps()))
        assert fit.fits_if_freed and fit.models == ("gpt-oss:20b",)
        for name in fit.models:
            assert client.unload(name, wait_s=5).gone
        snap = probe.snapshot()
        assert snap.gpus[0].free_bytes >= needed
        hs = classify(snap, procs, {}, ollama(client.ps()), [], ME)
        assert hs == [] and not fit_with_holders(hs, "gpu:0", needed - snap.gpus[0].free_bytes).blockers


def test_emergency_verdict_never_says_all_free_while_another_memctl_holds_memory():
    from memory_controller.holders import after_emergency
    from memory_controller.types import Outcome

    g = FakeGpu(total_bytes=24 * GIB, used_bytes=int(1.7 * GIB),
                processes=[FakeProcess(15, int(1.2 * GIB)), FakeProcess(16, GIB // 2)])
    snap = snapshot(g)
    outcome, message = after_emergency(remaining_by_device(snap, classify(snap, PROCS, {}, [], [], ME)))
    assert outcome is Outcome.WARNING and message.code == "emergency.still_held"
    assert "another memctl (PID 15, alice) 1.20 GiB" in message.text and "Xorg" in message.text
    # only the desktop and this process's bare CUDA context left: a success that still names them
    g = FakeGpu(total_bytes=24 * GIB, used_bytes=GIB, processes=[FakeProcess(ME, GIB // 2), FakeProcess(16, GIB // 2)])
    snap = snapshot(g)
    outcome, message = after_emergency(remaining_by_device(snap, classify(snap, PROCS, {}, [], [], ME)))
    assert outcome is Outcome.SUCCESS and "Xorg" in message.text and "memctl (this process)" in message.text
    # nothing at all
    snap = snapshot(FakeGpu(used_bytes=0))
    assert after_emergency(remaining_by_device(snap, []))[1].code == "emergency.all_free"
    # memory no process is reported for is not "all free"
    snap = snapshot(FakeGpu(used_bytes=3 * GIB))
    outcome, message = after_emergency(remaining_by_device(snap, []))
    assert outcome is Outcome.WARNING and "unattributed 3.00 GiB" in message.text


# --------------------------------------------------------------------------- any holder source, not only Ollama
@dataclass
class OtherServer:
    """A made-up holder source: the core knows it only through the HolderSource members."""

    source: str = "llamaswap"
    label: str = "llama-swap"
    base_url: str = "http://127.0.0.1:9292"
    unloads_in_emergency: bool = True
    last_error: object = None

    @staticmethod
    def role(argv, name):
        prog = os.path.basename(argv[0]) if argv else (name or "")
        return {"llama-swap": "server", "llama-server": "runner"}.get(prog)

    @staticmethod
    def advice(kind):
        return {"runner": "llama-swap model {models}: unload it", "down": "llama-swap is down",
                "server": "llama-swap itself"}[kind]

    @staticmethod
    def loaded(max_age_s=5.0):
        return [OModel("qwen-coder", 9 * GIB)]


def test_any_holder_source_names_its_processes_and_is_offered_in_a_plan():
    src = OtherServer()
    procs = {21: P(21, "/opt/llama-swap", "--config", "x.yaml"), 22: P(22, "/opt/llama-server", "-m", "q.gguf"),
             14: PROCS[14]}
    gpu = FakeGpu(total_bytes=24 * GIB, processes=[FakeProcess(21, GIB // 4), FakeProcess(22, 9 * GIB),
                                                   FakeProcess(14, 5 * GIB)])
    others = [OtherHolder(src, (OModel("qwen-coder", 9 * GIB),)), *ollama([OModel("gpt-oss:20b", 5 * GIB)])]
    hs = {h.pid: h for h in classify(snapshot(gpu), procs, {}, others, [], ME)}
    assert (hs[21].kind, hs[21].role, hs[21].name, hs[21].freeable_by) == ("llamaswap_server", "server", "llama-swap server", None)
    assert (hs[22].kind, hs[22].freeable_by, hs[22].models) == ("llamaswap_runner", "llamaswap", ("qwen-coder",))
    assert hs[22].advice.code == "holder.advice.llamaswap_runner" and hs[22].advice.text == "llama-swap model qwen-coder: unload it"
    assert (hs[14].kind, hs[14].freeable_by) == ("ollama_runner", "ollama")  # each source names its own
    fit = fit_with_holders(list(hs.values()), "gpu:0", 8 * GIB, others)
    assert fit.source == "llamaswap" and fit.models == ("qwen-coder",) and fit.freed_bytes == 9 * GIB
    assert fit.step.code == "plan.unload_llamaswap" and fit.step.text.startswith("also unload from llama-swap: qwen-coder")
    # its idle server is expected to stay after an emergency clear, as the desktop is
    from memory_controller.holders import after_emergency
    from memory_controller.types import Outcome

    snap = snapshot(FakeGpu(total_bytes=24 * GIB, used_bytes=GIB // 4, processes=[FakeProcess(21, GIB // 4)]))
    assert after_emergency(remaining_by_device(snap, classify(snap, procs, {}, others, [], ME)))[0] is Outcome.SUCCESS
