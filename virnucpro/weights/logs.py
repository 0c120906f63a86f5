"""Read the broker's throughput logs: JSON Lines files of `task_done` and `worker_summary` records.

Reading never stops at a bad line: it is skipped and listed with its file,
line number and reason, so a log cut off mid-write or damaged in places
still gives every record it holds. The records themselves (fields, checks,
defaults for older logs) are defined in broker.records, beside the broker
that writes them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from broker.records import RecordError, TaskDone, WorkerSummary, record_from_line


class ThroughputLogError(OSError):
    """A throughput log that cannot be opened; the message names the file."""


@dataclass(frozen=True)
class SkippedLine:
    """A log line that could not be used, and why."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class ThroughputLog:
    """The usable records of one or more logs, and the lines that were not."""

    tasks: list[TaskDone] = field(default_factory=list)
    summaries: list[WorkerSummary] = field(default_factory=list)
    skipped: list[SkippedLine] = field(default_factory=list)
    other_records: int = 0

    def jobs(self) -> list[str]:
        """Job ids in the order their last file finished, latest last."""
        last: dict[str, float] = {}
        for task in self.tasks:
            last[task.job] = max(last.get(task.job, -math.inf), task.time)
        return sorted(last, key=lambda job: (last[job], job))


def _read_line(raw: bytes, log: ThroughputLog, path: str, number: int) -> None:
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        log.skipped.append(SkippedLine(path, number, "not UTF-8 text (corrupt line)"))
        return
    if not text:
        return
    try:
        record = record_from_line(text)
    except RecordError as exc:
        log.skipped.append(SkippedLine(path, number, str(exc)))
        return
    if isinstance(record, TaskDone):
        log.tasks.append(record)
    elif isinstance(record, WorkerSummary):
        log.summaries.append(record)
    else:
        log.other_records += 1


def read_throughput_logs(paths: Iterable[str | Path]) -> ThroughputLog:
    """Parse JSON Lines throughput logs; bad lines are skipped and listed, never fatal.

    Blank lines and records of other event types are not errors: the broker
    may add event types, and a log appended across runs may hold blank lines.
    """
    log = ThroughputLog()
    for path in paths:
        try:
            with open(path, "rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    _read_line(raw, log, str(path), number)
        except FileNotFoundError:
            raise ThroughputLogError(f"{path}: throughput log not found; check the path") from None
        except OSError as exc:
            raise ThroughputLogError(f"{path}: throughput log cannot be read ({exc.strerror})") from None
    return log
