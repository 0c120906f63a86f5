"""The scheduler core's records of tasks, workers and jobs, as it keeps them between events."""

from __future__ import annotations

from dataclasses import dataclass, field

from sortedcontainers import SortedList

from broker.events import FileSpec

TASK_STATES = ("queued", "running", "done", "failed", "cancelled")
JOB_STATES = ("running", "finished", "cancelled")


@dataclass(slots=True, eq=False)
class Task:
    id: str
    job: Job
    index: int
    spec: FileSpec
    seeded_to: str | None = None
    owner: str | None = None  # worker whose queue holds it, while queued
    state: str = "queued"  # queued | running | done | failed | cancelled
    # Sets of worker ids. Immutable, replaced when they change: most tasks never hold any, and a job of
    # 200,000 tasks that allocated five containers each would keep the garbage collector busy for seconds.
    running_on: frozenset[str] = frozenset()  # living workers running a copy
    # Living workers whose copy ran to the end and is being published: its result is due, and they run other
    # files meanwhile.
    finishing_on: frozenset[str] = frozenset()
    # The worker of running_on or finishing_on whose copy is a backup (at most one at a time).
    backup: str | None = None
    lost_to: frozenset[str] = frozenset()  # workers taken out while running it; their result still counts
    revoked: frozenset[str] = frozenset()  # workers told to drop their copy; their result is discarded
    excluded: frozenset[str] = frozenset()  # workers it failed on
    attempts: tuple[dict[str, str], ...] = ()  # stage errors: {"worker": name, "reason": why}
    died_on: frozenset[str] = frozenset()  # workers that died (or left) while running it
    deaths: tuple[dict[str, str], ...] = ()  # those deaths: {"worker": name, "reason": why}; not attempts
    # Fixed at creation, read at every decision: plain attributes rather than properties.
    cost: int = field(init=False)  # its residues
    key: tuple[int, int, int, str] = field(init=False)  # queue order: older job first, then largest file first

    def __post_init__(self) -> None:
        self.cost = self.spec.residues
        self.key = (self.job.seq, -self.cost, self.index, self.id)

    @property
    def in_flight(self) -> bool:
        """A living worker runs a copy or is publishing one."""
        return bool(self.running_on or self.finishing_on)


@dataclass
class WorkerStats:
    files: int = 0
    residues: int = 0
    busy_seconds: float = 0.0
    stolen: int = 0
    backups: int = 0  # files it finished as a backup copy, before the copy it backed up
    wasted_seconds: float = 0.0  # spent on copies revoked because another copy of the file finished first


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
    # The file it ran to the end and is publishing (its result is due), when that copy started and when it ended.
    finishing: str | None = None
    finishing_since: float = 0.0
    finishing_at: float = 0.0
    idle_since: float = 0.0
    queue: SortedList = field(default_factory=SortedList)
    queued_cost: int = 0
    speed: float | None = None  # observed residues/s, moving average
    finish_key: tuple[float, str] | None = None  # its entry in Scheduler._finishers
    running_key: tuple[float, str] | None = None  # its entry in Scheduler._running_ends
    overdue: bool = False  # its running file is overdue (found at a tick)
    # The running file's progress as its heartbeats report it (None until one does) and when it last grew.
    progress: int | None = None
    progress_at: float = 0.0
    stuck: str | None = None  # a task it was told to abandon (no progress) and may still be blocked in
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
    backup: bool  # backup copies of straggling files, when steal is on too
    submitted: float
    sealed: bool = True  # False while the client may still add files
    tasks: list[Task] = field(default_factory=list)
    residues: int = 0  # the cost of all its tasks
    done: int = 0
    failed: int = 0
    residues_done: int = 0
    steals: int = 0
    backups: int = 0  # backup copies started
    backups_won: int = 0  # files a backup copy finished first
    wasted_seconds: float = 0.0  # run by copies revoked because another copy finished first
    finished: float | None = None
    state: str = "running"  # running | finished | cancelled

    @property
    def open(self) -> bool:
        return self.state == "running"

    @property
    def backs_up(self) -> bool:
        """Whether an idle worker may run a backup copy of this job's straggling files."""
        return self.open and self.steal and self.backup
