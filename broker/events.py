"""The scheduler core's vocabulary: the events the server feeds it and the instructions it returns.

Every event carries `now`, the server's monotonic clock in seconds; the core
has no clock of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from broker.records import LogRecord

# ----------------------------------------------------------------- events


class FileSpec(NamedTuple):
    """One input file of a job, measured by the client at submission.

    A named tuple rather than a dataclass: a job may hold a million, and a
    tuple is made several times faster.

    `paired` is the second input of a task that reads two files (a classify
    task reads the DNABERT-S features at `path` and the ESM-2 features at
    `paired`); None for every other stage. `fingerprint` is the input's
    (size, mtime_ns, records) at submission, passed on to the worker that
    runs it; None if the client sent none.
    """

    path: str
    output: str
    sequences: int
    residues: int
    paired: str | None = None
    fingerprint: tuple[int, int, int] | None = None


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
    """The worker asks for its next file. `finishing`: the file it ran to the end, whose output it is still
    making durable; its result follows, and meanwhile the worker runs the next file."""

    worker: str
    now: float
    finishing: str | None = None


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
    """A job and its first files; an unsealed job takes more by FilesAdded and ends only after JobSealed."""

    job: str
    stage: str
    output_dir: str
    files: tuple[FileSpec, ...]
    weighted: bool
    steal: bool
    now: float
    backup: bool = True  # with steal: idle workers may run backup copies of straggling files
    sealed: bool = True


@dataclass(frozen=True)
class FilesAdded:
    """More files for an unsealed job; `first` is the index the first of them takes in the job."""

    job: str
    first: int
    files: tuple[FileSpec, ...]
    now: float


@dataclass(frozen=True)
class JobSealed:
    """The client will add nothing more to `job`; `files` is how many it sent in all."""

    job: str
    files: int
    now: float


@dataclass(frozen=True)
class JobCancelled:
    job: str
    now: float


Event = (
    WorkerJoined | WorkRequested | TaskSucceeded | TaskFailed | Heartbeat | WorkerLeft | Tick | JobSubmitted
    | FilesAdded | JobSealed | JobCancelled
)


# ----------------------------------------------------------- instructions


@dataclass(frozen=True)
class Assign:
    """Send file `path` (and `paired`, for a task that reads two) to `worker`; it writes `output`."""

    worker: str
    task: str
    job: str
    stage: str
    path: str
    output: str
    paired: str | None = None


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
class Refused:
    """The client's request (an add or a seal) is not done: answer it with this error.

    `code` is a broker.protocol.ErrorCode value; `reason` says why in words.
    """

    code: str
    reason: str


@dataclass(frozen=True)
class Notice:
    """A line for the broker's own log."""

    text: str


Instruction = Assign | Revoke | Reregister | JobFinished | Log | Refused | Notice
