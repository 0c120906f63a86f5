"""Progress when the output is not a terminal: one plain line per stage at its start, every 30 s, and at its end."""

from __future__ import annotations

import io
import re

from rich.console import Console

from virnucpro.client.jobs import Progress
from virnucpro.client.progress import StageProgress

LINE = re.compile(r"^\d\d:\d\d:\d\d (\w+): (\d+)/(\d+) files(?: \(\d+ failed\))?, ([\d,]+)/([\d,]+) (\w+)(.*)$")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def log_progress() -> tuple[StageProgress, io.StringIO, Clock]:
    out = io.StringIO()
    clock = Clock()
    progress = StageProgress(Console(file=out, width=200, force_terminal=False), clock=clock, wall=lambda: 0.0)
    return progress, out, clock


def figures(done: int, amount_done: int, *, files: int = 10, amount: int = 10_000, eta: float | None = None,
            ended: bool = False, failed: int = 0) -> Progress:
    return Progress(files, done, failed, amount, amount_done, eta, ended)


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_a_log_gets_a_line_at_the_start_then_one_every_30_seconds_then_one_at_the_end():
    progress, out, clock = log_progress()
    with progress:
        for second in range(0, 95, 5):
            clock.now = 1000.0 + second
            progress.update("esm", figures(second // 10, second * 100, eta=100.0 - second))
        clock.now = 1100.0
        progress.update("esm", figures(10, 10_000, ended=True))
        progress.update("esm", figures(10, 10_000, ended=True))
    printed = lines(out)
    assert len(printed) == 5  # at 0, 30, 60 and 90 s, and the end
    assert all(LINE.match(line) for line in printed)
    assert printed[1].endswith("esm: 3/10 files, 3,000/10,000 residues, 100 residues/s, ETA 0:01:10")
    assert printed[-1].endswith("esm: 10/10 files, 10,000/10,000 residues, 100 residues/s, done in 0:01:40")


def test_each_stage_keeps_its_own_unit_and_clock():
    progress, out, clock = log_progress()
    with progress:
        progress.update("dnabert", figures(0, 0))
        progress.update("classify", figures(0, 0, files=0, amount=0), unit="frames")
        clock.now += 30
        progress.update("classify", figures(2, 600, files=4, amount=1200), unit="frames")
    printed = lines(out)
    assert [LINE.match(line).group(1) for line in printed] == ["dnabert", "classify", "classify"]
    assert printed[-1].endswith("classify: 2/4 files, 600/1,200 frames, 20 frames/s, ETA 0:00:30")


def test_the_brokers_estimate_is_the_eta_when_it_gives_one_and_a_failed_file_is_counted():
    progress, out, clock = log_progress()
    with progress:
        progress.update("esm", figures(0, 0))
        clock.now += 40
        progress.update("esm", figures(5, 4000, eta=600.0, failed=1))
    assert lines(out)[-1].endswith("esm: 5/10 files (1 failed), 4,000/10,000 residues, 100 residues/s, ETA 0:10:00")


def test_the_rate_is_measured_over_the_last_minute_only():
    progress, out, clock = log_progress()
    with progress:
        progress.update("esm", figures(0, 0))
        for minute in range(1, 4):
            clock.now += 60
            # 100 residues/s in the first minute, then 10 residues/s.
            progress.update("esm", figures(minute, 6000 + (minute - 1) * 600))
    assert ", 10 residues/s," in lines(out)[-1]


def test_before_any_figure_changes_the_eta_is_unknown():
    progress, out, _ = log_progress()
    with progress:
        progress.update("dnabert", figures(0, 0))
    assert lines(out)[0].endswith("dnabert: 0/10 files, 0/10,000 residues, ETA ?")
