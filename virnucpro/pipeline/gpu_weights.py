"""GPU weight table and weighted bin-packing of files onto workers of different speeds.

A weight is a GPU model's embedding throughput relative to an RTX 3090 (1.00).
This module never imports torch at import time: the broker uses it too.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

logger = logging.getLogger(__name__)

WEIGHTS_ENV = "VIRNUCPRO_GPU_WEIGHTS"
BUILT_IN = "built-in"

GPU_WEIGHTS: dict[str, float] = {
    "RTX 3080": 0.90,
    "RTX 3090": 1.00,
    "RTX 4080": 1.35,
    "RTX 4090": 1.50,
    "RTX A6000": 1.10,
    "A100": 1.20,
    "H100": 2.50,
    "V100 16GB": 0.75,
    "V100 32GB": 0.80,
}

# Vendor and family words that torch.cuda.get_device_name() adds around the model.
_NOISE_TOKENS = frozenset({"NVIDIA", "GEFORCE", "TESLA", "QUADRO"})


def name_tokens(name: str) -> frozenset[str]:
    """The words of a device name that identify the model, upper-cased."""
    words = re.split(r"[\s\-_/]+", name.upper().strip())
    return frozenset(w for w in words if w and w not in _NOISE_TOKENS)


class WeightFileError(ValueError):
    """A weight file that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class WeightTable:
    """Device-model weights and where each came from (built-in or a file path)."""

    weights: Mapping[str, float]
    sources: Mapping[str, str]
    _warned: set[str] = field(default_factory=set, compare=False, repr=False)

    def match(self, device_name: str) -> str | None:
        """The table key for a device name, or None.

        A key matches when all its words appear in the name ("A100" matches
        "NVIDIA A100-SXM4-80GB"); among matches the key with most words wins,
        so a user's "A100 80GB" beats the built-in "A100".
        """
        tokens = name_tokens(device_name)
        best: tuple[int, int, str] | None = None
        for key in self.weights:
            key_tokens = name_tokens(key)
            if key_tokens and key_tokens <= tokens:
                rank = (len(key_tokens), len(key), key)
                if best is None or rank > best:
                    best = rank
        return best[2] if best else None

    def lookup(self, device_name: str) -> float:
        """The weight of a device; 1.0 with one warning per unknown name."""
        key = self.match(device_name)
        if key is not None:
            return self.weights[key]
        if device_name not in self._warned:
            self._warned.add(device_name)
            logger.warning(
                "GPU %r is not in the weight table; using weight 1.0. Add it to a TOML file "
                "under [weights] (e.g. \"%s\" = 1.3) and pass it with --gpu-weights FILE or %s=FILE.",
                device_name, device_name, WEIGHTS_ENV,
            )
        return 1.0

    def model_name(self, device_name: str) -> str:
        """Short model name for logs: the matching key, or the device name itself."""
        return self.match(device_name) or device_name


