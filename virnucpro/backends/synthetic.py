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
    """Lists each record's id, length and SHA-256, and takes residues / speed seconds doing it."""

    stage = "synthetic"

    def __init__(self, speed: float) -> None:
        if not speed > 0:
            raise ValueError(f"synthetic speed must be positive (residues per second), got {speed!r}")
        self.speed = speed

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
        deadline = started + residues / self.speed
        while (remaining := deadline - time.monotonic()) > 0:
            if should_stop():
                raise Cancelled()
            time.sleep(min(remaining, CANCEL_CHECK))
        with open(output_path, "w", encoding="utf-8") as handle:
            json.dump({"sequences": len(records), "residues": residues, "records": records}, handle)
        return len(records), residues
