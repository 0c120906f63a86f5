"""Fixtures shared by both tiers: FASTA files written to a temporary directory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.support.fasta import write_fasta


@pytest.fixture
def fasta_factory(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str, lengths: Sequence[int]) -> Path:
        return write_fasta(tmp_path / name, lengths, prefix=Path(name).stem + "_")

    return make
