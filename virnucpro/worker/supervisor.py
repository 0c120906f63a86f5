"""One worker process per GPU of a node: started together, restarted with back-off after a crash, stopped together.

`virnucpro worker --gpus all` runs this (`supervise_gpus`). The decisions (when to start,
restart or give up on a GPU's worker) are a small pure core, `Supervision`,
fed exits and the time; `Supervisor` is the shell that owns the processes
and relays their output, each line prefixed with the worker's name.

A worker that exits with SETUP_ERROR_EXIT could not start (a model that
does not load, a missing package, bad keys): starting it again would fail
the same way, so its GPU is left idle and the reason is logged. When every
GPU's worker has failed so, the supervisor exits with that status too.
Any other exit is a crash, restarted after 1, 2, 4 ... seconds, at most
RestartPolicy.max_delay; a worker that ran for stable_after seconds before
crashing starts again from the first delay.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from virnucpro import processes
from virnucpro.worker.config import SETUP_ERROR_EXIT
from virnucpro.worker.gpus import choose_gpus, stand_in_count

logger = logging.getLogger("virnucpro.supervisor")

# After SIGTERM a worker says goodbye at once, then finishes the batch in hand; Slurm sends SIGKILL
# KillWait (30 s by default) after its SIGTERM, so the workers get most of that.
STOP_GRACE = 20.0
POLL_SECONDS = 0.2
TAIL_LINES = 8


@dataclass(frozen=True)
class RestartPolicy:
    first_delay: float = 1.0
    max_delay: float = 60.0
    stable_after: float = 120.0  # a worker that ran this long before crashing was healthy: back-off starts over

    def delay(self, crashes: int) -> float:
        """Seconds to wait before the restart that follows `crashes` crashes in a row (1, 2, ...)."""
        return min(self.max_delay, self.first_delay * 2 ** min(crashes - 1, 32))


@dataclass
class Slot:
    """One GPU's worker as the core sees it."""

    gpu: int
    started: float | None = None  # when the running process started; None while none runs
    start_at: float | None = None  # when to start the next one; None while one runs or after giving up
    crashes: int = 0  # in a row, since the last run that lasted stable_after
    gave_up: bool = False


@dataclass(frozen=True)
class Verdict:
    """What the core decided about a worker that exited."""

    gpu: int
    restart_in: float | None  # None: not restarted
    text: str


@dataclass
class Supervision:
    """The supervisor's decisions, with no processes and no clock: the shell passes `now` in."""

    gpus: list[int]
    now: float
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    slots: dict[int, Slot] = field(init=False)

    def __post_init__(self) -> None:
        self.slots = {gpu: Slot(gpu, start_at=self.now) for gpu in self.gpus}

    def due(self, now: float) -> list[int]:
        """The GPUs whose worker should start now; they count as running from `now`."""
        starting = [s.gpu for s in self.slots.values() if s.start_at is not None and s.start_at <= now]
        for gpu in starting:
            self.slots[gpu].start_at, self.slots[gpu].started = None, now
        return starting

    def exited(self, gpu: int, code: int, now: float) -> Verdict:
        """A running worker exited with `code` (negative: killed by that signal)."""
        slot = self.slots[gpu]
        ran = now - slot.started if slot.started is not None else 0.0
        slot.started = None
        if code == SETUP_ERROR_EXIT:
            slot.gave_up = True
            return Verdict(gpu, None, f"could not start (exit {code}) and is not restarted: fix what it said "
                                      "above, then start `virnucpro worker` again")
        slot.crashes = 1 if ran >= self.policy.stable_after else slot.crashes + 1
        delay = self.policy.delay(slot.crashes)
        slot.start_at = now + delay
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return Verdict(gpu, delay, f"{how} after {ran:.0f} s; restarting in {delay:g} s "
                                   f"({slot.crashes} crash{'es' if slot.crashes > 1 else ''} in a row)")

    def next_start(self) -> float | None:
        """When the next restart is due, or None if none is waiting."""
        times = [s.start_at for s in self.slots.values() if s.start_at is not None]
        return min(times) if times else None

    @property
    def all_gave_up(self) -> bool:
        return all(s.gave_up for s in self.slots.values())


