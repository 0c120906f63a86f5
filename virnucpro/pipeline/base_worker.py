"""Embedding-worker interface and static assignment of FASTA files to GPUs."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virnucpro.pipeline.fasta import fasta_stats
from virnucpro.pipeline.gpu_weights import WeightTable, assign_files_weighted, load_weight_table

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class BaseEmbeddingWorker(ABC):
    """What every embedding stage's worker provides: process its files, pick a batch size."""

    @abstractmethod
    def process_files_worker(
        self, file_subset: Sequence[Path], device_id: int, batch_size: int, output_dir: Path, **kwargs: Any
    ) -> tuple[list[Path], list[tuple[Path, str]]]:
        """Embed `file_subset` on one device; return (outputs written, (input, reason) failures)."""

    @abstractmethod
    def get_optimal_batch_size(self, device: torch.device) -> int:
        """Batch size (sequences or tokens, per model) that fits `device`."""


def count_sequences(path: str | Path) -> int:
    """Number of records in a FASTA file, streamed; FastaError names a bad file."""
    return fasta_stats(path).sequences


def assign_files_by_sequences(
    files: Sequence[Path],
    num_workers: int,
    use_weighted_assignment: bool = False,
    device_ids: Sequence[int] | None = None,
    weight_table: WeightTable | None = None,
) -> list[list[Path]]:
    """Split files among workers before a static (broker-less) run.

    Default: greedy bin-packing by sequence count, each file (largest first) to
    the worker with the fewest sequences so far. With use_weighted_assignment,
    each worker's GPU weight (device_ids[i], default i) is read and files are
    packed by residues with assign_files_weighted. Logs one line per worker.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    stats = [fasta_stats(path) for path in files]
    if not use_weighted_assignment:
        assignment: list[list[Path]] = [[] for _ in range(num_workers)]
        totals = [0] * num_workers
        for i in sorted(range(len(files)), key=lambda i: (-stats[i].sequences, i)):
            worker = min(range(num_workers), key=lambda w: (totals[w], w))
            assignment[worker].append(files[i])
            totals[worker] += stats[i].sequences
        logger.info("Assigned %d files to %d workers (bin-packing by sequences)", len(files), num_workers)
        for worker, subset in enumerate(assignment):
            logger.info("  Worker %d: %d files, %d sequences", worker, len(subset), totals[worker])
        return assignment

    import torch  # only the weighted path needs device names

    ids = list(device_ids) if device_ids is not None else list(range(num_workers))
    if len(ids) != num_workers:
        raise ValueError(f"got {len(ids)} device ids for {num_workers} workers; give one device id per worker")
    table = weight_table or load_weight_table()
    names = [torch.cuda.get_device_name(d) for d in ids]
    weights = [table.lookup(name) for name in names]
    packed = assign_files_weighted(list(range(len(files))), num_workers, weights, costs=[s.residues for s in stats])
    logger.info("Assigned %d files to %d GPUs (weighted bin-packing by residues)", len(files), num_workers)
    for worker, indices in enumerate(packed):
        logger.info(
            "GPU %d (%s, weight=%.2f): %d files, %d sequences",
            ids[worker], table.model_name(names[worker]), weights[worker],
            len(indices), sum(stats[i].sequences for i in indices),
        )
    return [[files[i] for i in indices] for indices in packed]
