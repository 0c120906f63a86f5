"""The synthetic stage: a stand-in GPU that takes cost / speed seconds per file (no model, no torch)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from virnucpro.backends.interface import Cancelled
from virnucpro.pipeline.fasta import read_fasta

# How often a waiting synthetic worker checks whether its task was revoked.
CANCEL_CHECK = 0.05


class SyntheticBackend:
    """Lists each record's id, length and SHA-256, and takes residues / speed seconds doing it.

    `change` = (after, speed): from `after` seconds past the start of its first
    file on, the device runs at the new speed (a GPU that throttles, or one
    that another job starts sharing), so a benchmark can slow a worker down
    halfway through a job. A file running at that moment does the work left
    at the new speed.
    """

    stage = "synthetic"

    def __init__(self, speed: float, change: tuple[float, float] | None = None) -> None:
        for value in (speed, *(change[1:] if change else ())):
            if not value > 0:
                raise ValueError(f"synthetic speed must be positive (residues per second), got {value!r}")
        if change is not None and not change[0] >= 0:
            raise ValueError(f"a synthetic speed change must come at or after the first file, got {change[0]!r} s")
        self.speed = speed
        self.change = change
        self._origin: float | None = None  # when the first file started

    def seconds_for(self, residues: int, started: float) -> float:
        """How long `residues` take from `started` (monotonic seconds), across the speed change if one falls due."""
        if self._origin is None:
            self._origin = started
        if self.change is None:
            return residues / self.speed
        after, speed = self.change
        before = max(0.0, self._origin + after - started)  # seconds left at the first speed
        if residues <= before * self.speed:
            return residues / self.speed
        return before + (residues - before * self.speed) / speed

    def run(self, input_path: Path, output_path: Path, should_stop: Callable[[], bool] = lambda: False) -> tuple[int, int]:
        started = time.monotonic()
        records = []
        residues = 0
        for header, sequence in read_fasta(input_path):
            records.append({
                "id": header.split(None, 1)[0] if header.strip() else "",
                "length": len(sequence),
                "sha256": hashlib.sha256(sequence.encode("ascii")).hexdigest(),
            })
            residues += len(sequence)
        if not records:
            raise ValueError(f"{input_path}: holds no FASTA records")
        # Reading counts towards the file's time: the whole file takes cost / speed.
        deadline = started + self.seconds_for(residues, started)
        while (remaining := deadline - time.monotonic()) > 0:
            if should_stop():
                raise Cancelled()
            time.sleep(min(remaining, CANCEL_CHECK))
        with open(output_path, "w", encoding="utf-8") as handle:
            json.dump({"sequences": len(records), "residues": residues, "records": records}, handle)
        return len(records), residues
