"""Child processes of this install's commands: started to die with their parent, stopped SIGTERM first."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO


def command(name: str) -> list[str]:
    """How to run a console script of this install: the one beside this interpreter, else `python -m`."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    module = "broker.cli" if name == "virnucpro-broker" else "virnucpro.cli"
    return [sys.executable, "-m", module]


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has Linux SIGTERM the child when this process dies, even by SIGKILL.

    Children run in their own session, so a Ctrl-C reaches only this process,
    which then stops them in order; this covers the case where it cannot.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def spawn(argv: list[str], output: IO[bytes] | int, env: dict[str, str]) -> subprocess.Popen:
    """Start `argv` in its own session, without stdin, writing to `output`, to die with this process."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, preexec_fn=die_with_parent())


def stop(processes: Iterable[subprocess.Popen], grace: float) -> None:
    """SIGTERM every process still running, then SIGKILL those that outlive `grace` seconds."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