def read_weight_file(path: str | Path) -> dict[str, float]:
    """Read the [weights] table of a TOML weight file, validating every entry."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise WeightFileError(f"{path}: weight file not found; check --gpu-weights or ${WEIGHTS_ENV}") from None
    except OSError as exc:
        raise WeightFileError(f"{path}: weight file cannot be read ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise WeightFileError(f"{path}: not valid TOML ({exc})") from None
    table = document.get("weights")
    if not isinstance(table, dict):
        raise WeightFileError(
            f"{path}: no [weights] table; write one line per GPU model under [weights], "
            f'e.g. "RTX 4090" = 1.5'
        )
    weights: dict[str, float] = {}
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WeightFileError(f"{path}: weights.{key!r} = {value!r} is not a number; give a positive number")
        if not math.isfinite(value) or value <= 0:
            raise WeightFileError(f"{path}: weights.{key!r} = {value!r} must be a positive number")
        if not name_tokens(key):
            raise WeightFileError(f"{path}: weights key {key!r} names no device model")
        weights[key] = float(value)
    return weights


def load_weight_table(path: str | Path | None = None) -> WeightTable:
    """The built-in table, overridden and extended by a weight file.

    The file is `path` if given, else $VIRNUCPRO_GPU_WEIGHTS if set. A file
    key that names the same model as a built-in key replaces it.
    """
    if path is None:
        path = os.environ.get(WEIGHTS_ENV) or None
    weights = dict(GPU_WEIGHTS)
    sources = {key: BUILT_IN for key in weights}
    if path is not None:
        for key, value in read_weight_file(path).items():
            for built_in in [k for k in weights if name_tokens(k) == name_tokens(key)]:
                del weights[built_in]
                del sources[built_in]
            weights[key] = value
            sources[key] = str(path)
    return WeightTable(weights=weights, sources=sources)


def lookup_weight(device_name: str, table: WeightTable | None = None) -> float:
    """Weight of a device name in `table` (default: built-in plus $VIRNUCPRO_GPU_WEIGHTS)."""
    return (table or load_weight_table()).lookup(device_name)


def get_gpu_weight(device_id: int, table: WeightTable | None = None) -> float:
    """Weight of CUDA device `device_id`, by the name torch reports for it."""
    import torch  # deferred: the broker imports this module and must not load torch

    return lookup_weight(torch.cuda.get_device_name(device_id), table)


T = TypeVar("T")


def assign_files_weighted(
    files: Sequence[T],
    num_workers: int,
    gpu_weights: Sequence[float],
    costs: Sequence[float] | None = None,
    loads: Sequence[float] | None = None,
) -> list[list[T]]:
    """Weighted bin-packing: largest file first, to the worker that would finish it earliest.

    A file's cost is its residue count (read from the file unless `costs` is
    given); worker w finishes at (load_w + cost) / weight_w. `loads` is work
    already queued per worker (default none). Ties go to the lower worker
    index, so equal inputs give equal outputs. Returns one list per worker,
    in the order the files were given to it (largest first).
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    if len(gpu_weights) != num_workers:
        raise ValueError(f"got {len(gpu_weights)} GPU weights for {num_workers} workers; give one weight per worker")
    for index, weight in enumerate(gpu_weights):
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight of worker {index} is {weight!r}; weights must be positive numbers")
    if costs is None:
        from virnucpro.pipeline.fasta import fasta_stats

        costs = [fasta_stats(str(path)).residues for path in files]  # without costs, files are paths
    if len(costs) != len(files):
        raise ValueError(f"got {len(costs)} costs for {len(files)} files; give one cost per file")
    if any(c < 0 for c in costs):
        raise ValueError("file costs must not be negative")
    if loads is None:
        loads = [0.0] * num_workers
    if len(loads) != num_workers:
        raise ValueError(f"got {len(loads)} loads for {num_workers} workers; give one load per worker")

    # Workers of equal weight finish a file in the order of their loads, so each weight keeps a heap of
    # (load, worker); a file compares only the head of each heap: O(files x (weights + log workers)),
    # where the distinct weights are few (GPU models), instead of O(files x workers).
    heaps: dict[float, list[tuple[float, int]]] = {}
    for w, (load, weight) in enumerate(zip(loads, gpu_weights, strict=True)):
        heaps.setdefault(weight, []).append((float(load), w))
    for heap in heaps.values():
        heapq.heapify(heap)
    assignment: list[list[T]] = [[] for _ in range(num_workers)]
    for i in sorted(range(len(files)), key=lambda i: (-costs[i], i)):
        cost = costs[i]
        weight = min(heaps, key=lambda weight: ((heaps[weight][0][0] + cost) / weight, heaps[weight][0][1]))
        load, best = heapq.heappop(heaps[weight])
        assignment[best].append(files[i])
        heapq.heappush(heaps[weight], (load + cost, best))
    return assignment

