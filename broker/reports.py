"""What the scheduler core tells people: job reports, progress counts, status snapshots, the makespan bound.

Everything here reads the core's records and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from broker.protocol import UNTIMED_STAGES
from broker.state import Job, Task, Worker


class SchedulerView(Protocol):
    """The read-only part of the scheduler a status snapshot needs."""

    workers: dict[str, Worker]
    jobs: dict[str, Job]
    tasks: dict[str, Task]
    counters: dict[str, int]

    @property
    def unowned_count(self) -> int: ...

    @property
    def measured(self) -> bool: ...

    def scale(self) -> float: ...

    def speed_of(self, worker: Worker, scale: float | None = None) -> float: ...

    def capable(self, stage: str) -> list[Worker]: ...


def job_report(job: Job, workers: Iterable[Worker]) -> dict[str, Any]:
    """The per-worker figures, makespan, steals, backup copies, wasted seconds and failures of a job.

    wasted_seconds: what copies of its files ran before they were revoked
    because another copy of the same file finished first.
    """
    rows = []
    for worker in workers:
        stats = worker.per_job.get(job.id)
        if stats is not None and stats.files:
            speed = stats.residues / stats.busy_seconds if stats.busy_seconds > 0 else 0.0
            rows.append((worker, stats, speed))
    sum_predicted = sum(w.weight for w, _, _ in rows)
    sum_speed = sum(speed for _, _, speed in rows)
    rows_out = [
        {
            "worker": w.name, "host": w.host, "gpu": w.gpu, "predicted_weight": w.weight,
            "observed_weight": speed * sum_predicted / sum_speed if sum_speed > 0 else None,
            "files": s.files, "residues": s.residues, "busy_seconds": s.busy_seconds,
            "residues_per_s": speed, "stolen_files": s.stolen,
        }
        for w, s, speed in rows
    ]
    costs = [t.cost for t in job.tasks if t.state == "done"]
    speeds = [speed for _, _, speed in rows if speed > 0]
    lower_bound = makespan_lower_bound(costs, speeds) if costs and speeds else None
    return {
        "job": job.id, "stage": job.stage, "state": job.state, "weighted": job.weighted, "steal": job.steal,
        "backup": job.backup, "files": len(job.tasks), "done": job.done, "failed": job.failed, "steals": job.steals,
        "backups": job.backups, "backups_won": job.backups_won, "wasted_seconds": job.wasted_seconds,
        "submitted": job.submitted, "finished": job.finished,
        "makespan": job.finished - job.submitted if job.finished is not None else None,
        "lower_bound": lower_bound,
        "failures": [{"file": t.spec.path, "attempts": list(t.attempts), "deaths": list(t.deaths)}
                     for t in job.tasks if t.state == "failed"],
        "workers": rows_out,
    }


def failure_lines(failure: dict[str, Any]) -> list[str]:
    """Every reason a failed file gave, as `worker: reason`: its failed attempts, then the workers that died running
    it."""
    return [f"{a['worker']}: {a['reason']}" for a in [*failure["attempts"], *failure.get("deaths", [])]]


def failure_reasons(failure: dict[str, Any]) -> str:
    """Every reason a failed file gave, on one line."""
    return "; ".join(failure_lines(failure))


def job_progress(view: SchedulerView, job: Job, scale: float | None = None) -> dict[str, Any]:
    """Counts a waiting client shows, and the broker's estimate of the seconds left (None before it has one).

    Costs O(workers), not O(files), however large the job: clients ask for
    it several times a second.
    """
    running = {w.running for w in view.workers.values() if w.running is not None}
    return {
        "files": len(job.tasks), "done": job.done, "failed": job.failed, "sealed": job.sealed,
        "running": sum(1 for task in running if view.tasks[task].job is job),
        "residues": job.residues, "residues_done": job.residues_done, "steals": job.steals,
        "backups": job.backups, "backups_won": job.backups_won, "wasted_seconds": job.wasted_seconds,
        "eta_seconds": _eta(view, job, view.scale() if scale is None else scale),
    }


def _eta(view: SchedulerView, job: Job, scale: float) -> float | None:
    """Seconds until the job's remaining residues are done at the capable workers' combined speed.

    Workers run older jobs' files first, so the residues older running jobs
    still hold for the same workers count as ahead of this job's. None for a
    stage whose cost the workers' speeds do not measure (UNTIMED_STAGES).
    The files that failed are not remaining; they are few, so only a job
    that has some pays for finding them.
    """
    if not job.open or not view.measured or job.stage in UNTIMED_STAGES:
        return None
    capable = view.capable(job.stage)
    speed = sum(view.speed_of(w, scale) for w in capable)
    failed = sum(t.cost for t in job.tasks if t.state == "failed") if job.failed else 0
    remaining = job.residues - job.residues_done - failed
    stages = {stage for w in capable for stage in w.stages}
    ahead = sum(other.residues - other.residues_done for other in view.jobs.values()
                if other.open and other.seq < job.seq and other.stage in stages and other.stage not in UNTIMED_STAGES)
    return (ahead + remaining) / speed if speed > 0 else None


# Workers and jobs per status page: a status reply stays small however many the broker has heard of.
STATUS_PAGE = 50


def status_snapshot(view: SchedulerView, now: float, page: int = 0) -> dict[str, Any]:
    """A snapshot for `virnucpro-broker status`: summaries and counters, and one page of workers and jobs.

    Page 0 holds the living workers first, then the dead ones most recently
    heard first, and the most recent jobs; page k the STATUS_PAGE of each
    after those of page k - 1. `pages` says how many there are.
    """
    scale = view.scale()
    everyone = list(view.workers.values())
    ordered = [w for w in everyone if w.alive] + sorted(
        (w for w in everyone if not w.alive), key=lambda w: w.last_seen, reverse=True
    )
    all_jobs = list(view.jobs.values())
    first = page * STATUS_PAGE
    pages = max(1, -(-max(len(ordered), len(all_jobs)) // STATUS_PAGE))
    serving: dict[str, int] = {}
    for w in everyone:
        if w.alive:
            for stage in w.stages:
                serving[stage] = serving.get(stage, 0) + 1
    summary = {
        "workers": len(everyone), "alive": sum(1 for w in everyone if w.alive), "serving": serving,
        "jobs": len(all_jobs), "running_jobs": sum(1 for j in all_jobs if j.open),
    }
    workers = []
    for w in ordered[first:first + STATUS_PAGE]:
        running = view.tasks.get(w.running) if w.running else None
        workers.append({
            "worker": w.name, "host": w.host, "gpu": w.gpu, "alive": w.alive, "stages": list(w.stages),
            "predicted_weight": w.weight, "observed_weight": w.speed / scale if w.speed else None,
            "speed": w.speed, "queue": len(w.queue), "queued_residues": w.queued_cost,
            "running": running.spec.path if running else None, "running_job": running.job.id if running else None,
            "running_for": now - w.running_since if running else None, "overdue": w.overdue,
            "files_done": w.done_files, "steals_in": w.steals_in, "steals_out": w.steals_out,
            "silent_for": now - w.last_seen, "gauges": w.gauges,
        })
    jobs = [
        {"job": j.id, "stage": j.stage, "state": j.state, "weighted": j.weighted, "steal": j.steal,
         "backup": j.backup, "submitted": j.submitted, **job_progress(view, j, scale)}
        for j in all_jobs[max(0, len(all_jobs) - first - STATUS_PAGE):max(0, len(all_jobs) - first)]
    ]
    return {"workers": workers, "jobs": jobs, "unowned": view.unowned_count, "counters": dict(view.counters),
            "summary": summary, "page": page, "pages": pages}


def living_workers(status: dict[str, Any], stage: str) -> int:
    """How many living workers serve `stage`, from a status snapshot."""
    return int(status["summary"]["serving"].get(stage, 0))


def makespan_lower_bound(costs: Sequence[float], speeds: Sequence[float]) -> float:
    """The shortest possible makespan of files with these costs on workers of these speeds.

    Even with files split at will, the k largest files need the k fastest
    workers for at least (their cost) / (those speeds), and everything needs
    total / (all speeds). The maximum over k includes the classic
    max(total / sum of speeds, largest / fastest) and is at least as tight.
    """
    largest = sorted(costs, reverse=True)
    fastest = sorted(speeds, reverse=True)
    bound = sum(largest) / sum(fastest)
    cost_sum = speed_sum = 0.0
    # Prefixes of k = 1 .. min(files, workers - 1); k = workers is the total bound above.
    for cost, speed in zip(largest, fastest[:-1], strict=False):
        cost_sum += cost
        speed_sum += speed
        bound = max(bound, cost_sum / speed_sum)
    return bound
