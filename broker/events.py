"""The scheduler core's vocabulary: the events the server feeds it and the instructions it returns.

Every event carries `now`, the server's monotonic clock in seconds; the core
has no clock of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.records import LogRecord

# ----------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class FileSpec:
    """One input file of a job, measured by the client at submission."""

    path: str
    output: str
    sequences: int
    residues: int


def task_id(job: str, index: int) -> str:
    """The id of the task that runs file `index` (its place in the submission, from 0) of `job`.

    Part of the protocol: a worker names its task by this id to the client's
    file server (virnucpro.transfer), which finds the file by its index.
    """
    return f"{job}:{index}"


def task_index(task: str) -> int | None:
    """The file index that a task id names, or None if `task` is not a task id."""
    _, colon, index = task.rpartition(":")
    if not colon or not index.isdigit() or not index.isascii() or len(index) > 9:
        return None
    return int(index)


@dataclass(frozen=True)
class WorkerJoined:
    worker: str
    name: str
    host: str
    gpu: str
    weight: float
    stages: tuple[str, ...]
    now: float


@dataclass(frozen=True)
class WorkRequested:
    worker: str
    now: float


@dataclass(frozen=True)
class TaskSucceeded:
    worker: str
    task: str
    seconds: float
    skipped: bool
    now: float


@dataclass(frozen=True)
class TaskFailed:
    worker: str
    task: str
    reason: str
    now: float


@dataclass(frozen=True)
class Heartbeat:
    worker: str
    task: str | None
    now: float
    gauges: dict[str, float] | None = None
    # Units of work (batches) the running task has begun; it grows while the task works. None: not reported.
    progress: int | None = None


@dataclass(frozen=True)
class WorkerLeft:
    worker: str
    now: float


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class JobSubmitted:
    job: str
    stage: str
    output_dir: str
    files: tuple[FileSpec, ...]
    weighted: bool
    steal: bool
    now: float
    backup: bool = True  # with steal: idle workers may run backup copies of straggling files


@dataclass(frozen=True)
class JobCancelled:
    job: str
    now: float


Event = (
    WorkerJoined | WorkRequested | TaskSucceeded | TaskFailed | Heartbeat | WorkerLeft | Tick | JobSubmitted | JobCancelled
)


# ----------------------------------------------------------- instructions


@dataclass(frozen=True)
class Assign:
    """Send file `path` to `worker`; it writes `output`."""

    worker: str
    task: str
    job: str
    stage: str
    path: str
    output: str


@dataclass(frozen=True)
class Revoke:
    """Tell `worker` to stop running `task` (its job was cancelled, or another copy of the file finished first).

    `abandon`: the task showed no progress for the task timeout, so it may be blocked where it cannot see the
    revoke (a read that never returns); if it does not stop soon, the worker must restart itself.
    """

    worker: str
    task: str
    abandon: bool = False


@dataclass(frozen=True)
class Reregister:
    """`worker` is unknown or was declared dead: it must register again."""

    worker: str


@dataclass(frozen=True)
class JobFinished:
    job: str
    report: dict[str, Any]


@dataclass(frozen=True)
class Log:
    """Append `record` to the throughput log."""

    record: LogRecord


@dataclass(frozen=True)
class Notice:
    """A line for the broker's own log."""

    text: str


Instruction = Assign | Revoke | Reregister | JobFinished | Log | Notice
