"""Start a broker and its workers as child processes on this machine, and stop them all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from broker.client import BrokerClient

STOP_GRACE = 5.0


def free_loopback_address() -> str:
    """A tcp:// address on 127.0.0.1 with a port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def command(name: str) -> list[str]:
    # The console script beside this interpreter, so a venv's child runs the same install.
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    module = "broker.cli" if name == "virnucpro-broker" else "virnucpro.cli"
    return [sys.executable, "-m", module]


class LocalCluster:
    """A broker and workers owned by this process; `close` (or leaving the `with`) ends them."""

    def __init__(self, log_dir: Path, address: str | None = None) -> None:
        self.log_dir = log_dir
        self.address = address or free_loopback_address()
        self.broker: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}

    def _spawn(self, argv: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / log_name, "ab") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})}, start_new_session=True)

    def start_broker(self, *options: str) -> subprocess.Popen:
        self.broker = self._spawn([*command("virnucpro-broker"), "--bind", self.address, *options], "broker.log")
        return self.broker

    def start_worker(self, name: str, *options: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        process = self._spawn([*command("virnucpro"), "worker", "--broker", self.address, "--name", name, *options],
                              f"worker-{name}.log", env)
        self.workers[name] = process
        return process

    def wait_for_workers(self, count: int, stage: str, timeout: float) -> None:
        """Block until `count` workers serving `stage` registered; RuntimeError naming a dead one's log."""
        deadline = time.monotonic() + timeout
        with BrokerClient(self.address, timeout=2.0) as client:
            status = client.wait_until_up(timeout)
            while sum(1 for w in status["workers"] if w["alive"] and stage in w["stages"]) < count:
                for name, process in self.workers.items():
                    if process.poll() is not None:
                        raise RuntimeError(f"worker {name} exited ({process.returncode}); "
                                           f"see {self.log_dir / f'worker-{name}.log'}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{count} {stage} workers did not register within {timeout:g} s; "
                                       f"see the logs in {self.log_dir}")
                time.sleep(0.1)
                status = client.request("status")["status"]

    def processes(self) -> Sequence[subprocess.Popen]:
        return [*self.workers.values(), *([self.broker] if self.broker else [])]

    def close(self) -> None:
        """SIGTERM every process (workers first), then SIGKILL what outlives the grace period."""
        for process in self.processes():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for process in self.processes():
            try:
                process.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

