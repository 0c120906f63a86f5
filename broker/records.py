"""The throughput log's records, `task_done` and `worker_summary`: defined once, written and read as JSON lines.

The broker appends one record per line: a JSON object whose keys are "event"
and then the record's fields in the order they are defined here, an order
that is part of the log format the README documents. Reading checks every
field. A field with a default may be absent (or null): logs of an older
broker, which did not write it, still read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from dataclasses import fields as dataclass_fields
from typing import Annotated, Any, ClassVar, TypeVar, get_type_hints

from broker import fields
from broker.fields import Check, FieldError


class RecordError(ValueError):
    """A log line that holds no usable record; the message names the record type, the field and the fix."""


R = TypeVar("R", bound="LogRecord")


@dataclass(frozen=True, kw_only=True)
class LogRecord:
    """One line of the throughput log. Each field is Annotated with its check in broker.fields."""

    EVENT: ClassVar[str]

    # When it happened, Unix seconds (the scheduler's monotonic time until the server writes it).
    time: Annotated[float, fields.number]

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The keys of a line, in the order they are written."""
        return ("event", *(name for name, _, _ in _schema(cls)))

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.EVENT, **{name: getattr(self, name) for name, _, _ in _schema(type(self))}}

    def to_line(self) -> str:
        """The record as one line of the log, without the line break."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls: type[R], record: Mapping[str, Any]) -> R:
        """The record in a decoded line; RecordError if a field is missing or bad. Unknown keys are ignored."""
        values: dict[str, Any] = {}
        for name, check, default in _schema(cls):
            value = record.get(name)
            if value is None and default is not MISSING:
                continue
            if name not in record:
                raise RecordError(f"{cls.EVENT} record: field {name!r} is missing")
            try:
                check(value)
            except FieldError as exc:
                raise RecordError(f"{cls.EVENT} record: field {name!r} = {value!r} {exc}") from None
            values[name] = value
        return cls(**values)


_schemas: dict[type[LogRecord], tuple[tuple[str, Check, Any], ...]] = {}


def _schema(kind: type[LogRecord]) -> tuple[tuple[str, Check, Any], ...]:
    """(name, check, default or MISSING) of each field, in order; worked out once per record type."""
    if kind not in _schemas:
        hints = get_type_hints(kind, include_extras=True)
        _schemas[kind] = tuple((f.name, hints[f.name].__metadata__[0], f.default) for f in dataclass_fields(kind))
    return _schemas[kind]


@dataclass(frozen=True, kw_only=True)
class TaskDone(LogRecord):
    """One finished file: which worker and GPU ran it, how much work, how long."""

    EVENT: ClassVar[str] = "task_done"

    job: Annotated[str, fields.string]
    stage: Annotated[str, fields.string]
    worker: Annotated[str, fields.string]
    host: Annotated[str, fields.string] = ""
    gpu: Annotated[str, fields.string]
    predicted_weight: Annotated[float | None, fields.number] = None
    file: Annotated[str, fields.string] = ""
    sequences: Annotated[int, fields.count] = 0
    residues: Annotated[int, fields.count]
    seconds: Annotated[float, fields.non_negative]  # how long it ran
    residues_per_s: Annotated[float | None, fields.non_negative] = None  # None when it took no measurable time
    # True when it ran on a worker other than the one it was seeded to (stolen, or handed over from a dead one).
    stolen: Annotated[bool, fields.flag] = False
    # True when the copy that finished was a backup, run beside a straggling copy that was then revoked.
    backup: Annotated[bool, fields.flag] = False

    @property
    def start(self) -> float:
        return self.time - self.seconds


@dataclass(frozen=True, kw_only=True)
class WorkerSummary(LogRecord):
    """One worker's totals at the end of a job, as the broker saw them."""

    EVENT: ClassVar[str] = "worker_summary"

    job: Annotated[str, fields.string]
    stage: Annotated[str, fields.string]
    worker: Annotated[str, fields.string]
    gpu: Annotated[str, fields.string]
    predicted_weight: Annotated[float | None, fields.number] = None
    # residues_per_s x (sum of the job's predicted weights) / (sum of the job's residues_per_s);
    # None when no worker of the job measured a speed.
    observed_weight: Annotated[float | None, fields.number] = None
    files: Annotated[int, fields.count] = 0
    residues: Annotated[int, fields.count] = 0
    busy_seconds: Annotated[float | None, fields.non_negative] = None
    residues_per_s: Annotated[float | None, fields.non_negative] = None

    @classmethod
    def of_report_row(cls, row: Mapping[str, Any], *, time: float, job: str, stage: str) -> WorkerSummary:
        """The summary of one worker row of a job report, which holds these figures under the same names and more."""
        given: dict[str, Any] = {"time": time, "job": job, "stage": stage}
        return cls(**given, **{name: row[name] for name, _, _ in _schema(cls) if name not in given})


RECORDS: dict[str, type[LogRecord]] = {kind.EVENT: kind for kind in (TaskDone, WorkerSummary)}


def record_from_line(line: str) -> LogRecord | None:
    """The record on one line of the log, None for an event of another type, RecordError for a bad line."""
    try:
        record = json.loads(line)
    except ValueError:
        raise RecordError("not valid JSON (truncated or corrupt line)") from None
    if not isinstance(record, dict):
        raise RecordError("not a JSON object")
    event = record.get("event")
    kind = RECORDS.get(event) if isinstance(event, str) else None
    return None if kind is None else kind.from_dict(record)
