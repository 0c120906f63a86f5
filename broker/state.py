"""The scheduler core's records of tasks, workers and jobs, as it keeps them between events."""

from __future__ import annotations

from dataclasses import dataclass, field

from sortedcontainers import SortedList

from broker.events import FileSpec

TASK_STATES = ("queued", "running", "done", "failed", "cancelled")
JOB_STATES = ("running", "finished", "cancelled")


@dataclass
class Task:
    id: str
    job: Job
    index: int
    spec: FileSpec
    seeded_to: str | None = None
    owner: str | None = None  # worker whose queue holds it, while queued
    state: str = "queued"  # queued | running | done | failed | cancelled
    running_on: set[str] = field(default_factory=set)  # living workers running a copy
    lost_to: set[str] = field(default_factory=set)  # workers taken out while running it; their result still counts
    excluded: set[str] = field(default_factory=set)  # workers it failed on
    attempts: list[dict[str, str]] = field(default_factory=list)

    @property
    def cost(self) -> int:
        return self.spec.residues

    @property
    def key(self) -> tuple[int, int, int, str]:
        # Queue order: older job first, then largest file first.
        return (self.job.seq, -self.cost, self.index, self.id)


@dataclass
class WorkerStats:
    files: int = 0
    residues: int = 0
    busy_seconds: float = 0.0
    stolen: int = 0


@dataclass
class Worker:
    id: str
    name: str
    host: str
    gpu: str
    weight: float
    stages: tuple[str, ...]
    last_seen: float
    alive: bool = True
    running: str | None = None
    running_since: float = 0.0
    idle_since: float = 0.0
    queue: SortedList = field(default_factory=SortedList)
    queued_cost: int = 0
    speed: float | None = None  # observed residues/s, moving average
    finish_key: tuple[float, str] | None = None  # its entry in Scheduler._finishers
    done_files: int = 0
    steals_in: int = 0
    steals_out: int = 0
    gauges: dict[str, float] | None = None
    per_job: dict[str, WorkerStats] = field(default_factory=dict)


@dataclass
class Job:
    id: str
    seq: int
    stage: str
    output_dir: str
    weighted: bool
    steal: bool
    submitted: float
    sealed: bool = True  # False while the client may still add files
    tasks: list[Task] = field(default_factory=list)
    residues: int = 0  # the cost of all its tasks
    done: int = 0
    failed: int = 0
    residues_done: int = 0
    steals: int = 0
    finished: float | None = None
    state: str = "running"  # running | finished | cancelled

    @property
    def open(self) -> bool:
        return self.state == "running"
