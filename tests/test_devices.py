"""The device probe against the fake NVML: every failure becomes a status, never an exception."""

from __future__ import annotations

import os

import pytest

from memory_controller.probe.devices import DeviceProbe
from memory_controller.types import DeviceKind, DeviceStatus, NvmlStatus
from tests.fake_pynvml import GIB, FakeGpu, FakeNvml, FakeProcess, scenario


def probe_for(name_or_fake) -> tuple[DeviceProbe, FakeNvml]:
    fake = scenario(name_or_fake) if isinstance(name_or_fake, str) else name_or_fake
    return DeviceProbe(fake.module()), fake


def test_one_gpu_reports_memory_utilisation_and_processes():
    probe, _ = probe_for("one_gpu")
    snap = probe.snapshot()
    assert snap.nvml_status is NvmlStatus.OK
    assert snap.driver_version == "580.95.05"
    (gpu,) = snap.gpus
    assert gpu.kind is DeviceKind.GPU and gpu.key == "gpu:0"
    assert gpu.total_bytes == 24 * GIB and gpu.used_bytes == 2 * GIB and gpu.free_bytes == 22 * GIB
    assert gpu.utilization_pct == 7.0
    assert gpu.status is DeviceStatus.OK and gpu.hint is None
    assert [p.pid for p in gpu.processes] == [os.getpid()]
    assert gpu.processes[0].used_bytes == 1 * GIB
    assert gpu.processes[0].name  # our own process has a name
    assert snap.host.kind is DeviceKind.HOST and snap.host.total_bytes > 0


def test_two_gpus_are_both_listed_in_order():
    probe, _ = probe_for("two_gpus")
    snap = probe.snapshot()
    assert [g.name for g in snap.gpus] == ["NVIDIA RTX A6000", "NVIDIA GeForce RTX 3060"]
    assert [g.free_bytes for g in snap.gpus] == [8 * GIB, 11 * GIB]
    assert [d.key for d in snap.devices] == ["gpu:0", "gpu:1", "host"]


@pytest.mark.parametrize(
    ("name", "status", "hint_word"),
    [
        ("library_missing", NvmlStatus.LIBRARY_NOT_FOUND, "not found"),
        ("driver_not_loaded", NvmlStatus.DRIVER_NOT_LOADED, "not loaded"),
        ("no_devices", NvmlStatus.NO_DEVICES, "no GPUs"),
    ],
)
def test_no_usable_nvml_becomes_a_status_with_a_hint_and_host_memory(name, status, hint_word):
    probe, _ = probe_for(name)
    snap = probe.snapshot()
    assert snap.nvml_status is status
    assert hint_word in snap.nvml_hint
    assert snap.gpus == ()
    assert not snap.has_gpu
    assert snap.host.free_bytes > 0


def test_missing_nvml_python_module_is_reported_not_raised():
    probe = DeviceProbe(nvml_module_name="no_such_nvml_module_xyz")
    snap = probe.snapshot()
    assert snap.nvml_status is NvmlStatus.LIBRARY_NOT_FOUND
    assert "no_such_nvml_module_xyz" in snap.nvml_hint


def test_real_pynvml_without_a_driver_reports_library_not_found():
    snap = DeviceProbe().snapshot()  # this machine never has a GPU
    assert snap.nvml_status in (NvmlStatus.LIBRARY_NOT_FOUND, NvmlStatus.DRIVER_NOT_LOADED)
    assert snap.host.total_bytes > 0


def test_one_lost_gpu_becomes_a_degraded_row_and_the_other_still_reads():
    probe, _ = probe_for("one_gpu_lost")
    snap = probe.snapshot()
    ok, lost = snap.gpus
    assert ok.status is DeviceStatus.OK and ok.free_bytes == 22 * GIB
    assert lost.status is DeviceStatus.LOST and lost.free_bytes is None
    assert "reboot" in lost.hint
    assert snap.has_gpu


def test_processes_not_supported_is_partial_with_memory_still_valid():
    probe, _ = probe_for("processes_not_supported")
    (gpu,) = probe.snapshot().gpus
    assert gpu.status is DeviceStatus.PARTIAL
    assert "processes" in gpu.hint
    assert gpu.processes == ()
    assert gpu.free_bytes == 22 * GIB


def test_utilisation_not_supported_is_none_not_zero():
    fake = FakeNvml([FakeGpu(utilization_not_supported=True)])
    (gpu,) = DeviceProbe(fake.module()).snapshot().gpus
    assert gpu.utilization_pct is None
    assert gpu.status is DeviceStatus.PARTIAL


def test_nvml_is_initialised_once_and_its_error_remembered():
    probe, fake = probe_for("driver_not_loaded")
    for _ in range(5):
        probe.snapshot()
    assert fake.calls["nvmlInit"] == 1
    ok_probe, ok_fake = probe_for("one_gpu")
    for _ in range(5):
        ok_probe.snapshot()
    assert ok_fake.calls["nvmlInit"] == 1
    assert ok_fake.calls["nvmlDeviceGetCount"] == 5


def test_reset_retries_nvml_after_a_driver_comes_back():
    fake = FakeNvml([FakeGpu()], init_error="DriverNotLoaded")
    probe = DeviceProbe(fake.module())
    assert probe.snapshot().nvml_status is NvmlStatus.DRIVER_NOT_LOADED
    fake.init_error = None
    assert probe.snapshot().nvml_status is NvmlStatus.DRIVER_NOT_LOADED  # remembered
    probe.reset()
    assert probe.snapshot().nvml_status is NvmlStatus.OK


def test_process_memory_not_available_is_none():
    fake = FakeNvml([FakeGpu(processes=[FakeProcess(pid=999_999_999, usedGpuMemory=None)])])
    (gpu,) = DeviceProbe(fake.module()).snapshot().gpus
    (proc,) = gpu.processes
    assert proc.used_bytes is None and proc.name is None


def test_gpu_used_bytes_reads_one_gpu():
    probe, _ = probe_for("two_gpus")
    assert probe.gpu_used_bytes(0) == 40 * GIB
    assert probe.gpu_used_bytes(7) is None
    assert DeviceProbe(scenario("library_missing").module()).gpu_used_bytes(0) is None


def test_host_budget_caps_free_memory():
    probe = DeviceProbe(scenario("library_missing").module(), host_memory_budget_bytes=123 * 1024**2)
    host = probe.snapshot().host
    assert host.free_bytes == 123 * 1024**2
    assert "budget" in host.hint
