"""Reading throughput logs: every usable record counts, every bad line is skipped and listed, never fatal."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from broker.records import LogRecord, TaskDone, WorkerSummary
from virnucpro.weights.logs import ThroughputLogError, read_throughput_logs


def job_records(job: str, files: int, start: float = 1.7e9) -> list[LogRecord]:
    """`files` task_done records of two workers in turn, then their two worker_summary records."""
    records: list[LogRecord] = [
        TaskDone(time=start + n, job=job, stage="esm", worker=f"w{n % 2}", host="node1", gpu="NVIDIA H100 PCIe",
                 predicted_weight=2.5, file=f"/data/{job}/part{n}.fa", sequences=10, residues=3000, seconds=1.0,
                 residues_per_s=3000.0, stolen=False)
        for n in range(files)
    ]
    return records + [
        WorkerSummary(time=start + files, job=job, stage="esm", worker=f"w{w}", gpu="NVIDIA H100 PCIe",
                      predicted_weight=2.5, observed_weight=2.5, files=files // 2, residues=3000 * (files // 2),
                      busy_seconds=files // 2, residues_per_s=3000.0)
        for w in range(2)
    ]


def write_log(path: Path, records: Sequence[LogRecord], extra_lines: Sequence[str] = ()) -> Path:
    with open(path, "w") as handle:
        handle.writelines(record.to_line() + "\n" for record in records)
        handle.writelines(extra_lines)
    return path


def test_records_read_back_equal_to_those_written(tmp_path):
    records = job_records("j", 4)
    log = read_throughput_logs([write_log(tmp_path / "log.jsonl", records)])
    assert log.tasks == records[:4] and log.summaries == records[4:]
    assert (log.skipped, log.other_records) == ([], 0)


def test_corrupt_and_truncated_lines_are_skipped_with_counts_and_line_numbers(tmp_path):
    records = job_records("j", 4)
    bad_type = dict(records[0].to_dict(), residues="many")
    missing = {k: v for k, v in records[0].to_dict().items() if k != "seconds"}
    path = tmp_path / "log.jsonl"
    write_log(path, records[:2], extra_lines=[
        "not json at all\n",                              # line 3
        json.dumps(bad_type) + "\n",                      # line 4
        "[1, 2, 3]\n",                                    # line 5
        json.dumps(missing) + "\n",                       # line 6
    ])
    with open(path, "ab") as handle:
        handle.write(b"\xff\xfe garbage\n")               # line 7
        handle.write((records[2].to_line() + "\n").encode())  # line 8
        handle.write(records[3].to_line()[:40].encode())      # line 9, cut off mid-write
    log = read_throughput_logs([path])
    assert log.tasks == records[:3]
    assert [s.line for s in log.skipped] == [3, 4, 5, 6, 7, 9]
    assert all(s.path == str(path) for s in log.skipped)
    assert [s.reason for s in log.skipped] == [
        "not valid JSON (truncated or corrupt line)",
        "task_done record: field 'residues' = 'many' must be a whole number (0 or more)",
        "not a JSON object",
        "task_done record: field 'seconds' is missing",
        "not UTF-8 text (corrupt line)",
        "not valid JSON (truncated or corrupt line)",
    ]
    assert str(log.skipped[-1]).startswith(f"{path}:9: ")


def test_other_event_types_and_blank_lines_are_ignored_not_counted_as_corrupt(tmp_path):
    path = write_log(tmp_path / "log.jsonl", job_records("j", 3), extra_lines=[
        "\n", json.dumps({"event": "job_submitted", "job": "j"}) + "\n", json.dumps({"no_event": 1}) + "\n",
        json.dumps({"event": ["not", "a", "name"]}) + "\n",
    ])
    log = read_throughput_logs([path])
    assert (len(log.tasks), len(log.summaries), log.other_records, log.skipped) == (3, 2, 3, [])


def test_several_logs_are_read_together_and_lines_are_numbered_per_file(tmp_path):
    first = write_log(tmp_path / "a.jsonl", job_records("a", 3), ["{oops\n"])
    second = write_log(tmp_path / "b.jsonl", job_records("b", 3, start=2e9), ["{oops\n"])
    log = read_throughput_logs([first, second])
    assert log.jobs() == ["a", "b"]
    assert [str(s).rsplit(":", 1)[0] for s in log.skipped] == [f"{first}:6", f"{second}:6"]


def test_jobs_are_ordered_by_their_last_finished_file_latest_last(tmp_path):
    records = job_records("late-start", 2, start=100.0) + job_records("early-start", 20, start=90.0)
    log = read_throughput_logs([write_log(tmp_path / "log.jsonl", records)])
    assert log.jobs() == ["late-start", "early-start"]


def test_missing_log_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(ThroughputLogError, match="nope.jsonl: throughput log not found"):
        read_throughput_logs([tmp_path / "nope.jsonl"])
