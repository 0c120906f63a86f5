"""GPU utilization and memory: read through NVML where it exists, shown as n/a where it does not."""

from __future__ import annotations

import sys
import types

from rich.console import Console

from broker.status import render_status
from virnucpro.worker.process import nvml_gauges_for


def fake_pynvml(util: int, used: int, total: int) -> types.ModuleType:
    """Stands in for nvidia-ml-py, which needs an NVIDIA driver this machine lacks."""
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    module.NVMLError = NVMLError
    module.nvmlInit = lambda: None
    module.nvmlDeviceGetHandleByIndex = lambda index: ("handle", index)
    module.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=util)
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=used, total=total)
    return module


def test_cuda_worker_reads_utilization_and_memory_through_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(97, 40 * 2**30, 80 * 2**30))
    read = nvml_gauges_for("cuda:1")
    assert read() == {"gpu_util": 97.0, "mem_used_mib": 40 * 1024.0, "mem_total_mib": 80 * 1024.0}


def test_cpu_worker_and_a_machine_without_nvml_report_no_gauges(monkeypatch):
    assert nvml_gauges_for("cpu") is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed
    assert nvml_gauges_for("cuda:0") is None


def snapshot(gauges):
    return {
        "workers": [{"worker": "w", "gpu": "NVIDIA H100 PCIe", "alive": True, "stages": ["esm"],
                     "predicted_weight": 2.5, "observed_weight": 2.4, "speed": 41000.0, "queue": 3,
                     "running": "/d/output_7.fa",
                     "running_for": 12.0, "files_done": 5, "steals_in": 1, "steals_out": 0, "gauges": gauges}],
        "jobs": [], "counters": {},
    }


def test_status_shows_gauges_when_reported_and_na_otherwise():
    console = Console(width=200, record=True)
    render_status(snapshot({"gpu_util": 97.0, "mem_used_mib": 40960.0, "mem_total_mib": 81920.0}), console)
    render_status(snapshot(None), console)
    text = console.export_text()
    assert "97%" in text and "40.0/80 GiB" in text and "41,000" in text
    assert text.count("n/a") == 2
