"""The job timeline plot: the lower bound it draws, the rows it lays out, and the tool end to end."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from broker.records import TaskDone, WorkerSummary
from tools import plot_timeline
from virnucpro.pipeline.gpu_weights import load_weight_table
from virnucpro.weights.logs import ThroughputLog


def task(worker: str, gpu: str, start: float, seconds: float, residues: int, file: str, job: str = "j",
         stolen: bool = False) -> TaskDone:
    return TaskDone(time=start + seconds, job=job, stage="synthetic", worker=worker, gpu=gpu, residues=residues,
                    seconds=seconds, predicted_weight=1.5 if "4090" in gpu else 1.0, file=file, stolen=stolen)


def two_worker_job(job: str = "j", start: float = 1000.0) -> list[TaskDone]:
    # w-fast runs 200 residues/s, w-slow 100 residues/s.
    return [
        task("w-fast", "NVIDIA GeForce RTX 4090", start, 2.0, 400, "a", job),
        task("w-fast", "NVIDIA GeForce RTX 4090", start + 2.0, 1.0, 200, "b", job, stolen=True),
        task("w-slow", "NVIDIA GeForce RTX 3090", start, 3.0, 300, "c", job),
    ]


def test_lower_bound_is_total_work_over_summed_speeds_when_no_file_dominates():
    # 900 residues over 300 residues/s of workers; the largest file alone needs 400 / 200 = 2 s.
    assert plot_timeline.lower_bound(two_worker_job()) == pytest.approx(3.0)


def test_lower_bound_is_the_largest_file_on_the_fastest_worker_when_one_file_dominates():
    tasks = [
        task("w-fast", "NVIDIA GeForce RTX 4090", 0.0, 10.0, 2000, "huge"),
        task("w-slow", "NVIDIA GeForce RTX 3090", 0.0, 1.0, 100, "tiny"),
    ]
    assert plot_timeline.lower_bound(tasks) == pytest.approx(2000 / 200)


def test_a_file_run_twice_counts_once_in_the_lower_bound():
    tasks = two_worker_job() + [task("w-slow", "NVIDIA GeForce RTX 3090", 1003.0, 3.0, 300, "c")]
    assert plot_timeline.lower_bound(tasks) == pytest.approx(900 / 300)


def test_rows_list_workers_fastest_first_with_model_and_both_weights():
    log = ThroughputLog(tasks=two_worker_job())
    rows = plot_timeline.worker_rows(log, "j", load_weight_table(None))
    assert [(r.worker, r.model, r.predicted_weight) for r in rows] == [
        ("w-fast", "RTX 4090", 1.5), ("w-slow", "RTX 3090", 1.0),
    ]
    assert [r.speed for r in rows] == [pytest.approx(200.0), pytest.approx(100.0)]


def test_rows_of_an_older_log_without_task_weights_take_the_predicted_weight_of_the_summary():
    tasks = [replace(t, predicted_weight=None) for t in two_worker_job()]
    summaries = [WorkerSummary(time=9e3, job="j", stage="synthetic", worker="w-fast", gpu="NVIDIA GeForce RTX 4090",
                               predicted_weight=1.5)]
    rows = plot_timeline.worker_rows(ThroughputLog(tasks=tasks, summaries=summaries), "j", load_weight_table(None))
    assert [(r.worker, r.predicted_weight, r.observed_weight) for r in rows] == [
        ("w-fast", 1.5, None), ("w-slow", None, None),
    ]


def test_latest_job_is_the_one_whose_last_file_finished_last():
    log = ThroughputLog(tasks=two_worker_job("old", 1000.0) + two_worker_job("new", 5000.0))
    assert log.jobs()[-1] == "new"


def write_log(path: Path, tasks: list[TaskDone]) -> Path:
    with open(path, "w") as handle:
        for t in tasks:
            handle.write(replace(t, host="h", sequences=1, residues_per_s=t.residues / t.seconds).to_line() + "\n")
        for job in sorted({t.job for t in tasks}):
            for worker, gpu, observed in (
                ("w-fast", "NVIDIA GeForce RTX 4090", 2.0), ("w-slow", "NVIDIA GeForce RTX 3090", 1.0),
            ):
                summary = WorkerSummary(time=9e3, job=job, stage="synthetic", worker=worker, gpu=gpu,
                                        predicted_weight=1.0, observed_weight=observed)
                handle.write(summary.to_line() + "\n")
        handle.write('{"event": "task_done", "time": 12')  # a record cut off mid-write
    return path


def run_tool(*args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> Result:
    monkeypatch.delenv("VIRNUCPRO_GPU_WEIGHTS", raising=False)
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(plot_timeline.main, list(args))


def test_tool_writes_a_png_of_the_latest_job_when_no_job_is_given(tmp_path, monkeypatch):
    log = write_log(tmp_path / "log.jsonl", two_worker_job("old", 1000.0) + two_worker_job("new", 5000.0))
    result = run_tool(str(log), "-o", "timeline.png", cwd=tmp_path, monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.output
    assert "job new" in result.stdout
    assert "skipped 1 corrupt or truncated line" in result.stderr
    image = (tmp_path / "timeline.png").read_bytes()
    assert image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 10_000


def test_tool_refuses_an_unknown_job_and_lists_the_jobs_in_the_log(tmp_path, monkeypatch):
    log = write_log(tmp_path / "log.jsonl", two_worker_job("old", 1000.0) + two_worker_job("new", 5000.0))
    result = run_tool(str(log), "--job", "missing", "-o", "t.png", cwd=tmp_path, monkeypatch=monkeypatch)
    assert result.exit_code != 0
    assert "no job 'missing'" in result.stderr and "old, new" in result.stderr
    assert not (tmp_path / "t.png").exists()
