"""Progress of long runs, per stage: files, residues (or frames), the rate and the time left.

On a terminal, one live bar per stage. Anywhere else (a log file, a batch
system's output) a live display shows nothing until it ends, so instead one
plain line per stage is printed when the stage starts, every `interval`
seconds while it runs, and when it ends:

    14:02:31 esm: 12/41 files, 1,234,567/4,120,330 residues, 48,200 residues/s, ETA 0:01:00

The rate is measured here, over the last minute; the time left is the
broker's estimate (the stage's remaining residues, and those of older jobs
ahead of it on the same workers, at the combined speed of the workers that
serve it) when it gives one, else the remaining amount at the measured rate.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from virnucpro.client.jobs import Progress as JobProgress

LOG_INTERVAL = 30.0
RATE_WINDOW = 60.0  # seconds of history the rate is measured over


@dataclass
class _Stage:
    unit: str
    started: float
    samples: deque[tuple[float, int]] = field(default_factory=deque)  # (time, amount done)
    last: JobProgress | None = None
    printed: float | None = None
    ended: bool = False
    bar: TaskID | None = None

    def rate(self) -> float | None:
        """Amount per second over the window, or None until two samples lie apart."""
        if len(self.samples) < 2:
            return None
        (t0, a0), (t1, a1) = self.samples[0], self.samples[-1]
        return (a1 - a0) / (t1 - t0) if t1 > t0 else None


class StageProgress:
    """Shows the progress of several stages at once; use as a context manager around the run."""

    def __init__(self, console: Console, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.console = console
        self.interval = interval
        self.clock = clock
        self.wall = wall
        self.live = console.is_terminal
        self._stages: dict[str, _Stage] = {}
        self._bars: Progress | None = None
        if self.live:
            self._bars = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[line]}"),
                TimeElapsedColumn(), console=console, transient=False,
            )

    def __enter__(self) -> StageProgress:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._bars is not None:
            self._bars.stop()

    def update(self, stage: str, progress: JobProgress, unit: str = "residues") -> None:
        """Record the latest figures of `stage`; show them (a bar, or a line when one is due)."""
        now = self.clock()
        entry = self._stages.get(stage)
        if entry is None:
            entry = self._stages[stage] = _Stage(unit, now)
            if self._bars is not None:
                entry.bar = self._bars.add_task(stage, total=None, line="")
        if entry.ended:
            return
        entry.samples.append((now, progress.amount_done))
        while len(entry.samples) > 2 and entry.samples[1][0] <= now - RATE_WINDOW:
            entry.samples.popleft()
        entry.last = progress
        if self._bars is not None and entry.bar is not None:
            self._bars.update(entry.bar, total=max(progress.files, 1), completed=progress.done + progress.failed,
                              line=self.figures(stage))
        elif entry.printed is None or now - entry.printed >= self.interval or progress.ended:
            self.console.print(f"{time.strftime('%H:%M:%S', time.localtime(self.wall()))} {self.describe(stage)}",
                               markup=False, highlight=False, soft_wrap=True)
            entry.printed = now
        entry.ended = progress.ended

    def describe(self, stage: str) -> str:
        """`stage: done/total files, done/total unit, rate, ETA`, as the last figures say."""
        return f"{stage}: {self.figures(stage)}"

    def figures(self, stage: str) -> str:
        """`done/total files, done/total unit, rate, ETA` of `stage`, as the last figures say."""
        entry = self._stages[stage]
        p = entry.last
        if p is None:
            return "waiting"
        text = f"{p.done}/{p.files} files"
        if p.failed:
            text += f" ({p.failed} failed)"
        text += f", {p.amount_done:,}/{p.amount:,} {entry.unit}"
        rate = entry.rate()
        if rate is not None:
            text += f", {rate:,.0f} {entry.unit}/s"
        if p.ended:
            return text + f", done in {_clock(self.clock() - entry.started)}"
        eta = p.eta_seconds
        if eta is None and rate:
            eta = (p.amount - p.amount_done) / rate
        return text + f", ETA {_clock(eta) if eta is not None else '?'}"


def _clock(seconds: float) -> str:
    """H:MM:SS."""
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
