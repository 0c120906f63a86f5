"""Throughput-log records: the documented keys in order, lines written byte for byte, reading checked field by field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.records import RecordError, TaskDone, WorkerSummary, record_from_line

README = Path(__file__).resolve().parents[2] / "README.md"

TASK = TaskDone(
    time=1795964845.25, job="20261129-150724-c3b141", stage="esm", worker="w1", host="node1",
    gpu="NVIDIA H100 80GB HBM3", predicted_weight=2.5, file="/data/p0.fa", sequences=20, residues=2000,
    seconds=0.5, residues_per_s=4000.0, stolen=True, backup=True,
)
SUMMARY = WorkerSummary(
    time=1795964846.0, job="20261129-150724-c3b141", stage="esm", worker="w1", gpu="NVIDIA H100 80GB HBM3",
    predicted_weight=2.5, observed_weight=None, files=3, residues=6000, busy_seconds=1.5, residues_per_s=4000.0,
)


def test_task_done_keys_are_the_documented_ones_in_order():
    assert TaskDone.keys() == (
        "event", "time", "job", "stage", "worker", "host", "gpu", "predicted_weight", "file", "sequences",
        "residues", "seconds", "residues_per_s", "stolen", "backup",
    )


def test_worker_summary_keys_are_the_documented_ones_in_order():
    assert WorkerSummary.keys() == (
        "event", "time", "job", "stage", "worker", "gpu", "predicted_weight", "observed_weight", "files",
        "residues", "busy_seconds", "residues_per_s",
    )


@pytest.mark.parametrize("record", [TaskDone, WorkerSummary])
def test_readme_lists_each_records_keys_in_order(record):
    # "- `task_done`: `event, time` (when ...), `job, ...`": the code spans of the bullet after its name.
    bullet = re.search(rf"^- `{record.EVENT}`:(.*?)(?=^- |^$)", README.read_text(), re.MULTILINE | re.DOTALL)
    assert bullet is not None, f"README has no bullet for {record.EVENT}"
    spans = re.findall(r"`([^`]*)`", bullet.group(1))
    assert tuple(key.strip() for span in spans for key in span.split(",") if key.strip()) == record.keys()


def test_a_line_is_compact_json_with_the_keys_in_order_exactly_as_the_broker_writes_it():
    assert TASK.to_line() == (
        '{"event":"task_done","time":1795964845.25,"job":"20261129-150724-c3b141","stage":"esm","worker":"w1",'
        '"host":"node1","gpu":"NVIDIA H100 80GB HBM3","predicted_weight":2.5,"file":"/data/p0.fa","sequences":20,'
        '"residues":2000,"seconds":0.5,"residues_per_s":4000.0,"stolen":true,"backup":true}'
    )
    assert SUMMARY.to_line() == (
        '{"event":"worker_summary","time":1795964846.0,"job":"20261129-150724-c3b141","stage":"esm","worker":"w1",'
        '"gpu":"NVIDIA H100 80GB HBM3","predicted_weight":2.5,"observed_weight":null,"files":3,"residues":6000,'
        '"busy_seconds":1.5,"residues_per_s":4000.0}'
    )


names = st.text(max_size=40)
finite = st.floats(allow_nan=False, allow_infinity=False)
non_negative = st.floats(min_value=0.0, allow_infinity=False) | st.integers(min_value=0, max_value=10**12)
counts = st.integers(min_value=0, max_value=10**15)


@given(st.builds(
    TaskDone, time=finite, job=names, stage=names, worker=names, host=names, gpu=names,
    predicted_weight=st.none() | finite, file=names, sequences=counts, residues=counts, seconds=non_negative,
    residues_per_s=st.none() | non_negative, stolen=st.booleans(), backup=st.booleans(),
) | st.builds(
    WorkerSummary, time=finite, job=names, stage=names, worker=names, gpu=names, predicted_weight=st.none() | finite,
    observed_weight=st.none() | finite, files=counts, residues=counts, busy_seconds=st.none() | non_negative,
    residues_per_s=st.none() | non_negative,
))
def test_every_record_reads_back_from_its_line_and_writes_the_same_line_again(record):
    line = record.to_line()
    again = record_from_line(line)
    assert again == record and again.to_line() == line


def test_a_line_of_an_older_broker_without_optional_fields_reads_with_defaults():
    old = {"event": "task_done", "time": 5, "job": "j", "stage": "esm", "worker": "w", "gpu": "g",
           "residues": 10, "seconds": 1.0, "host": None}
    assert record_from_line(json.dumps(old)) == TaskDone(
        time=5, job="j", stage="esm", worker="w", host="", gpu="g", predicted_weight=None, file="", sequences=0,
        residues=10, seconds=1.0, residues_per_s=None, stolen=False, backup=False,
    )
    summary = record_from_line(json.dumps({"event": "worker_summary", "time": 5, "job": "j", "stage": "esm",
                                           "worker": "w", "gpu": "g"}))
    assert summary == WorkerSummary(time=5, job="j", stage="esm", worker="w", gpu="g")


def test_keys_a_record_does_not_define_are_ignored_and_other_events_read_as_none():
    assert record_from_line(json.dumps({**TASK.to_dict(), "added_by_a_newer_broker": 1})) == TASK
    assert record_from_line(json.dumps({"event": "job_submitted", "job": "j"})) is None
    assert record_from_line(json.dumps({"no_event": 1})) is None


@pytest.mark.parametrize("change,reason", [
    ({"residues": "many"}, "task_done record: field 'residues' = 'many' must be a whole number (0 or more)"),
    ({"residues": 2.5}, "task_done record: field 'residues' = 2.5 must be a whole number (0 or more)"),
    ({"seconds": -1.0}, "task_done record: field 'seconds' = -1.0 must not be negative"),
    ({"time": True}, "task_done record: field 'time' = True must be a finite number"),
    ({"stolen": "yes"}, "task_done record: field 'stolen' = 'yes' must be true or false"),
    ({"backup": 1}, "task_done record: field 'backup' = 1 must be true or false"),
    ({"worker": None}, "task_done record: field 'worker' = None must be a string"),
    ({"worker": 7}, "task_done record: field 'worker' = 7 must be a string"),
])
def test_a_bad_field_is_rejected_naming_the_record_the_field_its_value_and_what_it_must_be(change, reason):
    with pytest.raises(RecordError) as error:
        TaskDone.from_dict({**TASK.to_dict(), **change})
    assert str(error.value) == reason


def test_a_missing_required_field_is_rejected_by_name():
    line = {k: v for k, v in SUMMARY.to_dict().items() if k != "gpu"}
    with pytest.raises(RecordError, match="^worker_summary record: field 'gpu' is missing$"):
        WorkerSummary.from_dict(line)


@pytest.mark.parametrize("line,reason", [
    ('{"event": "task_done", "time": 12', "not valid JSON (truncated or corrupt line)"),
    ("[1, 2, 3]", "not a JSON object"),
])
def test_a_line_that_is_no_json_object_is_rejected_saying_so(line, reason):
    with pytest.raises(RecordError, match=re.escape(reason)):
        record_from_line(line)


def test_a_worker_summary_takes_its_figures_from_a_job_report_row():
    row = {"worker": "w1", "host": "node1", "gpu": "NVIDIA H100 80GB HBM3", "predicted_weight": 2.5,
           "observed_weight": None, "files": 3, "residues": 6000, "busy_seconds": 1.5, "residues_per_s": 4000.0,
           "stolen_files": 1}
    summary = WorkerSummary.of_report_row(row, time=1795964846.0, job="20261129-150724-c3b141", stage="esm")
    assert summary == SUMMARY
