"""Draw one job's timeline from a throughput log: a row per worker, a bar per file, the job's lower bound.

    python tools/plot_timeline.py LOG.jsonl [--job ID] [-o timeline.png]

The lower bound is the makespan no schedule can beat on these workers:
max(total residues / sum of worker speeds, largest file / fastest speed),
with each worker's speed the residues per second it showed in this job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
import matplotlib

matplotlib.use("Agg")  # a file is the only output; no display may exist

import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from broker.records import TaskDone  # noqa: E402
from virnucpro.pipeline.gpu_weights import WeightFileError, WeightTable, load_weight_table  # noqa: E402
from virnucpro.weights.logs import ThroughputLog, ThroughputLogError, read_throughput_logs  # noqa: E402

SEEDED_COLOUR = "#4e79a7"
STOLEN_COLOUR = "#f28e2b"
BOUND_COLOUR = "#d62728"
MAKESPAN_COLOUR = "#555555"


@dataclass(frozen=True)
class WorkerRow:
    """One worker's files in a job, with its predicted and observed weight and speed."""

    worker: str
    model: str
    predicted_weight: float | None  # None when the log does not say
    observed_weight: float | None
    speed: float  # residues per second over its files in this job
    tasks: list[TaskDone]


def job_tasks(log: ThroughputLog, job: str) -> list[TaskDone]:
    return [task for task in log.tasks if task.job == job]


def worker_speeds(tasks: list[TaskDone]) -> dict[str, float]:
    """Residues per second of each worker over its files; workers with no measured time are left out."""
    residues: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for task in tasks:
        residues[task.worker] = residues.get(task.worker, 0) + task.residues
        seconds[task.worker] = seconds.get(task.worker, 0.0) + task.seconds
    return {w: residues[w] / seconds[w] for w in residues if seconds[w] > 0 and residues[w] > 0}


def lower_bound(tasks: list[TaskDone]) -> float:
    """Seconds from the job's first start that no schedule on these workers can beat."""
    speeds = worker_speeds(tasks)
    if not speeds:
        return 0.0
    # A file run twice (a backup copy, a worker declared dead) is still one file of work.
    costs = {task.file or f"#{n}": task.residues for n, task in enumerate(tasks)}
    return max(sum(costs.values()) / sum(speeds.values()), max(costs.values()) / max(speeds.values()))


def worker_rows(log: ThroughputLog, job: str, table: WeightTable) -> list[WorkerRow]:
    """The job's workers, fastest first."""
    tasks = job_tasks(log, job)
    speeds = worker_speeds(tasks)
    observed = {s.worker: s.observed_weight for s in log.summaries if s.job == job}
    predicted_summary = {s.worker: s.predicted_weight for s in log.summaries if s.job == job}
    by_worker: dict[str, list[TaskDone]] = {}
    for task in tasks:
        by_worker.setdefault(task.worker, []).append(task)
    rows = []
    for worker, own in by_worker.items():
        predicted = next((t.predicted_weight for t in own if t.predicted_weight is not None), None)
        rows.append(WorkerRow(
            worker=worker,
            model=table.model_name(own[0].gpu),
            predicted_weight=predicted if predicted is not None else predicted_summary.get(worker),
            observed_weight=observed.get(worker),
            speed=speeds.get(worker, 0.0),
            tasks=sorted(own, key=lambda t: t.start),
        ))
    rows.sort(key=lambda r: (-r.speed, r.worker))
    return rows


