"""What every backend provides to the worker: one stage, run on one task's input files at a time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

# What a model's forward pass can run in: bfloat16 autocast, or full float32 as the original tool.
PRECISIONS = ("bf16", "fp32")


class Cancelled(Exception):
    """The broker revoked the task while it ran; no output is published."""


@runtime_checkable
class Backend(Protocol):
    """A stage's model, loaded once; `run` processes one input file into one output file.

    `run` returns (sequences, residues) of the input and raises Cancelled,
    writing nothing, once `should_stop()` turns True.
    """

    stage: str

    def run(self, input_path: Path, output_path: Path, should_stop: Callable[[], bool]) -> tuple[int, int]: ...


@runtime_checkable
class PairBackend(Protocol):
    """A stage whose task reads two inputs and the job's classifier (classify) into one output file.

    `classifier` is the job's {"path", "sha256"}. `run_pair` returns
    (sequences, cost) and raises Cancelled, writing nothing, once
    `should_stop()` turns True.
    """

    stage: str

    def run_pair(self, path: Path, paired: Path, classifier: dict[str, str], output_path: Path,
                 should_stop: Callable[[], bool]) -> tuple[int, int]: ...

    def knows(self, sha256: str) -> bool:
        """True if the classifier with this digest is loaded already (its file need not be fetched)."""
        ...
