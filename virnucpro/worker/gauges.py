"""GPU utilization and memory gauges through NVML (the optional `nvml` extra), sent with heartbeats."""

from __future__ import annotations

from typing import Any


def nvml_gauges_for(device: str) -> Any:
    """A function reading GPU utilization and memory through NVML, or None without NVML or a GPU."""
    if not device.startswith("cuda"):
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except pynvml.NVMLError:
        return None

    def read() -> dict[str, float] | None:
        try:
            utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        except pynvml.NVMLError:
            return None
        return {"gpu_util": float(utilization.gpu), "mem_used_mib": memory.used / 2**20,
                "mem_total_mib": memory.total / 2**20}

    return read
