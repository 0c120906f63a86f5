"""The discrete-event simulator: the real scheduler core against workers of given true speeds, in simulated time.

The core that ships is driven by an event loop instead of sockets: each file
takes cost / true speed seconds, living workers heartbeat and the broker
ticks every heartbeat interval (a second unless told), and a worker that dies
never answers again. So a
policy measured here is the policy the broker runs, at any scale, in seconds
of real time. tools/simulate.py compares policies with it; the tests drive it
for their property and makespan checks. pull_queue_makespan is the yardstick
beside it: a plain pull queue on the same simulated workers.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.events import (
    Assign,
    Event,
    FileSpec,
    Heartbeat,
    JobFinished,
    JobSubmitted,
    Log,
    Reregister,
    Revoke,
    TaskFailed,
    TaskSucceeded,
    Tick,
    WorkerJoined,
    WorkRequested,
)
from broker.records import TaskDone, WorkerSummary
from broker.scheduler import Scheduler

STAGE = "synthetic"


def file_specs(costs: Sequence[int], prefix: str = "f") -> tuple[FileSpec, ...]:
    """One FileSpec per cost, named `{prefix}{index}.fa`; one sequence per 100 residues."""
    return tuple(
        FileSpec(path=f"{prefix}{i}.fa", output=f"out/{prefix}{i}.npy", sequences=max(1, cost // 100), residues=cost)
        for i, cost in enumerate(costs)
    )


@dataclass
class SimWorker:
    id: str
    weight: float  # what the table predicts
    speed: float  # true residues per second
    joins_at: float = 0.0
    dies_at: float | None = None  # from then on it never answers
    stall: tuple[float, float] | None = None  # cut off in both directions between these times; runs on meanwhile
    overhead: float = 0.0  # seconds per file beyond cost / speed (publishing, the round trip), not in its `seconds`
    # Seconds it takes to publish an output while it runs the next file, as a real worker does (0: none). A file
    # that ends while the previous output is still being published waits for it, unannounced.
    publish: float = 0.0
    slows: tuple[float, float] | None = None  # (at, speed): from simulated time `at` on it runs at this speed

    def seconds_for(self, cost: int, start: float) -> float:
        """How long a file of `cost` residues started at `start` runs, across a change of speed if one falls due."""
        if self.slows is None or start + cost / self.speed <= self.slows[0]:
            return cost / self.speed
        before = max(0.0, self.slows[0] - start)
        return before + (cost - before * self.speed) / self.slows[1]
    stages: tuple[str, ...] = (STAGE,)


@dataclass
class SimJob:
    id: str
    costs: Sequence[int]
    weighted: bool = False
    steal: bool = True
    backup: bool = True
    at: float = 0.0
    poison: frozenset[int] = frozenset()  # file indices that fail on every worker


@dataclass
class SimResult:
    scheduler: Scheduler
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    finished_at: dict[str, float] = field(default_factory=dict)
    task_done: list[TaskDone] = field(default_factory=list)
    worker_summaries: list[WorkerSummary] = field(default_factory=list)
    assigns: list[tuple[float, Assign]] = field(default_factory=list)
    assigns_to_dead: list[tuple[float, Assign]] = field(default_factory=list)  # to a worker the core declared dead
    assigns_to_busy: list[tuple[float, Assign]] = field(default_factory=list)  # to a worker already running a file
    reregisters: list[tuple[float, str]] = field(default_factory=list)
    end: float = 0.0


def simulate(workers: Sequence[SimWorker], jobs: Sequence[SimJob], *, worker_timeout: float = 10.0,
             max_attempts: int = 3, horizon: float = 100_000.0, validate: bool = False,
             heartbeat_interval: float = 1.0, scheduler: Scheduler | None = None) -> SimResult:
    """Play `workers` against the core until every job finished or `horizon` seconds of simulated time passed.

    validate: check the core's invariants (Scheduler.validate) after every event;
    the tests turn it on, a maintainer comparing policies at full scale need not.
    heartbeat_interval: how often the broker ticks and each living worker heartbeats.
    scheduler: the core to drive (one that records its own timings, say); default a new Scheduler with
    worker_timeout and max_attempts.
    """
    if scheduler is None:
        scheduler = Scheduler(worker_timeout=worker_timeout, max_attempts=max_attempts)
    result = SimResult(scheduler=scheduler)
    by_id = {w.id: w for w in workers}
    joined: set[str] = set()
    crashed: set[str] = set()
    running: dict[str, str | None] = {w.id: None for w in workers}
    publishing: dict[str, float] = {}  # worker -> when the output it publishes is published
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
    push(heartbeat_interval, "tick")

    def handle(event: Event) -> None:
        out = scheduler.handle(event)
        if validate:
            scheduler.validate()
        perform(out, event.now)

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
                    seconds = by_id[wid].seconds_for(costs[job_id][int(index)], now)
                    ends = "computed" if by_id[wid].publish else "done"
                    push(now + seconds + by_id[wid].overhead, ends, (wid, instruction.task, token[wid], seconds))
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
                if isinstance(instruction.record, TaskDone):
                    result.task_done.append(instruction.record)
                elif isinstance(instruction.record, WorkerSummary):
                    result.worker_summaries.append(instruction.record)

    now = 0.0
    beating: list[str] | None = None  # the workers that heartbeat, in order; None: work it out again
    while pending and len(result.reports) < len(jobs):
        now, _, kind, payload = heapq.heappop(pending)
        if now > horizon:
            break
        if kind in ("join", "rejoin", "done", "computed", "published", "fail", "revoked"):
            wid = payload if isinstance(payload, str) else payload[0]
            stall = by_id[wid].stall
            if stall is not None and stall[0] <= now < stall[1]:
                push(stall[1], kind, payload)  # its messages wait for the link to come back
                continue
        if kind == "rejoin":
            # A worker told to register again does so; it keeps running its file and asks for work only when idle.
            w = by_id[payload]
            if payload in crashed:
                continue
            handle(WorkerJoined(w.id, w.id, "sim", f"GPU-{w.id}", w.weight, w.stages, now))
            if running[payload] is None:
                handle(WorkRequested(w.id, now))
        elif kind == "join":
            w = by_id[payload]
            if payload in crashed:
                continue
            joined.add(payload)
            beating = None
            running[payload] = None
            token[payload] += 1
            handle(WorkerJoined(w.id, w.id, "sim", f"GPU-{w.id}", w.weight, w.stages, now))
            handle(WorkRequested(w.id, now))
        elif kind == "die":
            crashed.add(payload)
            beating = None
        elif kind == "submit":
            sim_job: SimJob = payload
            handle(JobSubmitted(sim_job.id, STAGE, f"out/{sim_job.id}", file_specs(sim_job.costs, f"{sim_job.id}-"),
                                sim_job.weighted, sim_job.steal, now, sim_job.backup))
        elif kind in ("done", "fail"):
            wid, task, tok = payload[:3]
            if wid in crashed or token[wid] != tok:
                continue
            running[wid] = None
            if kind == "done":
                handle(TaskSucceeded(wid, task, payload[3], False, now))
            else:
                handle(TaskFailed(wid, task, f"poison file on {wid}", now))
            handle(WorkRequested(wid, now))
        elif kind == "computed":
            wid, task, tok, seconds = payload
            if wid in crashed or token[wid] != tok:
                continue
            if wid in publishing:
                push(max(now, publishing[wid]), kind, payload)  # the previous output is still being published
                continue
            running[wid] = None
            publishing[wid] = now + by_id[wid].publish
            push(publishing[wid], "published", (wid, task, seconds))
            handle(WorkRequested(wid, now, finishing=task))
        elif kind == "published":
            wid, task, seconds = payload
            if wid in crashed:
                continue
            del publishing[wid]
            handle(TaskSucceeded(wid, task, seconds, False, now))
        elif kind == "revoked":
            wid, task = payload
            if wid in crashed:
                continue
            handle(TaskFailed(wid, task, "revoked by the broker", now))
            if running[wid] is None:
                handle(WorkRequested(wid, now))
        elif kind == "tick":
            if beating is None:
                beating = sorted(joined - crashed)
            for wid in beating:
                if stalled(wid, now):
                    continue
                handle(Heartbeat(wid, running[wid], now))
            handle(Tick(now))
            push(now + heartbeat_interval, "tick")
    result.end = now
    return result


def pull_queue_makespan(costs: Sequence[int], workers: Sequence[SimWorker]) -> float:
    """The makespan of a plain pull queue on these workers: each free worker takes the largest file left.

    Same simulated workers (their speed, slowdown and per-file overhead), no
    broker: the yardstick this broker's policies are measured against.
    """
    free = [(w.joins_at, n) for n, w in enumerate(workers)]
    heapq.heapify(free)
    end = 0.0
    for cost in sorted(costs, reverse=True):
        at, n = heapq.heappop(free)
        done = at + workers[n].seconds_for(cost, at) + workers[n].overhead
        end = max(end, done)
        heapq.heappush(free, (done, n))
    return end
