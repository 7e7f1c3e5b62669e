"""The probe: the only part of the core that talks to NVML (pynvml) and reads host processes (psutil)."""

from .devices import DeviceProbe

__all__ = ["DeviceProbe"]
