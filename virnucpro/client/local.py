"""Start a broker and its workers as child processes on this machine, watch them, and stop them all."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.client import BrokerClient
from broker.security import SECRET_ENV, SERVER_KEY_ENV
from virnucpro.processes import command, spawn, stop

STOP_GRACE = 10.0  # a worker finishes its current batch before it leaves
LISTEN_TIMEOUT = 30.0
BROKER_START_ATTEMPTS = 3  # the free port picked may be taken before the broker binds it


def free_loopback_address() -> str:
    """A tcp:// address on 127.0.0.1 with a port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


@dataclass
class Child:
    """A process started here, and where its output goes."""

    name: str  # as messages name it: "broker", "worker cpu-1"
    process: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace").rstrip().splitlines()
        except OSError:
            return ""
        return "\n".join(f"  | {line}" for line in text[-lines:])

    def exit_description(self) -> str:
        tail = self.log_tail()
        return (f"{self.name} exited with code {self.process.returncode} (log: {self.log})"
                + (f"; its last lines:\n{tail}" if tail else ""))


class LocalCluster:
    """A loopback broker and workers owned by this process; `close` (or leaving the `with`) ends them.

    With no key options the broker, its workers and this process's clients
    all use the user's own key pair (broker.security): nothing to configure,
    and nobody else gets in.
    """

    def __init__(self, log_dir: Path, environment_keys: bool = False, insecure: bool = False) -> None:
        """`environment_keys`: the caller gives the broker --curve-secret and admits the keys named in
        $VIRNUCPRO_CURVE_SECRET, which children and clients then keep; otherwise they must not try keys meant
        for another broker. `insecure`: broker and workers run with --insecure."""
        self.log_dir = log_dir
        self.environment_keys = environment_keys
        self.insecure = insecure
        self.address = ""
        self.broker: Child | None = None
        self.workers: dict[str, Child] = {}

    def _spawn(self, name: str, argv: list[str], log_name: str, env: dict[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / log_name
        child_env = {k: v for k, v in os.environ.items()
                     if self.environment_keys or k not in (SECRET_ENV, SERVER_KEY_ENV)}
        with open(log, "ab") as handle:
            process = spawn(argv, handle, {**child_env, **(env or {})})
        return Child(name, process, log)

    def start_broker(self, *options: str, address: str | None = None, env: dict[str, str] | None = None) -> Child:
        """Start the broker on `address` (default: a free loopback port) and wait until it listens.

        `env`: its environment (the key pair it uses lies in the state directory it names). RuntimeError if it
        cannot.
        """
        for _ in range(BROKER_START_ATTEMPTS):
            self.address = address or free_loopback_address()
            self.broker = self._spawn("broker", [*command("virnucpro-broker"), "--bind", self.address,
                                                 *self._insecure(), *options], "broker.log", env)
            if _wait_listening(self.broker.process, self.address, LISTEN_TIMEOUT):
                return self.broker
            if self.broker.process.poll() is None:
                raise RuntimeError(f"the broker did not listen on {self.address} within {LISTEN_TIMEOUT:g} s "
                                   f"(log: {self.broker.log})")
        assert self.broker is not None
        raise RuntimeError(f"the broker could not start: {self.broker.exit_description()}")

    def start_worker(self, name: str, *options: str, env: dict[str, str] | None = None) -> Child:
        child = self._spawn(f"worker {name}", [*command("virnucpro"), "worker", "--broker", self.address, "--name", name,
                                               *self._insecure(), *options],
                            f"worker-{name.replace(':', '')}.log", env)
        self.workers[name] = child
        return child

    def _insecure(self) -> list[str]:
        return ["--insecure"] if self.insecure else []

    def client(self, timeout: float = 5.0) -> BrokerClient:
        """A client of this broker, with the keys its broker admits."""
        return BrokerClient(self.address, timeout=timeout, insecure=self.insecure,
                            environment_keys=self.environment_keys)

    def failure(self, starting: bool = False) -> str | None:
        """Why a job here cannot finish: the broker exited, a worker exited while starting, or every worker did."""
        if self.broker is not None and self.broker.process.poll() is not None:
            return self.broker.exit_description()
        exited = [w for w in self.workers.values() if w.process.poll() is not None]
        if exited and (starting or len(exited) == len(self.workers)):
            return exited[0].exit_description()
        return None

    def wait_for_workers(self, count: int, stage: str, timeout: float) -> None:
        """Block until `count` workers serving `stage` registered; RuntimeError naming a dead one's log."""
        deadline = time.monotonic() + timeout
        with self.client(timeout=2.0) as client:
            status = client.wait_until_up(timeout)
            while sum(1 for w in status["workers"] if w["alive"] and stage in w["stages"]) < count:
                problem = self.failure(starting=True)
                if problem:
                    raise RuntimeError(problem)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{count} {stage} workers did not register within {timeout:g} s; "
                                       f"see the logs in {self.log_dir}")
                time.sleep(0.1)
                status = client.request("status")["status"]

    def close(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the workers (they leave the broker cleanly), then the broker; SIGKILL what outlives `grace`."""
        for group in (list(self.workers.values()), [self.broker] if self.broker else []):
            stop((child.process for child in group), grace)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _wait_listening(process: subprocess.Popen, address: str, timeout: float) -> bool:
    """True once something accepts on the address's port while `process` lives; False if it exits or time runs out."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return process.poll() is None
        except OSError:
            time.sleep(0.1)
    return False
