"""The real broker and synthetic workers as processes on loopback, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from virnucpro.client.local import LocalCluster, free_loopback_address
from virnucpro.processes import command

VIRNUCPRO = command("virnucpro")[0]
BROKER = command("virnucpro-broker")[0]
free_address = free_loopback_address


class Cluster(LocalCluster):
    """A broker with short leases, synthetic workers, and readers for its log and status."""

    def __init__(self, directory: Path, worker_timeout: float = 1.5, heartbeat: float = 0.2,
                 broker_options: tuple[str, ...] = ()) -> None:
        super().__init__(directory)
        self.directory = directory
        self.log = directory / "throughput.jsonl"
        self.start_broker("--throughput-log", str(self.log), "--heartbeat-interval", str(heartbeat),
                          "--worker-timeout", str(worker_timeout), *broker_options)

    def add_worker(self, name: str, speed: float, gpu: str = "NVIDIA GeForce RTX 3090") -> subprocess.Popen:
        child = self.start_worker(name, "--synthetic-speed", str(speed), "--gpu-name", gpu, "--broker-timeout", "5")
        return child.process

    def wait_for_workers(self, count: int, stage: str = "synthetic", timeout: float = 20.0) -> None:
        super().wait_for_workers(count, stage, timeout)

    def status(self) -> dict:
        with self.client() as client:
            return client.request("status")["status"]

    def _embed_argv(self, output_dir: Path, files: list[Path], flags: tuple[str, ...]) -> list[str]:
        return [VIRNUCPRO, "embed", "--broker", self.address, "--stage", "synthetic", "-o", str(output_dir),
                "--timeout", "30", *flags, *map(str, files)]

    def embed(self, output_dir: Path, files: list[Path], *flags: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run `virnucpro embed` to the end."""
        return subprocess.run(self._embed_argv(output_dir, files, flags), capture_output=True, text=True,
                              timeout=timeout)

    def start_embed(self, output_dir: Path, files: list[Path], *flags: str) -> subprocess.Popen:
        """Start `virnucpro embed` and return at once, for tests that act while it runs."""
        return subprocess.Popen(self._embed_argv(output_dir, files, flags), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def records(self, event: str | None = None) -> list[dict]:
        if not self.log.exists():
            return []
        lines = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        return [r for r in lines if event is None or r["event"] == event]


@contextmanager
def cluster(directory: Path, **options: Any) -> Iterator[Cluster]:
    running = Cluster(directory, **options)
    try:
        yield running
    finally:
        running.close()


def kill_hard(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(5)
