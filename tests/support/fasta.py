"""FASTA files for tests, with sequences that differ from record to record."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def write_fasta(path: Path, lengths: Sequence[int], prefix: str = "seq") -> Path:
    """A FASTA file with one record per length, sequence wrapped at 60 columns."""
    bases = "ACGT"
    with open(path, "w") as handle:
        for n, length in enumerate(lengths):
            sequence = "".join(bases[(n + i) % 4] for i in range(length))
            handle.write(f">{prefix}{n} description\n")
            for start in range(0, length, 60):
                handle.write(sequence[start : start + 60] + "\n")
    return path
