"""Scheduler core: a pure state machine from broker events to instructions.

No sockets, threads or clock: the server (or broker.simulator) feeds it
events that carry the current time and performs the instructions it returns.
The vocabulary is in broker.events, the records in broker.state, what it
reports in broker.reports. Policy (docs/architecture.md):

- seeding: a submitted job's files go to the capable workers by weighted
  bin-packing (largest first, to the worker that would finish it earliest);
- each worker runs its own queue, largest file first; at the tail a slower
  worker whose next file would end after a faster worker's queue exchanges
  it for that worker's smaller next file when both then end sooner (the
  fastest workers run the largest files);
- stealing (if the job allows it): a worker with nothing queued takes, from
  the workers predicted to finish last (latest first), the largest queued
  file it would finish before that worker's queue would end;
- backup copies (with stealing, unless the job turns them off): an idle
  worker with nothing to take runs a copy of a file in flight elsewhere when
  it would finish that copy sooner than the holder is predicted to; the first
  copy to finish wins and the other is revoked at once;
- overdue files: a running file past OVERDUE_FACTOR times its predicted time,
  and at least OVERDUE_MARGIN seconds over, may get a backup from any idle
  worker, and the files queued behind it may be stolen by any idle worker;
- idle workers are offered work whenever files are queued, at every tick,
  and when the result of the file they published while waiting arrives;
- publishing: a worker that ran its file to the end asks for the next one
  while it makes the output durable (`finishing`); the file stays in flight
  on it, beyond steals and backups, until its result comes;
- leases: a worker silent for `worker_timeout` is dead, and its queued,
  running and publishing files go back to the living; a file that fails `max_attempts` times
  is failed with every reason, and the job goes on;
- open jobs: a job submitted unsealed takes more files (seeded as they come,
  like submitted ones) until the client seals it, and it finishes only once
  sealed with every task ended;
- task timeouts: a running file whose worker reports no progress for the task
  timeout fails on that worker (an attempt) and is revoked with `abandon`;
  until the worker shows it let go, it gets no work and its queue goes to
  the others at once;
- bounded state: a dead worker is forgotten `forget_after` seconds after it
  was last heard (once no job still kept counts files it ran), and a
  submission that would take the open tasks past `max_queued_tasks` is
  refused;
- deaths are not errors: a worker dying (or leaving) while it runs a file is
  counted apart from the file's failed attempts, and the file fails for
  deaths only once `max_deaths` different workers died running it.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sortedcontainers import SortedList

from broker.events import (
    Assign,
    Event,
    FilesAdded,
    FileSpec,
    Heartbeat,
    Instruction,
    JobCancelled,
    JobFinished,
    JobSealed,
    JobSubmitted,
    Log,
    Notice,
    Refused,
    Reregister,
    Revoke,
    TaskFailed,
    TaskSucceeded,
    Tick,
    WorkerJoined,
    WorkerLeft,
    WorkRequested,
    task_id,
)
from broker.protocol import MAX_JOB_FILES, UNTIMED_STAGES, ErrorCode
from broker.records import TaskDone, WorkerSummary
from broker.reports import job_report, status_snapshot
from broker.state import JOB_STATES, TASK_STATES, Job, Task, Worker, WorkerStats
from virnucpro.pipeline.gpu_weights import assign_files_weighted

# Weight of the newest file in a worker's moving-average speed: high enough that a GPU that slows down (throttled,
# shared) is seen within two or three files, so its last files get backup copies (0.3 took twice as many; on real
# processes, bench_peers' slowdown case went from 1.065 to 1.038 of the bound).
SPEED_SMOOTHING = 0.5
# A worker that says it is idle this long after an assignment never got it; one that says it is idle this long
# after its copy was revoked is waiting for work.
LOST_ASSIGNMENT_GRACE = 3.0
# How many of the latest finishers a thief considers as victims.
VICTIMS_CONSIDERED = 3
# How many running files, from each end of the predicted-end index, an idle worker considers backing up.
HOLDERS_CONSIDERED = 4
# A measured worker's running file is late (taken to be halfway) past this many times its predicted time.
LATE_TOLERANCE = 1.2
# A running file is overdue past this many times its predicted time and at least this many seconds over it.
OVERDUE_FACTOR = 3.0
OVERDUE_MARGIN = 60.0
# Ticks further apart than this share of the lease mean the broker itself was not listening (busy, suspended):
# silence before such a tick is not held against the workers.
DEAF_SHARE = 0.5
# Ended jobs kept for status and late results; older ones are forgotten so a long-lived broker stays small.
KEEP_ENDED_JOBS = 100
# How many recent deaths are remembered to tell deaths that come together (the machines) from a file's.
RECENT_DEATHS = 256
# Without --task-timeout: a model stage's file may show no progress for this long before it fails on its worker;
# a synthetic file (no model: a stand-in whose time is known) for this many times its predicted time, at least
# MIN_SYNTHETIC_TIMEOUT seconds (its progress is seen only at heartbeats).
MODEL_TASK_TIMEOUT = 30 * 60.0
SYNTHETIC_STAGE = "synthetic"
SYNTHETIC_TIMEOUT_FACTOR = 10.0
MIN_SYNTHETIC_TIMEOUT = 30.0


class InvariantError(AssertionError):
    """The core's derived bookkeeping disagrees with its primary state: a bug in the core, never bad input."""


class ExactSum:
    """A sum of floats kept exactly, as an integer number of 2**-1074 (the smallest float).

    Adding and removing costs O(1) and never drifts: once every value added
    has been removed the sum is exactly zero, which a float running sum is
    not (1.0 + 1.2 - 1.0 - 1.2 leaves 2.2e-16).
    """

    _SHIFT = 1074

    def __init__(self, values: Iterable[float] = ()) -> None:
        self.units = sum(map(self._units, values))

    @classmethod
    def _units(cls, value: float) -> int:
        numerator, denominator = float(value).as_integer_ratio()
        return numerator << (cls._SHIFT - denominator.bit_length() + 1)

    def add(self, value: float) -> None:
        self.units += self._units(value)

    def remove(self, value: float) -> None:
        self.units -= self._units(value)

    def __truediv__(self, other: ExactSum) -> float:
        return self.units / other.units  # integers: correctly rounded

    def __float__(self) -> float:
        return self.units / (1 << self._SHIFT)