class _Relay(threading.Thread):
    """Copies a worker's output to ours, each line prefixed with its name, and keeps the last lines."""

    _lock = threading.Lock()

    def __init__(self, name: str, stream: IO[bytes], sink: IO[bytes]) -> None:
        super().__init__(name=f"relay {name}", daemon=True)
        self.prefix = f"{name}: ".encode()
        self.stream, self.sink = stream, sink
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def run(self) -> None:
        with self.stream:
            for line in self.stream:
                self.tail.append(line.decode(errors="replace").rstrip())
                with self._lock:
                    try:
                        self.sink.write(self.prefix + line)
                        self.sink.flush()
                    except (OSError, ValueError):
                        pass  # our own output is gone (a closed terminal); keep draining the worker's


@dataclass
class _Running:
    process: subprocess.Popen
    relay: _Relay


class Supervisor:
    """Runs `argv_for(gpu)` for each GPU until `stop`; `run` returns the exit status."""

    def __init__(self, gpus: list[int], name_for: Callable[[int], str], argv_for: Callable[[int], list[str]],
                 env: dict[str, str], policy: RestartPolicy | None = None, grace: float = STOP_GRACE) -> None:
        self.core = Supervision(gpus, time.monotonic(), policy or RestartPolicy())
        self.name_for, self.argv_for, self.env, self.grace = name_for, argv_for, env, grace
        self.running: dict[int, _Running] = {}
        self._stop = threading.Event()

    def stop(self) -> None:
        """Make `run` stop every worker and return; safe from a signal handler."""
        self._stop.set()

    def run(self) -> int:
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for gpu in self.core.due(now):
                    self._start(gpu)
                for gpu, child in list(self.running.items()):
                    code = child.process.poll()
                    if code is not None:
                        self._exited(gpu, child, code)
                if self.core.all_gave_up:
                    logger.error("no worker could start on any of GPUs %s", ",".join(map(str, self.core.gpus)))
                    return SETUP_ERROR_EXIT
                self._stop.wait(POLL_SECONDS)
            logger.info("stopping %d worker(s)", len(self.running))
            return 0
        finally:
            processes.stop((child.process for child in self.running.values()), self.grace)
            for child in self.running.values():
                child.relay.join(timeout=self.grace)

    def _start(self, gpu: int) -> None:
        process = processes.spawn(self.argv_for(gpu), subprocess.PIPE, self.env)
        assert process.stdout is not None
        relay = _Relay(self.name_for(gpu), process.stdout, sys.stderr.buffer)
        relay.start()
        self.running[gpu] = _Running(process, relay)
        logger.info("started worker %s (pid %d)", self.name_for(gpu), process.pid)

    def _exited(self, gpu: int, child: _Running, code: int) -> None:
        del self.running[gpu]
        child.relay.join(timeout=1.0)  # its last lines, for the message below
        verdict = self.core.exited(gpu, code, time.monotonic())
        level = logging.WARNING if verdict.restart_in is not None else logging.ERROR
        tail = "\n".join(f"  | {line}" for line in child.relay.tail)
        logger.log(level, "worker %s %s%s", self.name_for(gpu), verdict.text,
                   f"; its last lines:\n{tail}" if tail else "")


def supervise_gpus(requested: tuple[int, ...] | None, name: str | None, worker_options: list[str],
                   verbose: bool) -> int:
    """`virnucpro worker --gpus`: a `virnucpro worker` per GPU until SIGINT or SIGTERM; the exit status.

    `requested` None serves every visible GPU. Workers are named NAME:cuda:N
    (NAME defaults to the host name) and get `worker_options` besides their
    device. GpuDiscoveryError when the GPUs asked for are not there.
    """
    gpus = choose_gpus(requested)
    on_cpu = stand_in_count() is not None
    prefix = name or socket.gethostname()
    env = dict(os.environ)
    if on_cpu:  # torch sizes its thread pool from these: a fair share of the cores each
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = str(max(1, cores // len(gpus)))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)

    def name_for(gpu: int) -> str:
        return f"{prefix}:cuda:{gpu}"

    def argv_for(gpu: int) -> list[str]:
        return [*processes.command("virnucpro"), *(["-v"] if verbose else []), "worker", *worker_options,
                "--device", "cpu" if on_cpu else f"cuda:{gpu}", "--name", name_for(gpu)]

    supervisor = Supervisor(gpus, name_for, argv_for, env)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: supervisor.stop())
    return supervisor.run()