def _weight(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def _rate(residues_per_s: float) -> str:
    for size, unit in ((1e6, "M"), (1e3, "k")):
        if residues_per_s >= size:
            return f"{residues_per_s / size:.1f}{unit}"
    return f"{residues_per_s:.0f}"


def plot_timeline(log: ThroughputLog, job: str, output: Path, table: WeightTable) -> Path:
    """Draw `job` from `log` into the PNG (or any format matplotlib knows by suffix) `output`."""
    tasks = job_tasks(log, job)
    if not tasks:
        raise ValueError(f"no task_done records for job {job!r}")
    rows = worker_rows(log, job, table)
    t0 = min(task.start for task in tasks)
    makespan = max(task.time for task in tasks) - t0
    bound = lower_bound(tasks)
    stage = tasks[0].stage
    files = len({task.file or f"#{n}" for n, task in enumerate(tasks)})

    height = max(3.2, 1.6 + 0.62 * len(rows))
    fig, ax = plt.subplots(figsize=(12, height), dpi=110)
    bar = 0.66
    for y, row in enumerate(rows):
        for stolen in (False, True):
            spans = [(t.start - t0, t.seconds) for t in row.tasks if t.stolen == stolen]
            if spans:
                ax.broken_barh(
                    spans, (y - bar / 2, bar),
                    facecolors=STOLEN_COLOUR if stolen else SEEDED_COLOUR,
                    edgecolors="white", linewidth=0.7, hatch="///" if stolen else None,
                )
        # One column past the makespan line, clear of every bar and line.
        ax.text(
            makespan * 1.012, y, f"{len(row.tasks)} files\n{_rate(row.speed)} res/s",
            va="center", ha="left", fontsize=8, color="#333333",
        )

    ax.axvline(bound, color=BOUND_COLOUR, linestyle="--", linewidth=1.6)
    ax.axvline(makespan, color=MAKESPAN_COLOUR, linestyle=":", linewidth=1.4)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(
        [
            f"{r.worker}\n{r.model} · pred {_weight(r.predicted_weight)} · obs {_weight(r.observed_weight)}"
            for r in rows
        ],
        fontsize=9,
    )
    ax.invert_yaxis()  # fastest worker on top
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, makespan * 1.1 if makespan > 0 else 1.0)
    ax.set_xlabel("seconds since the job's first file started")
    ax.grid(axis="x", color="#dddddd", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)

    ratio = f" = {makespan / bound:.2f} × the lower bound ({bound:.1f} s)" if bound > 0 else ""
    ax.set_title(
        f"Job {job} · {stage} · {files} files on {len(rows)} workers\n"
        f"makespan {makespan:.1f} s{ratio}",
        loc="left", fontsize=11,
    )
    ax.legend(
        handles=[
            Patch(facecolor=SEEDED_COLOUR, edgecolor="white", label="file run by the worker it was seeded to"),
            Patch(facecolor=STOLEN_COLOUR, edgecolor="white", hatch="///", label="stolen file"),
            Line2D([], [], color=BOUND_COLOUR, linestyle="--", linewidth=1.6, label=f"lower bound {bound:.1f} s"),
            Line2D([], [], color=MAKESPAN_COLOUR, linestyle=":", linewidth=1.4, label=f"makespan {makespan:.1f} s"),
        ],
        loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, frameon=False, fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return output


@click.command()
@click.argument("log_path", metavar="LOG.jsonl", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--job", default=None, help="Job id to draw (default: the latest job in the log).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("timeline.png"),
              show_default=True, help="Image file to write; the suffix picks the format.")
def main(log_path: Path, job: str | None, output: Path) -> None:
    """Draw one job's timeline from a broker throughput log."""
    try:
        table = load_weight_table()
        log = read_throughput_logs([log_path])
    except (WeightFileError, ThroughputLogError) as exc:
        raise click.ClickException(str(exc)) from None
    if log.skipped:
        click.echo(f"{log_path}: skipped {len(log.skipped)} corrupt or truncated line(s), first {log.skipped[0]}",
                   err=True)
    jobs = log.jobs()
    if not jobs:
        raise click.ClickException(f"{log_path}: no task_done records; is this the broker's throughput log?")
    job = job if job is not None else jobs[-1]
    if job not in jobs:
        raise click.ClickException(f"{log_path}: no job {job!r}; jobs in this log: {', '.join(jobs)}")
    try:
        plot_timeline(log, job, output, table)
    except OSError as exc:
        raise click.ClickException(f"{output}: cannot write the image ({exc.strerror}); choose another -o") from None
    click.echo(f"Wrote {output} (job {job})")


if __name__ == "__main__":
    main()
