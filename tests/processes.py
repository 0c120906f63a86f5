"""Start the real broker and workers as processes on loopback, and stop them, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from broker.client import BrokerClient

BIN = Path(sys.executable).parent
VIRNUCPRO = str(BIN / "virnucpro")
BROKER = str(BIN / "virnucpro-broker")


def free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


class Cluster:
    """One broker and its workers; every process is killed when the cluster closes."""

    def __init__(self, directory: Path, worker_timeout: float = 1.5, heartbeat: float = 0.2) -> None:
        self.directory = directory
        self.address = free_address()
        self.log = directory / "throughput.jsonl"
        self.processes: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}
        self.broker = self._spawn(
            [BROKER, "--bind", self.address, "--throughput-log", str(self.log),
             "--heartbeat-interval", str(heartbeat), "--worker-timeout", str(worker_timeout)],
            "broker.log",
        )

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen:
        handle = open(self.directory / log_name, "ab")
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        handle.close()
        self.processes.append(process)
        return process

    def add_worker(self, name: str, speed: float, gpu: str = "NVIDIA GeForce RTX 3090") -> subprocess.Popen:
        process = self._spawn(
            [VIRNUCPRO, "worker", "--broker", self.address, "--synthetic-speed", str(speed),
             "--gpu-name", gpu, "--name", name, "--broker-timeout", "5"],
            f"worker-{name}.log",
        )
        self.workers[name] = process
        return process

    def wait_for_workers(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with BrokerClient(self.address, timeout=2.0) as client:
            status = client.wait_until_up(timeout)
            while sum(w["alive"] for w in status["workers"]) < count:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{count} workers did not register; see {self.directory}")
                time.sleep(0.1)
                status = client.request("status")["status"]

    def status(self) -> dict:
        with BrokerClient(self.address, timeout=5.0) as client:
            return client.request("status")["status"]

    def embed(self, output_dir: Path, files: list[Path], *flags: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [VIRNUCPRO, "embed", "--broker", self.address, "--stage", "synthetic", "-o", str(output_dir),
             "--timeout", "30", *flags, *map(str, files)],
            capture_output=True, text=True, timeout=timeout,
        )

    def records(self, event: str | None = None) -> list[dict]:
        if not self.log.exists():
            return []
        lines = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        return [r for r in lines if event is None or r["event"] == event]

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def cluster(directory: Path, **options: float) -> Iterator[Cluster]:
    running = Cluster(directory, **options)
    try:
        yield running
    finally:
        running.close()


def kill_hard(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(5)
