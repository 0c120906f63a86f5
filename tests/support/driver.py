"""Test helpers that drive the scheduler core by hand, with a fake clock.

`Driver` wraps a `Scheduler` with a clock the test sets by hand, so a unit test
reads as the event sequence it pins; after every event it checks the core's
invariants (Scheduler.validate). The discrete-event simulation the tests also
use is broker.simulator's, the one tools/simulate.py runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from broker.events import (
    Assign,
    FilesAdded,
    FileSpec,
    Heartbeat,
    JobCancelled,
    JobFinished,
    JobSealed,
    JobSubmitted,
    Log,
    TaskFailed,
    TaskSucceeded,
    Tick,
    WorkerJoined,
    WorkerLeft,
    WorkRequested,
)
from broker.scheduler import Scheduler
from broker.simulator import STAGE, file_specs


def assigns(out: Iterable[Any]) -> list[Assign]:
    return [i for i in out if isinstance(i, Assign)]


def of_type(out: Iterable[Any], kind: type) -> list[Any]:
    return [i for i in out if isinstance(i, kind)]


def log_records(out: Iterable[Any], event: str) -> list[dict[str, Any]]:
    return [i.record.to_dict() for i in out if isinstance(i, Log) and i.record.EVENT == event]


def finished(out: Iterable[Any]) -> list[JobFinished]:
    return of_type(out, JobFinished)


def added_specs(job: str, costs: Sequence[int], first: int) -> tuple[FileSpec, ...]:
    """The specs Driver.add sends: named by their index in the job, as file_specs names a submission's."""
    return tuple(FileSpec(path=f"{job}-{first + i}.fa", output=f"out/{job}-{first + i}.npy",
                          sequences=max(1, cost // 100), residues=cost) for i, cost in enumerate(costs))


class Driver:
    """A scheduler with a fake clock: set `now` (or pass `at=`), call an event method, read its instructions.

    Every event is followed by Scheduler.validate(), so each test also checks that
    the core's bookkeeping stays consistent along the way.
    """

    def __init__(self, **scheduler_options: Any) -> None:
        self.scheduler = Scheduler(**scheduler_options)
        self.now = 0.0
        self.history: list[Any] = []

    def _feed(self, event: Any) -> list[Any]:
        out = self.scheduler.handle(event)
        self.scheduler.validate()
        self.history.extend(out)
        return out

    def _at(self, at: float | None) -> float:
        if at is not None:
            self.now = at
        return self.now

    def join(self, worker: str, weight: float = 1.0, *, stages: Sequence[str] = (STAGE,), gpu: str | None = None,
             host: str = "box", at: float | None = None) -> list[Any]:
        return self._feed(WorkerJoined(worker=worker, name=worker, host=host, gpu=gpu or f"GPU-{worker}",
                                       weight=weight, stages=tuple(stages), now=self._at(at)))

    def submit(self, job: str, costs: Sequence[int], *, weighted: bool = True, steal: bool = True,
               backup: bool = True, stage: str = STAGE, sealed: bool = True, at: float | None = None) -> list[Any]:
        return self._feed(JobSubmitted(job=job, stage=stage, output_dir=f"out/{job}",
                                       files=file_specs(costs, prefix=f"{job}-"), weighted=weighted, steal=steal,
                                       backup=backup, now=self._at(at), sealed=sealed))

    def add(self, job: str, costs: Sequence[int], *, first: int | None = None, at: float | None = None) -> list[Any]:
        """Add files `{job}-{first + i}.fa` to an open job; `first` defaults to the count it holds."""
        held = len(self.scheduler.jobs[job].tasks) if job in self.scheduler.jobs else 0
        start = held if first is None else first
        return self._feed(FilesAdded(job=job, first=start, files=added_specs(job, costs, start), now=self._at(at)))

    def seal(self, job: str, files: int | None = None, at: float | None = None) -> list[Any]:
        """Seal a job; `files` (the count the client says it sent) defaults to the count it holds."""
        count = len(self.scheduler.jobs[job].tasks) if files is None else files
        return self._feed(JobSealed(job=job, files=count, now=self._at(at)))

    def request(self, worker: str, at: float | None = None, *, finishing: str | None = None) -> list[Any]:
        """`worker` asks for work; `finishing`: the file it ran to the end and is still publishing."""
        return self._feed(WorkRequested(worker=worker, now=self._at(at), finishing=finishing))

    def succeed(self, worker: str, task: str, seconds: float = 1.0, *, skipped: bool = False,
                at: float | None = None) -> list[Any]:
        return self._feed(TaskSucceeded(worker=worker, task=task, seconds=seconds, skipped=skipped,
                                        now=self._at(at)))

    def fail(self, worker: str, task: str, reason: str = "boom", at: float | None = None) -> list[Any]:
        return self._feed(TaskFailed(worker=worker, task=task, reason=reason, now=self._at(at)))

    def heartbeat(self, worker: str, task: str | None = None, at: float | None = None,
                  progress: int | None = None) -> list[Any]:
        return self._feed(Heartbeat(worker=worker, task=task, now=self._at(at), progress=progress))

    def left(self, worker: str, at: float | None = None) -> list[Any]:
        return self._feed(WorkerLeft(worker=worker, now=self._at(at)))

    def tick(self, at: float | None = None) -> list[Any]:
        return self._feed(Tick(now=self._at(at)))

    def cancel(self, job: str, at: float | None = None) -> list[Any]:
        return self._feed(JobCancelled(job=job, now=self._at(at)))

    def pass_time(self, until: float, step: float = 1.0) -> list[Any]:
        """Advance to `until` a step at a time: each living worker heartbeats (naming the file the core says it
        runs, as a well-behaved worker would), then the broker ticks. Returns every instruction given."""
        out: list[Any] = []
        while self.now + step <= until:
            self.now += step
            for worker in [w for w in self.scheduler.workers.values() if w.alive]:
                out += self.heartbeat(worker.id, worker.running)
            out += self.tick()
        return out

    def cost(self, task: str) -> int:
        return self.scheduler.tasks[task].cost

    def path(self, task: str) -> str:
        return self.scheduler.tasks[task].spec.path

    def run_queue(self, worker: str, seconds_per_file: float = 1.0) -> list[str]:
        """Let `worker` request and finish files until it gets none; the task ids it ran, in order."""
        ran: list[str] = []
        out = self.request(worker)
        for _ in range(10_000):
            given = [a for a in assigns(out) if a.worker == worker]
            if not given:
                return ran
            task = given[0].task
            ran.append(task)
            self.now += seconds_per_file
            self.succeed(worker, task, seconds_per_file)
            out = self.request(worker)
        raise AssertionError(f"{worker} never ran out of work")


# ------------------------------------------------------------ simulation


def lower_bound(costs: Sequence[int], speeds: Sequence[float]) -> float:
    """Makespan lower bound on machines of different speeds: max(total / sum of speeds, largest / fastest)."""
    return max(sum(costs) / sum(speeds), max(costs) / max(speeds))


def answer_all(driver: Driver, workers: Sequence[str], outcome: Any, *, step: float = 1.0,
               limit: int = 10_000) -> list[Any]:
    """Every worker asks for work; each Assign is answered in turn, `step` seconds later, then the worker asks again.

    outcome(worker, task) returns the seconds it took (a success) or a reason string (a failure).
    Returns every instruction the core gave, in order.
    """
    from collections import deque

    seen: list[Any] = []
    inbox: deque[Assign] = deque()

    def feed(out: list[Any]) -> None:
        seen.extend(out)
        inbox.extend(assigns(out))

    for worker in workers:
        feed(driver.request(worker))
    for _ in range(limit):
        if not inbox:
            return seen
        given = inbox.popleft()
        driver.now += step
        answer = outcome(given.worker, given.task)
        if isinstance(answer, str):
            feed(driver.fail(given.worker, given.task, answer))
        else:
            feed(driver.succeed(given.worker, given.task, float(answer)))
        feed(driver.request(given.worker))
    raise AssertionError("workers never ran out of work")
