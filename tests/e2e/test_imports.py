"""The broker, the clients and synthetic workers start without torch (it costs seconds per process)."""

import subprocess
import sys

import pytest

TORCH_FREE = [
    "broker", "broker.cli", "broker.server", "broker.scheduler", "broker.simulator", "broker.client",
    "broker.security", "broker.status", "broker.records",
    "virnucpro.cli", "virnucpro.worker.process", "virnucpro.worker.config", "virnucpro.backends.synthetic",
    "virnucpro.client.embed", "virnucpro.client.local", "virnucpro.stages",
    "virnucpro.pipeline.sequences", "virnucpro.pipeline.fasta", "virnucpro.weights.logs", "virnucpro.weights.refine",
    "virnucpro.weights.cli", "virnucpro.pipeline.gpu_weights", "virnucpro.processes", "virnucpro.worker.gpus",
    "virnucpro.worker.supervisor",
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module):
    probe = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0, f"{module} imports torch"


def test_a_synthetic_worker_never_loads_torch():
    probe = (
        "import sys\n"
        "from virnucpro.worker.config import WorkerConfig, open_backends\n"
        "from virnucpro.worker.process import Worker\n"
        "config = WorkerConfig(broker='tcp://127.0.0.1:9', synthetic_speed=1000.0)\n"
        "Worker(config, open_backends(config), None)\n"
        "sys.exit('torch' in sys.modules)\n"
    )
    assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0
