"""Shared fixtures: FASTA files written to a temporary directory."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pytest


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


@pytest.fixture
def fasta_factory(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str, lengths: Sequence[int]) -> Path:
        return write_fasta(tmp_path / name, lengths, prefix=Path(name).stem + "_")

    return make
