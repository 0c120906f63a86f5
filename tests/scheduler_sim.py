"""Test helpers that drive the scheduler core: a fake-clock driver and a discrete-event simulation.

`Driver` wraps a `Scheduler` with a clock the test sets by hand, so a unit test
reads as the event sequence it pins. `simulate` plays workers of given true
speeds against the core: each Assign completes after cost / true speed seconds
of simulated time, living workers heartbeat every second, the broker ticks
every second, and a worker that dies never answers again.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from broker.scheduler import (
    Assign,
    FileSpec,
    Heartbeat,
    JobCancelled,
    JobFinished,
    JobSubmitted,
    Log,
    Reregister,
    Revoke,
    Scheduler,
    TaskFailed,
    TaskSucceeded,
    Tick,
    WorkerJoined,
    WorkerLeft,
    WorkRequested,
)

STAGE = "synthetic"


def file_specs(costs: Sequence[int], prefix: str = "f") -> tuple[FileSpec, ...]:
    """One FileSpec per cost, named `{prefix}{index}.fa`; one sequence per 100 residues."""
    return tuple(
        FileSpec(path=f"{prefix}{i}.fa", output=f"out/{prefix}{i}.npy", sequences=max(1, cost // 100), residues=cost)
        for i, cost in enumerate(costs)
    )


def assigns(out: Iterable[Any]) -> list[Assign]:
    return [i for i in out if isinstance(i, Assign)]


def of_type(out: Iterable[Any], kind: type) -> list[Any]:
    return [i for i in out if isinstance(i, kind)]


def log_records(out: Iterable[Any], event: str) -> list[dict[str, Any]]:
    return [i.record for i in out if isinstance(i, Log) and i.record.get("event") == event]


def finished(out: Iterable[Any]) -> list[JobFinished]:
    return of_type(out, JobFinished)


class Driver:
    """A scheduler with a fake clock: set `now` (or pass `at=`), call an event method, read its instructions."""

    def __init__(self, **scheduler_options: Any) -> None:
        self.scheduler = Scheduler(**scheduler_options)
        self.now = 0.0
        self.history: list[Any] = []

    def _feed(self, event: Any) -> list[Any]:
        out = self.scheduler.handle(event)
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
               stage: str = STAGE, at: float | None = None) -> list[Any]:
        return self._feed(JobSubmitted(job=job, stage=stage, output_dir=f"out/{job}",
                                       files=file_specs(costs, prefix=f"{job}-"), weighted=weighted, steal=steal,
                                       now=self._at(at)))

    def request(self, worker: str, at: float | None = None) -> list[Any]:
        return self._feed(WorkRequested(worker=worker, now=self._at(at)))

    def succeed(self, worker: str, task: str, seconds: float = 1.0, *, skipped: bool = False,
                at: float | None = None) -> list[Any]:
        return self._feed(TaskSucceeded(worker=worker, task=task, seconds=seconds, skipped=skipped,
                                        now=self._at(at)))

    def fail(self, worker: str, task: str, reason: str = "boom", at: float | None = None) -> list[Any]:
        return self._feed(TaskFailed(worker=worker, task=task, reason=reason, now=self._at(at)))

    def heartbeat(self, worker: str, task: str | None = None, at: float | None = None) -> list[Any]:
        return self._feed(Heartbeat(worker=worker, task=task, now=self._at(at)))

    def left(self, worker: str, at: float | None = None) -> list[Any]:
        return self._feed(WorkerLeft(worker=worker, now=self._at(at)))

    def tick(self, at: float | None = None) -> list[Any]:
        return self._feed(Tick(now=self._at(at)))

    def cancel(self, job: str, at: float | None = None) -> list[Any]:
        return self._feed(JobCancelled(job=job, now=self._at(at)))

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


@dataclass
class SimWorker:
    id: str
    weight: float  # what the table predicts
    speed: float  # true residues per second
    joins_at: float = 0.0
    dies_at: float | None = None  # from then on it never answers
    stall: tuple[float, float] | None = None  # cut off in both directions between these times; runs on meanwhile
    stages: tuple[str, ...] = (STAGE,)


@dataclass
class SimJob:
    id: str
    costs: Sequence[int]
    weighted: bool = False
    steal: bool = True
    at: float = 0.0
    poison: frozenset[int] = frozenset()  # file indices that fail on every worker


@dataclass
class SimResult:
    scheduler: Scheduler
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    finished_at: dict[str, float] = field(default_factory=dict)
    task_done: list[dict[str, Any]] = field(default_factory=list)
    worker_summaries: list[dict[str, Any]] = field(default_factory=list)
    assigns: list[tuple[float, Assign]] = field(default_factory=list)
    assigns_to_dead: list[tuple[float, Assign]] = field(default_factory=list)  # to a worker the core declared dead
    assigns_to_busy: list[tuple[float, Assign]] = field(default_factory=list)  # to a worker already running a file
    reregisters: list[tuple[float, str]] = field(default_factory=list)
    end: float = 0.0


def simulate(workers: Sequence[SimWorker], jobs: Sequence[SimJob], *, worker_timeout: float = 10.0,
             max_attempts: int = 3, horizon: float = 100_000.0) -> SimResult:
    """Play `workers` against the core until every job finished or `horizon` seconds of simulated time passed."""
    scheduler = Scheduler(worker_timeout=worker_timeout, max_attempts=max_attempts)
    result = SimResult(scheduler=scheduler)
    by_id = {w.id: w for w in workers}
    joined: set[str] = set()
    crashed: set[str] = set()
    running: dict[str, str | None] = {w.id: None for w in workers}
    token: dict[str, int] = {w.id: 0 for w in workers}
    costs = {job.id: list(job.costs) for job in jobs}
    poison = {job.id: job.poison for job in jobs}
    seq = itertools.count()
    pending: list[tuple[float, int, str, Any]] = []

    def push(t: float, kind: str, payload: Any = None) -> None:
        heapq.heappush(pending, (t, next(seq), kind, payload))

    for w in workers:
        push(w.joins_at, "join", w.id)
        if w.dies_at is not None:
            push(w.dies_at, "die", w.id)
    for job in jobs:
        push(job.at, "submit", job)
    push(1.0, "tick")

    def stalled(wid: str, now: float) -> bool:
        stall = by_id[wid].stall
        return stall is not None and stall[0] <= now < stall[1]

    def perform(out: list[Any], now: float) -> None:
        for instruction in out:
            if isinstance(instruction, Assign):
                result.assigns.append((now, instruction))
                wid = instruction.worker
                if not scheduler.workers[wid].alive:
                    result.assigns_to_dead.append((now, instruction))
                if wid in crashed or stalled(wid, now):
                    continue  # lost: a dead worker never answers
                if running[wid] is not None:
                    result.assigns_to_busy.append((now, instruction))
                    continue  # the real worker ignores it
                running[wid] = instruction.task
                token[wid] += 1
                job_id, index = instruction.task.rsplit(":", 1)
                if int(index) in poison[job_id]:
                    push(now + 0.5, "fail", (wid, instruction.task, token[wid]))
                else:
                    seconds = costs[job_id][int(index)] / by_id[wid].speed
                    push(now + seconds, "done", (wid, instruction.task, token[wid], seconds))
            elif isinstance(instruction, Revoke):
                wid = instruction.worker
                if wid not in crashed and not stalled(wid, now) and running[wid] == instruction.task:
                    running[wid] = None
                    token[wid] += 1
                    push(now, "revoked", (wid, instruction.task))
            elif isinstance(instruction, Reregister):
                result.reregisters.append((now, instruction.worker))
                if instruction.worker not in crashed and not stalled(instruction.worker, now):
                    push(now, "rejoin", instruction.worker)
            elif isinstance(instruction, JobFinished):
                result.reports[instruction.job] = instruction.report
                result.finished_at[instruction.job] = now
            elif isinstance(instruction, Log):
                if instruction.record["event"] == "task_done":
                    result.task_done.append(instruction.record)
                elif instruction.record["event"] == "worker_summary":
                    result.worker_summaries.append(instruction.record)

    now = 0.0
    while pending and len(result.reports) < len(jobs):
        now, _, kind, payload = heapq.heappop(pending)
        if now > horizon:
            break
        if kind in ("join", "rejoin", "done", "fail", "revoked"):
            wid = payload if isinstance(payload, str) else payload[0]
            if stalled(wid, now):
                push(by_id[wid].stall[1], kind, payload)  # its messages wait for the link to come back
                continue
        if kind == "rejoin":
            # A worker told to register again does so; it keeps running its file and asks for work only when idle.
            w = by_id[payload]
            if payload in crashed:
                continue
            perform(scheduler.handle(WorkerJoined(w.id, w.id, "sim", f"GPU-{w.id}", w.weight, w.stages, now)), now)
            if running[payload] is None:
                perform(scheduler.handle(WorkRequested(w.id, now)), now)
        elif kind == "join":
            w = by_id[payload]
            if payload in crashed:
                continue
            joined.add(payload)
            running[payload] = None
            token[payload] += 1
            perform(scheduler.handle(WorkerJoined(w.id, w.id, "sim", f"GPU-{w.id}", w.weight, w.stages, now)), now)
            perform(scheduler.handle(WorkRequested(w.id, now)), now)
        elif kind == "die":
            crashed.add(payload)
        elif kind == "submit":
            job: SimJob = payload
            perform(scheduler.handle(JobSubmitted(job.id, STAGE, f"out/{job.id}", file_specs(job.costs, f"{job.id}-"),
                                                  job.weighted, job.steal, now)), now)
        elif kind in ("done", "fail"):
            wid, task, tok = payload[:3]
            if wid in crashed or token[wid] != tok:
                continue
            running[wid] = None
            if kind == "done":
                perform(scheduler.handle(TaskSucceeded(wid, task, payload[3], False, now)), now)
            else:
                perform(scheduler.handle(TaskFailed(wid, task, f"poison file on {wid}", now)), now)
            perform(scheduler.handle(WorkRequested(wid, now)), now)
        elif kind == "revoked":
            wid, task = payload
            if wid in crashed:
                continue
            perform(scheduler.handle(TaskFailed(wid, task, "revoked by the broker", now)), now)
            if running[wid] is None:
                perform(scheduler.handle(WorkRequested(wid, now)), now)
        elif kind == "tick":
            for wid in sorted(joined - crashed):
                if stalled(wid, now):
                    continue
                perform(scheduler.handle(Heartbeat(wid, running[wid], now)), now)
            perform(scheduler.handle(Tick(now)), now)
            push(now + 1.0, "tick")
    result.end = now
    return result


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
