"""The broker, the client and synthetic workers start without torch (it costs seconds per process)."""

import subprocess
import sys

import pytest

TORCH_FREE = [
    "broker", "broker.cli", "broker.server", "broker.scheduler", "broker.client", "broker.security",
    "virnucpro.cli", "virnucpro.worker", "virnucpro.synthetic", "virnucpro.embed", "virnucpro.local",
    "virnucpro.stages", "virnucpro.sequences", "virnucpro.refine", "virnucpro.pipeline.gpu_weights",
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module):
    probe = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0, f"{module} imports torch"


def test_a_synthetic_worker_never_loads_torch(tmp_path):
    probe = (
        "import sys\n"
        "from virnucpro.worker import WorkerConfig, open_backends, Worker\n"
        "config = WorkerConfig(broker='tcp://127.0.0.1:9', synthetic_speed=1000.0)\n"
        "Worker(config, open_backends(config))\n"
        "sys.exit('torch' in sys.modules)\n"
    )
    assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0
