"""A head node installs `virnucpro` without extras, gets no torch, and still runs the broker, `embed` and `status`.

The package is installed from a copy of this checkout into a fresh virtual
environment, with its core dependencies from the package index pip is
configured with (25 to 45 s on the loaded 2-core CI machine, from its local index).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fasta import write_fasta
from virnucpro.client.local import free_loopback_address
from virnucpro.processes import stop

ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT = 300  # a cold pip cache on a loaded machine; under 45 s when warm
HINT = "pip install 'virnucpro[models]'"


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin directory of a fresh environment where `pip install virnucpro` ran with no extras."""
    base = tmp_path_factory.mktemp("torchless")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("broker", "virnucpro"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True, timeout=120)
    bin_dir = base / "venv" / "bin"
    installed = subprocess.run([str(bin_dir / "pip"), "install", "-q", str(source)], capture_output=True, text=True,
                               timeout=INSTALL_TIMEOUT, env=clean_env())
    assert installed.returncode == 0, installed.stderr
    return bin_dir


def clean_env() -> dict[str, str]:
    """Our environment without anything that would lend the fresh install this checkout's modules."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRNUCPRO_BROKER", "VIRNUCPRO_CURVE_SECRET", "VIRNUCPRO_CURVE_SERVER_KEY")}


def run(venv: Path, *argv: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=clean_env())


@pytest.fixture
def broker(venv: Path, tmp_path: Path) -> Iterator[str]:
    address = free_loopback_address()
    with open(tmp_path / "broker.log", "wb") as log:
        process = subprocess.Popen([str(venv / "virnucpro-broker"), "--bind", address,
                                    "--throughput-log", str(tmp_path / "throughput.jsonl")],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=clean_env())
    try:
        yield address
    finally:
        stop([process], grace=10)


def test_the_core_install_has_no_torch(venv, tmp_path):
    probe = run(venv, "python", "-c", "import torch", cwd=tmp_path)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    assert run(venv, "virnucpro-broker", "--help", cwd=tmp_path).returncode == 0


def test_broker_synthetic_worker_embed_and_status_run_without_torch(venv, tmp_path, broker):
    (tmp_path / "in").mkdir()
    files = [write_fasta(tmp_path / "in" / f"part_{i}.fa", [100] * 10, prefix=f"p{i}_") for i in range(4)]
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen([str(venv / "virnucpro"), "worker", "--broker", broker, "--synthetic-speed", "20000",
                                   "--name", "head"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                  env=clean_env())
    try:
        embed = run(venv, "virnucpro", "embed", "--broker", broker, "--stage", "synthetic", "-o", str(tmp_path / "out"),
                    "--timeout", "30", *map(str, files), cwd=tmp_path, timeout=120)
        status = run(venv, "virnucpro-broker", "status", "--broker", broker, "--json", cwd=tmp_path)
    finally:
        stop([worker], grace=10)
    assert embed.returncode == 0, embed.stderr + (tmp_path / "worker.log").read_text()
    assert len(list((tmp_path / "out").glob("*_synthetic.json"))) == len(files)
    assert status.returncode == 0, status.stderr
    assert [(w["worker"], w["files_done"]) for w in json.loads(status.stdout)["workers"]] == [("head", len(files))]


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_a_model_worker_without_torch_fails_at_once_with_the_install_hint(venv, tmp_path, device):
    result = run(venv, "virnucpro", "worker", "--broker", "tcp://127.0.0.1:9", "--device", device, cwd=tmp_path)
    assert result.returncode == 78
    assert "torch" in result.stderr and HINT in result.stderr


def test_predict_without_torch_fails_at_once_with_the_install_hint(venv, tmp_path, broker):
    reads = write_fasta(tmp_path / "reads.fa", [600, 700])
    for where in ([], ["--broker", broker]):
        result = run(venv, "virnucpro", "predict", str(reads), "-o", str(tmp_path / "out"), *where, cwd=tmp_path)
        assert result.returncode == 1
        assert "torch" in result.stderr and HINT in result.stderr
    assert not (tmp_path / "out").exists()