class Scheduler:
    """Queues, seeding, stealing, backup copies, leases and retries for every job the broker holds."""

    def __init__(self, *, worker_timeout: float = 10.0, max_attempts: int = 3, max_deaths: int = 5,
                 task_timeout: float | None = None, forget_after: float = 3600.0,
                 max_queued_tasks: int = 1_000_000, max_job_files: int = MAX_JOB_FILES) -> None:
        if worker_timeout <= 0 or max_attempts < 1 or max_deaths < 1 or task_timeout is not None and task_timeout <= 0:
            raise ValueError("worker_timeout and task_timeout must be > 0, max_attempts and max_deaths >= 1")
        if forget_after <= 0 or max_queued_tasks < 1 or max_job_files < 1:
            raise ValueError("forget_after must be > 0, max_queued_tasks and max_job_files >= 1")
        self.forget_after = forget_after
        self.max_queued_tasks = max_queued_tasks
        self.max_job_files = max_job_files
        self.worker_timeout = worker_timeout
        self.task_timeout = task_timeout  # None: per stage (MODEL_TASK_TIMEOUT, or from the synthetic prediction)
        self.max_attempts = max_attempts
        self.max_deaths = max_deaths
        # When recent workers died (or left), newest last: deaths that come together are not a file's fault.
        self._recent_deaths: deque[tuple[float, str]] = deque(maxlen=RECENT_DEATHS)
        self.max_job_files = max_job_files
        self.workers: dict[str, Worker] = {}
        self.jobs: dict[str, Job] = {}
        self.tasks: dict[str, Task] = {}
        self.unowned: SortedList = SortedList()  # queued task keys with no capable living worker
        self.counters: dict[str, int] = {}
        self._finishers: SortedList = SortedList()  # (predicted finish, worker id) of workers with a queue
        self._running_ends: SortedList = SortedList()  # (predicted end of its running file, worker id)
        self._overdue: dict[str, Worker] = {}  # workers whose running file is overdue
        self._waiting: dict[str, Worker] = {}  # living workers that asked for work and got none yet
        # Who is offered work at the end of the current event: everyone waiting (files were queued, or a
        # tick), or only the workers that began waiting during it.
        self._offer_all = False
        self._offer: dict[str, Worker] = {}
        # Living workers split by whether they have an observed speed yet.
        self._measured: dict[str, Worker] = {}
        self._unmeasured: dict[str, Worker] = {}
        # Exact sums over the living measured workers, so the scale costs nothing to read or to update.
        self._measured_speed = ExactSum()
        self._measured_weight = ExactSum()
        self._last_tick: float | None = None
        self._listening_since = -math.inf  # the end of the broker's latest deaf spell
        self._job_seq = itertools.count()
        self._handlers: dict[type, Callable[[Any], list[Instruction]]] = {
            WorkerJoined: self._on_joined,
            WorkRequested: self._on_requested,
            TaskSucceeded: self._on_succeeded,
            TaskFailed: self._on_failed,
            Heartbeat: self._on_heartbeat,
            WorkerLeft: self._on_left,
            Tick: self._on_tick,
            JobSubmitted: self._on_submitted,
            FilesAdded: self._on_files_added,
            JobSealed: self._on_sealed,
            JobCancelled: self._on_cancelled,
        }

    @property
    def unowned_count(self) -> int:
        """Queued files no living worker can run yet."""
        return len(self.unowned)

    @property
    def measured(self) -> bool:
        """True once a living worker has an observed speed."""
        return bool(self._measured)

    def status(self, now: float, page: int = 0) -> dict[str, Any]:
        """A snapshot of workers, jobs and counters for `virnucpro-broker status`: page `page` of them."""
        return status_snapshot(self, now, page)

    @property
    def open_tasks(self) -> int:
        """Files of running jobs (sealed or not) not yet done or failed: queued, running, or waiting for a worker."""
        return sum(len(job.tasks) - job.done - job.failed for job in self.jobs.values() if job.open)

    def refusal(self, files: int) -> str | None:
        """Why a submission of `files` files must be refused now, or None: it would exceed max_queued_tasks."""
        held = self.open_tasks
        if held + files > self.max_queued_tasks:
            return (f"the broker holds {held:,} unfinished files and takes at most {self.max_queued_tasks:,} "
                    f"(--max-queued-tasks); this job has {files:,}: submit it when others have finished, or in parts")
        return None

    def handle(self, event: Event) -> list[Instruction]:
        """Apply one event; return what the server must do, in order (assignments last)."""
        out = self._handlers[type(event)](event)
        if self._offer_all or self._offer:
            out += self._dispatch(event.now)
        return out

    def count(self, reason: str) -> None:
        """Count a dropped message or a discarded event under `reason`."""
        self.counters[reason] = self.counters.get(reason, 0) + 1

    # ------------------------------------------------------------ speeds

    def scale(self) -> float:
        """Residues/s per unit of weight, from the living workers measured so far (1.0 before any)."""
        return self._measured_speed / self._measured_weight if self._measured_weight.units else 1.0

    def _set_alive(self, worker: Worker, alive: bool) -> None:
        if worker.alive == alive:
            return
        worker.alive = alive
        group = self._measured if worker.speed else self._unmeasured
        if alive:
            group[worker.id] = worker
        else:
            del group[worker.id]
            self._waiting.pop(worker.id, None)
            worker.stuck = None
        if worker.speed:
            (self._measured_speed.add if alive else self._measured_speed.remove)(worker.speed)
            (self._measured_weight.add if alive else self._measured_weight.remove)(worker.weight)
            self._reindex_unmeasured()

    def _set_speed(self, worker: Worker, speed: float) -> None:
        if worker.alive:
            if worker.speed:
                self._measured_speed.remove(worker.speed)
            else:
                del self._unmeasured[worker.id]
                self._measured[worker.id] = worker
                self._measured_weight.add(worker.weight)
            self._measured_speed.add(speed)
        worker.speed = speed
        if worker.alive:
            self._reindex_unmeasured()

    def speed_of(self, worker: Worker, scale: float | None = None) -> float:
        """Observed speed once measured, else the weight on the measured workers' scale."""
        if worker.speed:
            return worker.speed
        return worker.weight * (self.scale() if scale is None else scale)

    def remaining(self, worker: Worker, now: float, scale: float | None = None) -> float:
        """Seconds `worker` is predicted still to need for its running file (0.0 if it runs none).

        Until the file is late, what its prediction leaves (nothing once the
        prediction is used up). A late file counts as partly done, not done:
        it is taken to be halfway, needing as long again as it has run so far.
        Lateness says only that the worker is slower than predicted, by an
        unknown factor; with nothing known about that factor (a duration of
        any scale equally likely), the median total of a run that has lasted
        t is 2t. So the estimate grows while the file stays late, and a
        straggler soon looks slower than a copy elsewhere would be.

        A file is late once it overruns its prediction when the worker is not
        measured yet (the prediction is the weight table's guess), and past
        LATE_TOLERANCE times it when the worker is (its speed is known, and a
        small overrun is noise: the file's contents, a busy host).
        """
        if worker.running is None:
            return 0.0
        predicted = self.tasks[worker.running].cost / self.speed_of(worker, scale)
        elapsed = now - worker.running_since
        if elapsed < predicted * (LATE_TOLERANCE if worker.speed else 1.0):
            return max(predicted - elapsed, 0.0)
        return elapsed

    def predicted_finish(self, worker: Worker, now: float, scale: float | None = None) -> float:
        """When `worker` would finish its running file and then its queue.

        A running file past its predicted end is taken to end now, unlike in
        `remaining`: a thief takes a queued file only if it would surely
        finish it sooner, so the victim's queue end is never overstated.
        """
        speed = self.speed_of(worker, scale)
        start = now
        if worker.running is not None:
            start = max(now, worker.running_since + self.tasks[worker.running].cost / speed)
        return start + worker.queued_cost / speed

    def is_overdue(self, worker: Worker, now: float, scale: float | None = None) -> bool:
        """Whether `worker`'s running file is past OVERDUE_FACTOR x its predicted time and OVERDUE_MARGIN s over."""
        if worker.running is None:
            return False
        predicted = self.tasks[worker.running].cost / self.speed_of(worker, scale)
        elapsed = now - worker.running_since
        return elapsed > OVERDUE_FACTOR * predicted and elapsed - predicted >= OVERDUE_MARGIN

    def _reindex(self, worker: Worker, scale: float | None = None) -> None:
        """Keep `worker`'s entries in the finish-time and running-end indexes current."""
        if worker.finish_key is not None:
            self._finishers.discard(worker.finish_key)
            worker.finish_key = None
        if worker.running_key is not None:
            self._running_ends.discard(worker.running_key)
            worker.running_key = None
        if not worker.alive:
            return
        if worker.queue:
            base = worker.running_since if worker.running is not None else worker.idle_since
            worker.finish_key = (self.predicted_finish(worker, base, scale), worker.id)
            self._finishers.add(worker.finish_key)
        if worker.running is not None:
            worker.running_key = (worker.running_since + self.remaining(worker, worker.running_since, scale), worker.id)
            self._running_ends.add(worker.running_key)

    def _reindex_unmeasured(self) -> None:
        # A new scale moves every unmeasured worker's prediction.
        scale = self.scale()
        for worker in self._unmeasured.values():
            if worker.queue or worker.running is not None:
                self._reindex(worker, scale)

    # ------------------------------------------------------------ queues

    def _enqueue(self, worker: Worker, task: Task, offer: bool = True) -> None:
        """Queue `task` for `worker`; offer=False: no waiting worker is offered work for it (a dispatch in progress
        moved it, and reaches the rest of the waiting workers itself)."""
        task.owner = worker.id
        task.state = "queued"
        worker.queue.add(task.key)
        worker.queued_cost += task.cost
        self._reindex(worker)
        self._offer_all = self._offer_all or offer

    def _dequeue(self, task: Task, reindex: bool = True) -> None:
        """Take `task` out of its queue (or the unowned pool). reindex=False: the caller reindexes the owner."""
        if task.owner is not None:
            worker = self.workers[task.owner]
            worker.queue.remove(task.key)
            worker.queued_cost -= task.cost
            task.owner = None
            if reindex:
                self._reindex(worker)
        else:
            self.unowned.discard(task.key)

    def capable(self, stage: str) -> list[Worker]:
        """The living workers that serve `stage`, less those still stuck in a file they were told to abandon."""
        return [w for w in self.workers.values() if w.alive and stage in w.stages and w.stuck is None]

    def _distribute(self, tasks: Iterable[Task], now: float, weights_from: str) -> None:
        """Pack queued tasks onto capable living workers, on top of what they already hold.

        weights_from: "equal" (all 1.0), "table" (predicted weights) or "speed"
        (observed speeds, for files handed back mid-job). Tasks no living
        worker can run wait in the unowned pool for the next capable worker.
        """
        by_stage: dict[str, list[Task]] = {}
        for task in tasks:
            task.state = "queued"
            by_stage.setdefault(task.job.stage, []).append(task)
        for stage, group in by_stage.items():
            workers = self.capable(stage)
            if not workers:
                for task in group:
                    self.unowned.add(task.key)
                self._offer_all = True
                continue
            scale = self.scale()
            if weights_from == "speed":
                weights = [self.speed_of(w, scale) for w in workers]
                loads = [(self.predicted_finish(w, now, scale) - now) * s for w, s in zip(workers, weights, strict=True)]
            else:
                weights = [1.0 if weights_from == "equal" else w.weight for w in workers]
                loads = [float(w.queued_cost) for w in workers]
            packed = assign_files_weighted(group, len(workers), weights, costs=[t.cost for t in group], loads=loads)
            for worker, assigned in zip(workers, packed, strict=True):
                kept = [t for t in assigned if worker.id not in t.excluded]
                for task in assigned:
                    if worker.id in task.excluded:
                        self._enqueue(self._retry_target(task, worker, workers, now, scale), task)
                self._enqueue_all(worker, kept)

    def _enqueue_all(self, worker: Worker, tasks: list[Task]) -> None:
        """_enqueue for many tasks at once: one sorted merge and one reindex instead of one per task."""
        if not tasks:
            return
        for task in tasks:
            task.owner = worker.id
            task.state = "queued"
        worker.queue.update(task.key for task in tasks)
        worker.queued_cost += sum(task.cost for task in tasks)
        self._reindex(worker)
        self._offer_all = True

    def _retry_target(self, task: Task, worker: Worker, workers: list[Worker], now: float, scale: float) -> Worker:
        """`worker`, unless the file already failed there: then the earliest finisher it has not failed on."""
        if worker.id not in task.excluded:
            return worker
        others = [w for w in workers if w.id not in task.excluded]
        if not others:
            return worker  # it failed on every living worker; a retry anywhere is the only retry left
        return min(others, key=lambda w: (self.predicted_finish(w, now, scale) + task.cost / self.speed_of(w, scale), w.id))

    # ------------------------------------------------------------ copies

    def _start_copy(self, worker: Worker, task: Task, now: float) -> None:
        worker.running = task.id
        worker.running_since = now
        worker.progress, worker.progress_at = None, now
        task.state = "running"
        task.running_on |= {worker.id}
        self._reindex(worker)

    def _end_copy(self, worker: Worker, now: float) -> Task:
        """Detach `worker` from the copy it runs; return the task. The task's state is the caller's to settle."""
        assert worker.running is not None
        task = self.tasks[worker.running]
        task.running_on -= {worker.id}
        if task.backup == worker.id:
            task.backup = None
        worker.running = None
        worker.idle_since = now
        if worker.overdue:
            worker.overdue = False
            del self._overdue[worker.id]
        self._reindex(worker)
        return task

    def _start_finishing(self, worker: Worker, now: float) -> None:
        """`worker` ran its file to the end and publishes the output while it runs the next: its result is due."""
        assert worker.running is not None
        since = worker.running_since
        task = self.tasks[worker.running]
        backup = task.backup
        self._end_copy(worker, now)
        task.backup = backup  # a backup copy stays one until its result says who won
        task.finishing_on |= {worker.id}
        worker.finishing, worker.finishing_since, worker.finishing_at = task.id, since, now

    def _end_finishing(self, worker: Worker) -> Task:
        """Detach `worker` from the copy it publishes; return the task. The task's state is the caller's to settle."""
        assert worker.finishing is not None
        task = self.tasks[worker.finishing]
        task.finishing_on -= {worker.id}
        if task.backup == worker.id:
            task.backup = None
        worker.finishing = None
        return task

    def _copy_started(self, worker_id: str, task: Task) -> float:
        """When the copy of `task` that `worker_id` runs or publishes started."""
        worker = self.workers[worker_id]
        return worker.running_since if worker.running == task.id else worker.finishing_since

    def _revoke_copies(self, task: Task, now: float) -> list[Instruction]:
        """Tell every worker still running or publishing a copy of `task` to drop it; their results will be
        discarded (a copy being published finds the output already there and publishes nothing)."""
        out: list[Instruction] = []
        for worker_id in sorted(task.running_on | task.finishing_on):
            worker = self.workers[worker_id]
            out.append(Revoke(worker_id, task.id))
            task.revoked |= {worker_id}
            if worker.running == task.id:
                self._end_copy(worker, now)
            else:
                self._end_finishing(worker)
        return out

    # ------------------------------------------------------------ events

    def _on_joined(self, event: WorkerJoined) -> list[Instruction]:
        out: list[Instruction] = []
        worker = self.workers.get(event.worker)
        if worker is not None and worker.alive:
            # A live worker registering again reconnected: treat its old session as over.
            out += self._take_out(worker, event.now, reason=None)
        taken = {w.name for w in self.workers.values() if w.alive and w.id != event.worker}
        name = event.name
        for n in itertools.count(2):
            if name not in taken:
                break
            name = f"{event.name}#{n}"
        if worker is None:
            worker = Worker(
                id=event.worker, name=name, host=event.host, gpu=event.gpu, weight=event.weight,
                stages=tuple(event.stages), last_seen=event.now, idle_since=event.now, alive=False,
            )
            self.workers[event.worker] = worker
        else:
            worker.name, worker.host, worker.gpu, worker.weight = name, event.host, event.gpu, event.weight
            worker.stages, worker.last_seen, worker.idle_since = tuple(event.stages), event.now, event.now
        self._set_alive(worker, True)
        out.append(Notice(f"worker {name} joined: {event.gpu} on {event.host}, weight {event.weight:.2f}"))
        return out

    def _on_requested(self, event: WorkRequested) -> list[Instruction]:
        worker = self.workers.get(event.worker)
        if worker is None or not worker.alive:
            self.count("request from unknown worker")
            return [Reregister(event.worker)]
        worker.last_seen = event.now
        worker.stuck = None  # it asks for work, so it runs nothing
        out: list[Instruction] = []
        if event.finishing is not None and event.finishing == worker.running:
            if worker.finishing is not None:
                # The worker reports one file's result before it says it finished the next: this one's was lost.
                out += self._result_lost(worker, event.now)
            self._start_finishing(worker, event.now)
        elif worker.running is not None:
            # It asks for work, so it is not running what we think it runs.
            out += self._assignment_lost(worker, event.now)
        self._wait(worker)
        return out

    def _wait(self, worker: Worker) -> None:
        self._waiting[worker.id] = worker
        self._offer[worker.id] = worker

    def _on_heartbeat(self, event: Heartbeat) -> list[Instruction]:
        worker = self.workers.get(event.worker)
        if worker is None or not worker.alive:
            self.count("heartbeat from unknown worker")
            return [Reregister(event.worker)]
        worker.last_seen = event.now
        worker.gauges = event.gauges
        if worker.stuck is not None and event.task != worker.stuck:
            worker.stuck = None  # it let go of the file it was told to abandon
        if worker.running is not None and event.task == worker.running and event.progress is not None:
            if event.progress != (worker.progress or 0):  # the worker counts each task's progress from 0
                worker.progress_at = event.now
            worker.progress = event.progress
        if (
            worker.running is not None
            and event.task != worker.running
            and event.now - worker.running_since > LOST_ASSIGNMENT_GRACE
        ):
            return self._assignment_lost(worker, event.now)
        if (
            worker.running is None
            and event.task is None
            and worker.id not in self._waiting
            and event.now - worker.idle_since > LOST_ASSIGNMENT_GRACE
        ):
            # Idle this long and not asking: it never got the file whose copy was then revoked (or its request was
            # lost), so it waits for work without saying so again.
            self.count("idle worker that never asked again")
            self._wait(worker)
        return []

    def _assignment_lost(self, worker: Worker, now: float) -> list[Instruction]:
        task = self._end_copy(worker, now)
        self._wait(worker)
        self.count("assignment lost in transit")
        if task.state == "running" and not task.in_flight:
            self._enqueue(worker, task)
        return [Notice(f"worker {worker.name} never started {task.spec.path}; queued again")]

    def _result_lost(self, worker: Worker, now: float) -> list[Instruction]:
        task = self._end_finishing(worker)
        task.lost_to |= {worker.id}  # should it come after all, it still counts
        self.count("result lost in transit")
        if task.state == "running" and not task.in_flight:
            self._distribute([task], now, weights_from="speed")
        return [Notice(f"worker {worker.name} never reported {task.spec.path}; queued again")]

    def _finish_copy(self, worker: Worker, task: Task, now: float) -> str | None:
        """Detach a reporting worker from its copy of `task`.

        Returns "running" for a copy it was running, "lost" for one it ran
        when it was taken out of service, "revoked" for one it was told to
        drop, None if it had none.
        """
        if worker.id in task.running_on:
            self._end_copy(worker, now)
            copy = "running"
        elif worker.id in task.finishing_on:
            self._end_finishing(worker)
            copy = "running"
        elif worker.id in task.lost_to:
            task.lost_to -= {worker.id}
            copy = "lost"
        elif worker.id in task.revoked:
            task.revoked -= {worker.id}
            copy = "revoked"
            if worker.stuck == task.id:
                worker.stuck = None  # the file it was told to abandon did end
        else:
            return None
        if worker.alive:
            worker.last_seen = now
        return copy

    def _on_succeeded(self, event: TaskSucceeded) -> list[Instruction]:
        worker = self.workers.get(event.worker)
        task = self.tasks.get(event.task)
        by_backup = task is not None and task.backup == event.worker
        copy = None if worker is None or task is None else self._finish_copy(worker, task, event.now)
        if worker is None or task is None or copy is None:
            self.count("result for a task the worker was not running")
            return []
        if copy == "revoked":
            self.count("result of a revoked copy discarded")
            return []
        job = task.job
        late_success = task.state == "failed" and job.open
        if task.state not in ("queued", "running") and not late_success:
            self.count("duplicate result discarded")
            return []
        out: list[Instruction] = []
        if late_success:
            job.failed -= 1
        self._dequeue(task)
        task.state = "done"
        job.done += 1
        job.residues_done += task.cost
        for other in task.running_on | task.finishing_on:
            wasted = event.now - self._copy_started(other, task)
            job.wasted_seconds += wasted
            self._stats(self.workers[other], job).wasted_seconds += wasted
        out += self._revoke_copies(task, event.now)
        if by_backup:
            job.backups_won += 1
            self._stats(worker, job).backups += 1
        if not event.skipped:
            out.append(self._record_done(worker, task, event.seconds, event.now, by_backup))
        if self._waiting.get(worker.id) is worker:
            # It asked for work while it published this output; what it now knows of its speed may open a steal or
            # a backup copy that its request could not.
            self._offer[worker.id] = worker
        return out + self._maybe_finish(job, event.now)

    @staticmethod
    def _stats(worker: Worker, job: Job) -> WorkerStats:
        return worker.per_job.setdefault(job.id, WorkerStats())

    def _record_done(self, worker: Worker, task: Task, seconds: float, now: float, backup: bool) -> Log:
        job = task.job
        stolen = task.seeded_to is not None and task.seeded_to != worker.id
        stats = self._stats(worker, job)
        stats.files += 1
        stats.residues += task.cost
        stats.busy_seconds += seconds
        stats.stolen += int(stolen)
        worker.done_files += 1
        # A classify task's time says nothing of the device's speed: it leaves the observed speed as it is.
        if seconds > 0 and task.cost > 0 and job.stage not in UNTIMED_STAGES:
            observed = task.cost / seconds
            self._set_speed(worker, observed if not worker.speed else (
                SPEED_SMOOTHING * observed + (1 - SPEED_SMOOTHING) * worker.speed
            ))
            self._reindex(worker)
        return Log(TaskDone(
            time=now, job=job.id, stage=job.stage,
            worker=worker.name, host=worker.host, gpu=worker.gpu,
            predicted_weight=worker.weight, file=task.spec.path,
            sequences=task.spec.sequences, residues=task.cost, seconds=seconds,
            residues_per_s=task.cost / seconds if seconds > 0 else None,
            stolen=stolen, backup=backup,
        ))

    def _on_failed(self, event: TaskFailed) -> list[Instruction]:
        worker = self.workers.get(event.worker)
        task = self.tasks.get(event.task)
        copy = None if worker is None or task is None else self._finish_copy(worker, task, event.now)
        if worker is None or task is None or copy is None:
            self.count("result for a task the worker was not running")
            return []
        if copy == "revoked":
            self.count("result of a revoked copy discarded")
            return []
        if task.state != "running" or copy == "lost":
            # A lost copy's failure was settled when its worker was taken out.
            return []
        return self._attempt_failed(task, worker, event.reason, event.now)

    def _attempt_failed(self, task: Task, worker: Worker, reason: str, now: float) -> list[Instruction]:
        task.attempts += ({"worker": worker.name, "reason": reason},)
        task.excluded |= {worker.id}
        if task.in_flight:
            return []  # another copy is still running
        if len(task.attempts) >= self.max_attempts:
            return self._fail_task(task, f"failed after {len(task.attempts)} attempts", now)
        self._distribute([task], now, weights_from="speed")
        return [Notice(f"{task.spec.path} failed on {worker.name} ({reason}); queued for another worker")]

    def _died_running(self, task: Task, worker: Worker, reason: str, now: float, since: float) -> list[Instruction]:
        """`worker` died (or left) while running `task` (since `since`): a death, counted apart from its attempts.

        A death counts against the file only if no other worker was found dead while the file ran there: deaths
        that come together (a node lost, jobs preempted, a kill storm) say something about the machines, not the
        file, which a file that kills its workers does alone, one worker after another. Each death is listed.
        """
        others = sum(1 for at, other in self._recent_deaths if at > since and other != worker.id)
        if others:
            reason += f" (not counted: {others} other workers died meanwhile)"
        else:
            task.died_on |= {worker.id}
        task.deaths += ({"worker": worker.name, "reason": reason},)
        if task.in_flight:
            return []  # another copy is still running
        if len(task.died_on) >= self.max_deaths:
            return self._fail_task(task, f"failed: {len(task.died_on)} different workers died running it", now)
        self._distribute([task], now, weights_from="speed")
        return [Notice(f"{task.spec.path}: {reason}; queued again (death {len(task.died_on)} of {self.max_deaths} "
                       "counted)")]

    def _fail_task(self, task: Task, why: str, now: float) -> list[Instruction]:
        task.state = "failed"
        task.job.failed += 1
        out: list[Instruction] = [Notice(f"{task.spec.path} {why}")]
        return out + self._maybe_finish(task.job, now)

    def _on_left(self, event: WorkerLeft) -> list[Instruction]:
        worker = self.workers.get(event.worker)
        if worker is None or not worker.alive:
            return []
        return self._take_out(worker, event.now, reason="worker left while running it")

    def _on_tick(self, event: Tick) -> list[Instruction]:
        now = event.now
        if self._last_tick is not None and now - self._last_tick > DEAF_SHARE * self.worker_timeout:
            self._listening_since = now  # it could not hear them: their silence until now proves nothing
        self._last_tick = now
        out: list[Instruction] = []
        cutoff = now - self.worker_timeout  # heard before this (and since the broker listened): silent too long
        if self._listening_since < cutoff:
            for worker in [w for w in self.workers.values() if w.alive and w.last_seen < cutoff]:
                quiet = now - worker.last_seen
                out.append(Notice(f"worker {worker.name} silent for {quiet:.1f} s: declared dead"))
                out += self._take_out(worker, now, reason=f"worker {worker.name} died (silent {quiet:.0f} s)")
        out += self._find_overdue(now)
        out += self._time_out_stalled(now)
        out += self._forget_dead(now)
        self._offer_all = True  # time passing opens steals and backup copies that were not worth it before
        return out

    def _find_overdue(self, now: float) -> list[Instruction]:
        """Flag the running files that became overdue: only those OVERDUE_MARGIN past their predicted end can be."""
        out: list[Instruction] = []
        scale = self.scale()
        for end, worker_id in self._running_ends:
            if end > now - OVERDUE_MARGIN:
                break
            worker = self.workers[worker_id]
            if worker.overdue or not self.is_overdue(worker, now, scale):
                continue
            worker.overdue = True
            self._overdue[worker_id] = worker
            assert worker.running is not None
            task = self.tasks[worker.running]
            out.append(Notice(f"{task.spec.path} is overdue on {worker.name}: running for "
                              f"{now - worker.running_since:.0f} s, predicted {end - worker.running_since:.0f} s"))
        return out

    def task_timeout_of(self, worker: Worker, task: Task, scale: float | None = None) -> float:
        """Seconds `task` may show no progress on `worker` before it fails there."""
        if self.task_timeout is not None:
            return self.task_timeout
        if task.job.stage != SYNTHETIC_STAGE:
            return MODEL_TASK_TIMEOUT
        predicted = task.cost / self.speed_of(worker, scale)
        return max(SYNTHETIC_TIMEOUT_FACTOR * predicted, MIN_SYNTHETIC_TIMEOUT)

    def _time_out_stalled(self, now: float) -> list[Instruction]:
        """Fail each running file whose worker reports no progress for its task timeout, and revoke it there.

        Only workers that report progress are timed out. The worker is told to
        abandon the file; until it shows it did (a heartbeat naming another
        task or none, a request, the revoked file's result) it gets no work,
        and the files queued for it go to the other workers now.
        """
        out: list[Instruction] = []
        scale = self.scale()
        stalled: list[tuple[Worker, float]] = []
        unpublished: list[tuple[Worker, float]] = []
        for w in self.workers.values():
            if w.running is not None and w.progress is not None:
                timeout = self.task_timeout_of(w, self.tasks[w.running], scale)
                if now - w.progress_at > timeout:
                    stalled.append((w, timeout))
            if w.finishing is not None:
                timeout = self.task_timeout_of(w, self.tasks[w.finishing], scale)
                if now - w.finishing_at > timeout:
                    unpublished.append((w, timeout))
        for worker, timeout in stalled:
            task = self._end_copy(worker, now)
            task.revoked |= {worker.id}
            worker.stuck = task.id
            out.append(Revoke(worker.id, task.id, abandon=True))
            queued = [self.tasks[key[-1]] for key in worker.queue]
            for other in queued:
                self._dequeue(other)
            self._distribute(queued, now, weights_from="speed")
            reason = f"no progress for {timeout:.0f} s (task timeout, --task-timeout); abandoned"
            out.append(Notice(f"{task.spec.path} on {worker.name}: {reason}"))
            out += self._attempt_failed(task, worker, reason, now)
        # A file run to the end whose output is not published within the task timeout (a write that never
        # returns): its copy fails there. The worker runs other files meanwhile, so it is not held back; if it
        # cannot let go of the write it restarts itself.
        for worker, timeout in unpublished:
            task = self._end_finishing(worker)
            task.revoked |= {worker.id}
            out.append(Revoke(worker.id, task.id, abandon=True))
            reason = f"output not published {timeout:.0f} s after the file ended (task timeout, --task-timeout)"
            out.append(Notice(f"{task.spec.path} on {worker.name}: {reason}"))
            out += self._attempt_failed(task, worker, reason, now)
        return out

    def _forget_dead(self, now: float) -> list[Instruction]:
        """Forget the workers dead for forget_after seconds, unless a job still kept counts files they ran.

        Their late results are no longer taken, and their records leave the
        status. Their names were freed when they died.
        """
        cutoff = now - self.forget_after
        gone = {w.id for w in self.workers.values() if not w.alive and w.last_seen < cutoff and not w.per_job}
        if not gone:
            return []
        for task in self.tasks.values():
            if task.lost_to & gone or task.revoked & gone:
                task.lost_to -= gone
                task.revoked -= gone
        for worker_id in gone:
            del self.workers[worker_id]
        self.counters["dead workers forgotten"] = self.counters.get("dead workers forgotten", 0) + len(gone)
        return [Notice(f"forgot {len(gone)} worker(s) dead for over {self.forget_after:g} s")]

    def _take_out(self, worker: Worker, now: float, reason: str | None) -> list[Instruction]:
        """Take a worker out of service and give its files to the living.

        `reason` is recorded as a death on the file it was running (not a failed
        attempt), so a file that kills every worker it touches ends as failed
        after `max_deaths` of them; None (a reconnect) queues that file again
        without counting anything. Either way the worker's late result for it
        is still accepted.
        """
        out: list[Instruction] = []
        copies: list[tuple[Task, float]] = []  # (task, when its copy started): the file it ran and the one it was publishing
        if worker.running is not None:
            since = worker.running_since
            copies.append((self._end_copy(worker, now), since))
        if worker.finishing is not None:
            since = worker.finishing_since
            copies.append((self._end_finishing(worker), since))
        self._set_alive(worker, False)
        # A pooled file that failed on every other capable worker may now go back to a waiting one.
        self._offer_all = self._offer_all or bool(self.unowned)
        queued = [self.tasks[key[-1]] for key in worker.queue]
        for task in queued:
            self._dequeue(task)
        self._distribute([t for t in queued if t.job.open], now, weights_from="speed")
        for task, since in copies:
            task.lost_to |= {worker.id}
            if task.state == "running" and task.job.open:
                if reason is None:
                    if not task.in_flight:
                        self._distribute([task], now, weights_from="speed")
                else:
                    out += self._died_running(task, worker, reason, now, since)
        if reason is not None:
            self._recent_deaths.append((now, worker.id))
        return out

    def _on_submitted(self, event: JobSubmitted) -> list[Instruction]:
        if event.job in self.jobs:
            self.count("duplicate job id")
            return []
        job = Job(
            id=event.job, seq=next(self._job_seq), stage=event.stage, output_dir=event.output_dir,
            weighted=event.weighted, steal=event.steal, backup=event.backup, submitted=event.now,
            sealed=event.sealed,
        )
        self.jobs[job.id] = job
        out = self._seed_files(job, event.files, event.now)
        # A sealed job with no files (everything was done already) ends at once.
        return out + self._maybe_finish(job, event.now) + self._dispatch(event.now)

    def _seed_files(self, job: Job, files: Iterable[FileSpec], now: float) -> list[Instruction]:
        """Make a task of each file, appended to the job's in order, and seed them onto the capable workers."""
        tasks = []
        for spec in files:
            task = Task(id=task_id(job.id, len(job.tasks)), job=job, index=len(job.tasks), spec=spec)
            job.tasks.append(task)
            job.residues += task.cost
            self.tasks[task.id] = task
            tasks.append(task)
        self._distribute(tasks, now, weights_from="table" if job.weighted else "equal")
        for task in tasks:
            task.seeded_to = task.owner
        seeded = len({t.owner for t in tasks if t.owner is not None})
        return [Notice(f"job {job.id}: {len(tasks)} {job.stage} files seeded on {seeded} workers")]

    def _on_files_added(self, event: FilesAdded) -> list[Instruction]:
        job = self.jobs.get(event.job)
        if job is None:
            return [Refused(ErrorCode.UNKNOWN_JOB.value, f"unknown job {event.job!r} (the broker may have restarted)")]
        held = len(job.tasks)
        if event.first + len(event.files) <= held:
            # A chunk sent again (its reply was lost): it is held already, if it is the same.
            if any(job.tasks[event.first + i].spec != spec for i, spec in enumerate(event.files)):
                return [Refused(ErrorCode.REJECTED_JOB.value,
                                f"job {job.id} holds other files at {event.first} to {event.first + len(event.files) - 1}")]
            self.count("chunk added twice")
            return []
        if event.first != held:
            return [Refused(ErrorCode.REJECTED_JOB.value,
                            f"job {job.id} holds {held} files; the next chunk must start at {held}, not {event.first}")]
        if job.sealed or not job.open:
            state = "sealed" if job.open else job.state
            return [Refused(ErrorCode.REJECTED_JOB.value, f"job {job.id} is {state}; it takes no more files")]
        if held + len(event.files) > self.max_job_files:
            return [Refused(ErrorCode.REJECTED_JOB.value,
                            f"job {job.id} would hold {held + len(event.files):,} files, more than the "
                            f"{self.max_job_files:,} a job may hold; submit the rest as another job")]
        refusal = self.refusal(len(event.files))
        if refusal:
            return [Refused(ErrorCode.REFUSED.value, refusal)]
        return self._seed_files(job, event.files, event.now) + self._dispatch(event.now)

    def _on_sealed(self, event: JobSealed) -> list[Instruction]:
        job = self.jobs.get(event.job)
        if job is None:
            return [Refused(ErrorCode.UNKNOWN_JOB.value, f"unknown job {event.job!r} (the broker may have restarted)")]
        if event.files != len(job.tasks):
            return [Refused(ErrorCode.REJECTED_JOB.value,
                            f"job {job.id} holds {len(job.tasks)} files but the client sent {event.files}; "
                            "not sealed")]
        if job.sealed or not job.open:
            return []  # sealed twice (a lost reply), or ended by a cancel: nothing changes
        job.sealed = True
        return self._maybe_finish(job, event.now)

    def _on_cancelled(self, event: JobCancelled) -> list[Instruction]:
        job = self.jobs.get(event.job)
        if job is None or not job.open:
            return []
        out: list[Instruction] = []
        for task in job.tasks:
            if task.state not in ("queued", "running"):
                continue
            self._dequeue(task)
            out += self._revoke_copies(task, event.now)
            task.state = "cancelled"
        job.state = "cancelled"
        job.finished = event.now
        out.append(JobFinished(job.id, job_report(job, self.workers.values())))
        self._forget_old_jobs()
        return out

    # ---------------------------------------------------------- dispatch

    def _dispatch(self, now: float) -> list[Instruction]:
        """Offer work to the waiting workers due an offer: all of them after files were queued or at a tick,
        else those that began waiting during this event."""
        offered = list((self._waiting if self._offer_all else self._offer).values())
        self._offer_all = False
        self._offer = {}
        out: list[Instruction] = []
        for worker in offered:
            if self._waiting.get(worker.id) is not worker:
                continue
            task = self._next_for(worker, now)
            if task is None:
                continue
            del self._waiting[worker.id]
            if task.state == "running":
                out.append(self._back_up(worker, task, now))
            self._start_copy(worker, task, now)
            out.append(Assign(worker.id, task.id, task.job.id, task.job.stage, task.spec.path, task.spec.output,
                              task.spec.paired))
        return out

    def _next_for(self, worker: Worker, now: float) -> Task | None:
        """The file `worker` runs next: its own queue's first, an unowned one, a stolen one, or a backup copy."""
        if worker.queue:
            task = self.tasks[worker.queue[0][-1]]
            swapped = self._swap_for(worker, task, now)
            if swapped is not None:
                return swapped
            self._dequeue(task, reindex=False)  # it starts the file at once, which reindexes it
            return task
        for key in self.unowned:
            task = self.tasks[key[-1]]
            if task.job.stage in worker.stages and self._may_retry_on(task, worker):
                self._dequeue(task)
                return task
        return self._steal_for(worker, now) or self._backup_for(worker, now)

    def _may_retry_on(self, task: Task, worker: Worker) -> bool:
        """A file goes back to a worker it failed on only when it failed on every capable living worker."""
        if worker.id not in task.excluded:
            return True
        return all(w.id in task.excluded for w in self.capable(task.job.stage))

    def _steal_for(self, thief: Worker, now: float) -> Task | None:
        """A queued file of another worker for the idle `thief`, or None.

        Files queued behind an overdue file go to any thief, the next one due
        first. Otherwise the victims are the workers predicted to finish last,
        latest first, and from the first that has one the thief takes the
        largest queued file it would finish before that victim's queue would
        end: the thief then ends before the victim would have, and the victim
        ends earlier, so the tail shortens; taking the largest such file
        leaves the victim's smaller files, which finish its queue evenly.
        """
        for victim in self._overdue.values():
            if victim is not thief:
                task = self._stealable(victim, thief, budget=math.inf)
                if task is not None:
                    return self._steal(task, victim, thief)
        scale = self.scale()
        thief_speed = self.speed_of(thief, scale)
        considered = 0
        for _, victim_id in reversed(self._finishers):
            victim = self.workers[victim_id]
            if victim is thief:
                continue
            if considered == VICTIMS_CONSIDERED:
                break
            considered += 1
            # Residues the thief can run before the victim's queue would end.
            budget = (self.predicted_finish(victim, now, scale) - now) * thief_speed
            task = self._stealable(victim, thief, budget)
            if task is not None:
                return self._steal(task, victim, thief)
        return None

    def _swap_for(self, worker: Worker, own: Task, now: float) -> Task | None:
        """At the tail, a smaller file queued first for a faster worker, given to `worker` in exchange for `own`
        when the two then end sooner; else None.

        Of the workers predicted to finish first, a faster one whose next
        file is smaller than `own` takes `own` instead, and `worker` runs
        that smaller file, if the later of the two predicted ends comes
        earlier so: a slow worker starting the last large file would
        otherwise end the job long after the faster one.
        """
        if not own.job.steal:
            return None
        scale = self.scale()
        speed = self.speed_of(worker, scale)
        alone = now + own.cost / speed
        best: tuple[float, Worker, Task] | None = None
        for _, other_id in self._finishers.islice(0, VICTIMS_CONSIDERED + 1):
            other = self.workers[other_id]
            if other is worker or other.id in own.excluded or own.job.stage not in other.stages:
                continue
            other_speed = self.speed_of(other, scale)
            head = self.tasks[other.queue[0][-1]]
            if other_speed <= speed or head.job is not own.job or head.cost >= own.cost or worker.id in head.excluded:
                continue
            finish = self.predicted_finish(other, now, scale)
            kept = max(alone, finish)
            swapped = max(now + head.cost / speed, finish + (own.cost - head.cost) / other_speed)
            if swapped < kept and (best is None or swapped < best[0]):
                best = (swapped, other, head)
        if best is None:
            return None
        _, other, head = best
        self._dequeue(own)
        self._enqueue(other, own, offer=False)
        return self._steal(head, other, worker)

    def _stealable(self, victim: Worker, thief: Worker, budget: float) -> Task | None:
        """The first file in `victim`'s queue (oldest job, largest file) of fewer than `budget` residues that
        `thief` may take. A binary search per job in the queue."""
        queue = victim.queue
        index = 0
        while index < len(queue):
            seq = queue[index][0]
            job = self.tasks[queue[index][-1]].job
            end = queue.bisect_left((seq + 1,))
            if job.steal and job.stage in thief.stages:
                # Keys are (job seq, -cost, ...): those of fewer than `budget` residues sort after (seq, -budget).
                for position in range(max(index, queue.bisect_left((seq, -budget, math.inf))), end):
                    task = self.tasks[queue[position][-1]]
                    if thief.id not in task.excluded:
                        return task
            index = end
        return None

    def _steal(self, task: Task, victim: Worker, thief: Worker) -> Task:
        self._dequeue(task)
        victim.steals_out += 1
        thief.steals_in += 1
        task.job.steals += 1
        return task

    def _backup_for(self, thief: Worker, now: float) -> Task | None:
        """A file in flight elsewhere that the idle `thief` would finish sooner than its holder, or None.

        The holders considered are the overdue ones and those whose running
        file is predicted to end last and first (HOLDERS_CONSIDERED of each);
        the file backed up is the one whose holder is predicted to finish
        last, an overdue holder before any other. A file gets one backup copy
        at a time.
        """
        if not any(job.backs_up for job in self.jobs.values()):
            return None
        scale = self.scale()
        thief_speed = self.speed_of(thief, scale)
        best: Task | None = None
        best_finish = -math.inf
        for holder, task in self._holders():
            if holder is thief or not self._may_back_up(task, thief):
                continue
            remaining = self.remaining(holder, now, scale)
            if holder.overdue:
                finish = math.inf
            elif task.cost / thief_speed < remaining:
                finish = now + remaining
            else:
                continue
            if finish > best_finish:
                best, best_finish = task, finish
        return best

    def _holders(self) -> Iterator[tuple[Worker, Task]]:
        """(worker, the task it runs): the overdue ones, then the latest and earliest predicted ends of the
        running files, each once."""
        ends = self._running_ends
        latest = ends.islice(max(0, len(ends) - HOLDERS_CONSIDERED), reverse=True)
        earliest = ends.islice(0, min(HOLDERS_CONSIDERED, max(0, len(ends) - HOLDERS_CONSIDERED)))
        overdue = [(None, worker_id) for worker_id in self._overdue]
        seen: set[str] = set()
        for _, worker_id in itertools.chain(overdue, latest, earliest):
            if worker_id not in seen:
                seen.add(worker_id)
                holder = self.workers[worker_id]
                assert holder.running is not None
                yield holder, self.tasks[holder.running]

    def _may_back_up(self, task: Task, thief: Worker) -> bool:
        """One backup copy at a time, of a job that allows them, on a worker the file has not failed on, and never
        one that could take the file past its allowed attempts if both copies failed. No backup of a stage
        whose time the workers' speeds do not predict (classify): the copy would be a guess."""
        return (
            task.state == "running" and task.backup is None and len(task.running_on) == 1 and not task.finishing_on
            and task.job.backs_up
            and task.job.stage not in UNTIMED_STAGES
            and task.job.stage in thief.stages and thief.id not in task.excluded
            and len(task.attempts) + 2 <= self.max_attempts
        )

    def _back_up(self, thief: Worker, task: Task, now: float) -> Notice:
        (holder_id,) = task.running_on
        holder = self.workers[holder_id]
        task.backup = thief.id
        task.job.backups += 1
        why = "overdue" if holder.overdue else f"predicted to need {self.remaining(holder, now):.1f} s more"
        return Notice(f"backup copy of {task.spec.path} on {thief.name}: {holder.name} is {why}")

    # ---------------------------------------------------------- endings

    def _maybe_finish(self, job: Job, now: float) -> list[Instruction]:
        if not job.open or not job.sealed or job.done + job.failed < len(job.tasks):
            return []
        job.state = "finished"
        job.finished = now
        report = job_report(job, self.workers.values())
        out: list[Instruction] = [
            Log(WorkerSummary.of_report_row(row, time=now, job=job.id, stage=job.stage))
            for row in report["workers"]
        ]
        out.append(JobFinished(job.id, report))
        self._forget_old_jobs()
        return out

    def _forget_old_jobs(self) -> None:
        ended = [job for job in self.jobs.values() if not job.open]
        for job in ended[: max(0, len(ended) - KEEP_ENDED_JOBS)]:
            for task in job.tasks:
                del self.tasks[task.id]
            for worker in self.workers.values():
                worker.per_job.pop(job.id, None)
            del self.jobs[job.id]

    # -------------------------------------------------------- invariants

    def validate(self) -> None:
        """Check every piece of derived bookkeeping against a recomputation from the primary state.

        The primary state is each job's task list, each task's state, owner and
        running copies, and each worker's liveness, running file, queue and
        speed. Derived from it and kept as it changes: the task index, queued
        costs, the unowned pool, the finish-time and running-end indexes, the
        waiting, overdue, measured and unmeasured sets, the measured sums, the
        backup and revoked copies and the job counters. Raises
        InvariantError naming the invariant and the worker, task or job.
        O(workers + tasks) per call, so the tests and the simulator call it
        after every event.
        """
        self._validate_tasks()
        self._validate_queues()
        self._validate_workers()
        self._validate_speeds()
        self._validate_finish_index()
        self._validate_running_index()
        self._validate_jobs()

    def _validate_tasks(self) -> None:
        listed = 0
        for job in self.jobs.values():
            for task in job.tasks:
                listed += 1
                if self.tasks.get(task.id) is not task or task.job is not job:
                    raise InvariantError(f"task index: task {task.id} of job {job.id} is not indexed under its id")
        if listed != len(self.tasks):
            extra = sorted(t for t, task in self.tasks.items() if self.jobs.get(task.job.id) is not task.job)
            raise InvariantError(f"task index: {len(self.tasks)} tasks indexed, {listed} in jobs; extra {extra}")
        for task in self.tasks.values():
            if task.state not in TASK_STATES:
                raise InvariantError(f"task state: task {task.id} is {task.state!r}")
            if task.state == "queued" and not task.job.open:
                raise InvariantError(f"task state: task {task.id} is queued in {task.job.state} job {task.job.id}")
            if task.state != "queued" and task.owner is not None:
                raise InvariantError(f"task owner: {task.state} task {task.id} is still owned by {task.owner}")
            if (task.state == "running") != task.in_flight:
                raise InvariantError(
                    f"running copies: task {task.id} is {task.state} with copies on {sorted(task.running_on)}, "
                    f"publishing on {sorted(task.finishing_on)}"
                )
            if task.running_on & task.finishing_on:
                raise InvariantError(f"publishing copies: task {task.id} both runs and publishes on "
                                     f"{sorted(task.running_on & task.finishing_on)}")
            for worker_id in task.finishing_on:
                worker = self.workers.get(worker_id)
                if worker is None or not worker.alive or worker.finishing != task.id:
                    raise InvariantError(
                        f"publishing copies: task {task.id} has a copy published by {worker_id}, which is not a "
                        "living worker publishing it"
                    )
            for worker_id in task.running_on:
                worker = self.workers.get(worker_id)
                if worker is None or not worker.alive or worker.running != task.id:
                    raise InvariantError(
                        f"running copies: task {task.id} has a copy on {worker_id}, which is not a living worker "
                        f"running it"
                    )
            for worker_id in task.lost_to | task.revoked:
                if worker_id not in self.workers:
                    raise InvariantError(f"lost or revoked copies: task {task.id} names unknown worker {worker_id}")
            copies = task.running_on | task.finishing_on
            if task.revoked & copies:
                raise InvariantError(f"revoked copies: task {task.id} still runs on {sorted(task.revoked & copies)}")
            if len(copies) > 2 or (len(copies) == 2) != (task.backup is not None) and (
                len(copies) == 2 or task.backup not in copies
            ):
                raise InvariantError(
                    f"backup copies: task {task.id} runs on {sorted(task.running_on)} and publishes on "
                    f"{sorted(task.finishing_on)} with backup {task.backup}; a file runs once, or twice with one "
                    "backup copy"
                )

    def _validate_queues(self) -> None:
        """Every queued task is held exactly once: in its owner's queue, or in the unowned pool if it has none."""
        held: set[str] = set()
        for key in self.unowned:
            task = self.tasks.get(key[-1])
            if task is None or task.key != key or task.state != "queued" or task.owner is not None or task.id in held:
                raise InvariantError(f"unowned pool: holds {key[-1]}, which is not a queued task without an owner")
            held.add(task.id)
        for worker in self.workers.values():
            cost = 0
            for key in worker.queue:
                task = self.tasks.get(key[-1])
                if task is None or task.key != key or task.state != "queued" or task.owner != worker.id or (
                    task.id in held
                ):
                    raise InvariantError(f"worker queue: {worker.id} holds {key[-1]}, which is not a task queued for it")
                if task.job.stage not in worker.stages:
                    raise InvariantError(f"worker queue: {worker.id} holds {task.id} of a stage it does not serve")
                held.add(task.id)
                cost += task.cost
            if cost != worker.queued_cost:
                raise InvariantError(f"queued_cost: worker {worker.id} records {worker.queued_cost}, its queue holds {cost}")
        if len(held) != sum(1 for task in self.tasks.values() if task.state == "queued"):
            missing = sorted(t.id for t in self.tasks.values() if t.state == "queued" and t.id not in held)
            raise InvariantError(f"queued tasks held: {missing} are queued but in no queue and not in the unowned pool")

    def _validate_workers(self) -> None:
        for worker_id, worker in self.workers.items():
            if worker.id != worker_id:
                raise InvariantError(f"worker index: worker {worker.id} is indexed as {worker_id}")
            if not worker.alive and (worker.queue or worker.running is not None or worker.finishing is not None):
                raise InvariantError(f"dead workers hold nothing: {worker.id} is dead but queues, runs or publishes "
                                     "a task")
            if worker.finishing is not None:
                task = self.tasks.get(worker.finishing)
                if task is None or worker.id not in task.finishing_on:
                    raise InvariantError(
                        f"publishing copies: worker {worker.id} publishes {worker.finishing}, which has no copy on it"
                    )
            if worker.running is not None:
                task = self.tasks.get(worker.running)
                if task is None or worker.id not in task.running_on:
                    raise InvariantError(
                        f"running copies: worker {worker.id} runs {worker.running}, which has no copy on it"
                    )
            if worker.stuck is not None and (not worker.alive or worker.running is not None or worker.queue
                                             or worker.id in self._waiting):
                raise InvariantError(f"stuck workers: {worker.id} is stuck in {worker.stuck} but is dead, runs, "
                                     "queues or waits")
            if any(job_id not in self.jobs for job_id in worker.per_job):
                raise InvariantError(f"worker stats: {worker.id} keeps figures of a forgotten job")
        overdue = {w.id for w in self.workers.values() if w.overdue}
        if overdue != set(self._overdue) or any(self.workers[i] is not w for i, w in self._overdue.items()):
            raise InvariantError(f"overdue set: holds {sorted(self._overdue)}, the workers say {sorted(overdue)}")
        for worker_id in overdue:
            if self.workers[worker_id].running is None:
                raise InvariantError(f"overdue set: {worker_id} is overdue but runs nothing")
        if self._offer or self._offer_all:
            raise InvariantError(f"offers: {sorted(self._offer)} (all: {self._offer_all}) left after the event")
        for worker_id, worker in self._waiting.items():
            if self.workers.get(worker_id) is not worker or not worker.alive or worker.running is not None:
                raise InvariantError(f"waiting set: {worker_id} waits but is not a living idle worker")
            if worker.queue:
                raise InvariantError(f"waiting set: {worker_id} waits beside its own queue")
            for key in self.unowned:
                pooled = self.tasks[key[-1]]
                if pooled.job.stage in worker.stages and self._may_retry_on(pooled, worker):
                    raise InvariantError(f"waiting set: {worker_id} waits beside unowned task {pooled.id} it may run")

    def _validate_finish_index(self) -> None:
        scale = self.scale()
        indexed = 0
        for worker in self.workers.values():
            key = worker.finish_key
            if not (worker.alive and worker.queue):
                if key is not None:
                    raise InvariantError(f"finish index: worker {worker.id} has no queue but an entry {key}")
                continue
            indexed += 1
            base = worker.running_since if worker.running is not None else worker.idle_since
            if key is None or key[1] != worker.id or key not in self._finishers:
                raise InvariantError(f"finish index: worker {worker.id} has a queue but no entry")
            predicted = self.predicted_finish(worker, base, scale)
            if key[0] != predicted:
                raise InvariantError(
                    f"finish index: worker {worker.id} is indexed to finish at {key[0]}, predicted {predicted}"
                )
        if indexed != len(self._finishers):
            raise InvariantError(
                f"finish index: {len(self._finishers)} entries for {indexed} living workers with a queue"
            )

    def _validate_running_index(self) -> None:
        scale = self.scale()
        indexed = 0
        for worker in self.workers.values():
            key = worker.running_key
            if worker.running is None:
                if key is not None:
                    raise InvariantError(f"running-end index: worker {worker.id} runs nothing but has an entry {key}")
                continue
            indexed += 1
            predicted = worker.running_since + self.remaining(worker, worker.running_since, scale)
            if key != (predicted, worker.id) or key not in self._running_ends:
                raise InvariantError(
                    f"running-end index: worker {worker.id} is indexed as {key}, its running file ends at {predicted}"
                )
        if indexed != len(self._running_ends):
            raise InvariantError(f"running-end index: {len(self._running_ends)} entries for {indexed} running workers")

    def _validate_speeds(self) -> None:
        living = [w for w in self.workers.values() if w.alive]
        for name, recorded, expected in (
            ("measured set", self._measured, {w.id: w for w in living if w.speed}),
            ("unmeasured set", self._unmeasured, {w.id: w for w in living if not w.speed}),
        ):
            if recorded.keys() != expected.keys() or any(recorded[i] is not w for i, w in expected.items()):
                raise InvariantError(f"{name}: holds {sorted(recorded)}, the living workers say {sorted(expected)}")
        measured = [w for w in living if w.speed]
        for name, recorded_sum, recomputed in (
            ("_measured_speed", self._measured_speed, ExactSum(w.speed or 0.0 for w in measured)),
            ("_measured_weight", self._measured_weight, ExactSum(w.weight for w in measured)),
        ):
            if recorded_sum.units != recomputed.units:
                raise InvariantError(
                    f"{name}: records {float(recorded_sum)}, the living measured workers sum to {float(recomputed)}"
                )

    def _validate_jobs(self) -> None:
        for job_id, job in self.jobs.items():
            if job.id != job_id or job.state not in JOB_STATES:
                raise InvariantError(f"job index: job {job.id} ({job.state!r}) is indexed as {job_id}")
            if len(job.tasks) > self.max_job_files:
                raise InvariantError(f"job size: job {job.id} holds {len(job.tasks)} files, over {self.max_job_files}")
            for position, task in enumerate(job.tasks):
                if task.index != position or task.id != f"{job.id}:{position}":
                    raise InvariantError(f"task order: task {task.id} (index {task.index}) is file {position} of "
                                         f"job {job.id}")
            total = sum(t.cost for t in job.tasks)
            if job.residues != total:
                raise InvariantError(f"job residues: job {job.id} counts {job.residues}, its tasks cost {total}")
            done = [t for t in job.tasks if t.state == "done"]
            failed = sum(1 for t in job.tasks if t.state == "failed")
            if (job.done, job.failed) != (len(done), failed):
                raise InvariantError(
                    f"job counters: job {job.id} counts {job.done} done, {job.failed} failed; "
                    f"its tasks say {len(done)}, {failed}"
                )
            residues = sum(t.cost for t in done)
            if job.residues_done != residues:
                raise InvariantError(f"residues_done: job {job.id} counts {job.residues_done}, its done tasks {residues}")
            stats = [w.per_job[job.id] for w in self.workers.values() if job.id in w.per_job]
            backing_up = sum(1 for t in job.tasks if t.backup is not None)
            if sum(s.backups for s in stats) != job.backups_won or job.backups_won + backing_up > job.backups:
                raise InvariantError(
                    f"backup counters: job {job.id} counts {job.backups} started, {job.backups_won} won, "
                    f"{backing_up} running; its workers won {sum(s.backups for s in stats)}"
                )
            wasted = math.fsum(s.wasted_seconds for s in stats)
            if job.wasted_seconds < 0 or not math.isclose(job.wasted_seconds, wasted, rel_tol=1e-9, abs_tol=1e-9):
                raise InvariantError(f"wasted seconds: job {job.id} counts {job.wasted_seconds}, its workers {wasted}")
            ended = job.done + job.failed == len(job.tasks)
            if job.open and (ended and job.sealed or job.finished is not None):
                raise InvariantError(f"job state: job {job.id} is running sealed with every task ended, or has an "
                                     "end time")
            if job.state == "finished" and not job.sealed:
                raise InvariantError(f"job state: job {job.id} finished before it was sealed")
            if job.state == "finished" and not ended or not job.open and job.finished is None:
                raise InvariantError(f"job state: job {job.id} is {job.state} with tasks left or no end time")
