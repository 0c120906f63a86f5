"""`virnucpro worker --gpus`: one command starts a worker per GPU, restarts a killed one, and stops them all.

The machine has no GPU: a stand-in `nvidia-smi` on PATH lists three, and the
workers are synthetic devices (they never touch a GPU or import torch).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.cluster import VIRNUCPRO, Cluster, cluster
from tests.support.fasta import write_fasta
from virnucpro.worker.gpus import STAND_IN_ENV

NVIDIA_SMI = """#!/bin/sh
[ "$1" = "-L" ] || exit 2
echo "GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-00000000-0000-0000-0000-000000000000)"
echo "GPU 1: NVIDIA GeForce RTX 4090 (UUID: GPU-11111111-1111-1111-1111-111111111111)"
echo "GPU 2: NVIDIA GeForce RTX 4090 (UUID: GPU-22222222-2222-2222-2222-222222222222)"
"""
WORKER_TIMEOUT = 60.0  # far longer than any wait below: a worker seen leaving said goodbye


def gpu_node_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Our environment with the stand-in nvidia-smi first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(NVIDIA_SMI)
    smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", STAND_IN_ENV)}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", **extra}


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # it ended while we looked
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s"
        time.sleep(0.1)


def worker_name(tmp_path: Path, pid: int) -> str:
    """The name the supervisor gave the worker with this pid, from its start-up line."""
    for line in (tmp_path / "supervisor.log").read_text().splitlines():
        if line.endswith(f"(pid {pid})"):
            return line.split("started worker ", 1)[1].split(" (pid")[0]
    raise AssertionError(f"no worker with pid {pid} in the supervisor's output")


def living_workers(c: Cluster) -> list[str]:
    return sorted(w["worker"] for w in c.status()["workers"] if w["alive"])


def test_one_command_runs_a_worker_per_gpu_restarts_a_killed_one_and_stops_all_on_sigterm(tmp_path):
    host = socket.gethostname()
    (tmp_path / "in").mkdir()
    files = [write_fasta(tmp_path / "in" / f"part_{i}.fa", [100] * 10, prefix=f"p{i}_") for i in range(8)]
    env = gpu_node_env(tmp_path, CUDA_VISIBLE_DEVICES="0,2")  # as a Slurm job given two of the three
    with cluster(tmp_path, worker_timeout=WORKER_TIMEOUT, heartbeat=0.5) as c, \
            open(tmp_path / "supervisor.log", "wb") as log:
        supervisor = subprocess.Popen([VIRNUCPRO, "worker", "--broker", c.address, "--gpus", "all",
                                       "--synthetic-speed", "20000"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: living_workers(c) == [f"{host}:cuda:0", f"{host}:cuda:1"], 30,
                       "one worker per visible GPU registered")
            result = c.embed(tmp_path / "out", files, "--min-workers", "2")
            assert result.returncode == 0, result.stderr
            first = children(supervisor.pid)
            assert len(first) == 2
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            # Killed without a word, it stays registered until WORKER_TIMEOUT; its restart registers beside it.
            wait_until(lambda: len(children(supervisor.pid) - first) == 1 and len(living_workers(c)) == 3, 30,
                       "the killed worker was started again and registered")
            assert not alive(victim)
            stale = worker_name(tmp_path, victim)
            workers = children(supervisor.pid)
            supervisor.send_signal(signal.SIGTERM)
            left_by = time.monotonic() + 20
            assert supervisor.wait(30) == 0
            wait_until(lambda: living_workers(c) == [stale], max(0.1, left_by - time.monotonic()),
                       "every running worker said goodbye to the broker")
        finally:
            if supervisor.poll() is None:
                supervisor.kill()
                supervisor.wait()
    assert len(list((tmp_path / "out").glob("*_synthetic.json"))) == len(files)
    assert not any(alive(pid) for pid in workers), "a worker outlived its supervisor"
    output = (tmp_path / "supervisor.log").read_text()
    assert "was killed by signal 9" in output and "restarting in 1 s" in output
    assert f"{host}:cuda:1: " in output  # each worker's lines, prefixed with its name


def test_workers_that_cannot_start_are_not_restarted_and_the_supervisor_says_why(tmp_path):
    env = gpu_node_env(tmp_path, **{STAND_IN_ENV: "2"})
    result = subprocess.run([VIRNUCPRO, "worker", "--broker", "tcp://127.0.0.1:9", "--gpus", "all", "--stage", "esm",
                             "--esm-model", str(tmp_path / "missing" / "esm2_t36_3B_UR50D.pt")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 78, result.stderr
    assert result.stderr.count("started worker") == 2
    assert result.stderr.count("could not start (exit 78) and is not restarted") == 2
    assert "esm2_t36_3B_UR50D.pt" in result.stderr  # the worker's own reason, relayed
    assert "no worker could start on any of GPUs 0,1" in result.stderr


def test_gpus_all_on_a_machine_without_gpus_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", STAND_IN_ENV)}
    env["PATH"] = str(Path(VIRNUCPRO).parent)  # no nvidia-smi
    result = subprocess.run([VIRNUCPRO, "worker", "--gpus", "all", "--synthetic-speed", "100"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert "no NVIDIA GPU found" in result.stderr and "--device cpu" in result.stderr


def test_gpus_and_device_together_are_refused(tmp_path):
    result = subprocess.run([VIRNUCPRO, "worker", "--gpus", "all", "--device", "cuda:0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "either --gpus" in result.stderr
