"""Feature files: the ids of one file's sequences and their features as one float32 array [N, D].

The DNABERT-S and ESM-2 stages each write one per input file, and the
merge writes one per file pair when asked to keep its features. All three
hold the same keys, so one function reads and checks them all. The
original tool stored a Python list of floats per row, which costs over a
millisecond per row to read back; one contiguous array reads at the speed
of the disk.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from virnucpro.atomic import atomic_write

FEATURE_STAGES = ("dnabert", "esm", "merged")
KEYS = ("stage", "precision", "ids", "data")


class FeatureFileError(ValueError):
    """A feature file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Features:
    """One feature file: which stage wrote it, in which precision, and row i of `data` is `ids[i]`."""

    stage: str
    precision: str | None
    ids: list[str]
    data: torch.Tensor


def save_features(path: str | Path, stage: str, ids: Sequence[str], data: torch.Tensor,
                  precision: str | None = None) -> None:
    """Write `ids` and `data` (one row per id, saved as contiguous float32) to `path`, atomically."""
    if stage not in FEATURE_STAGES:
        raise ValueError(f"stage must be one of {FEATURE_STAGES}, got {stage!r}")
    if data.ndim != 2 or data.shape[0] != len(ids):
        raise ValueError(f"{len(ids)} ids for data of shape {tuple(data.shape)}; give one row per id")
    if not all(ids) or any("\n" in i for i in ids):
        raise ValueError("ids must be non-empty and hold no line break: the first word of a FASTA header")
    data = data.to(dtype=torch.float32, device="cpu").contiguous()
    if data.storage_offset() != 0 or data.untyped_storage().nbytes() != data.numel() * data.element_size():
        data = data.clone()  # torch.save writes a view's whole storage: keep only these rows
    # The ids as one string, one per line: torch's safe unpickler reads one string much faster than many.
    content = {"stage": stage, "precision": precision, "ids": "\n".join(ids), "data": data}
    with atomic_write(path, "wb") as handle:
        torch.save(content, handle)


def load_features(path: str | Path, stage: str | None = None, remedy: str = "embed it again") -> Features:
    """The feature file at `path`, checked; FeatureFileError names the file and says to `remedy`.

    With `stage`, the file must have been written by that stage. The array
    is memory-mapped, not read: a caller that only looks at the ids pays
    for the ids alone.
    """
    path = Path(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise FeatureFileError(f"{path}: file not found; {remedy}") from None
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise FeatureFileError(
            f"{path}: not a readable feature file ({type(exc).__name__}: {exc}); {remedy}"
        ) from None
    if not isinstance(content, dict) or set(content) != set(KEYS):
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise FeatureFileError(
            f"{path}: holds {found}, not the keys {list(KEYS)} of this version's feature files "
            f"(an older version's per-row format?); {remedy}"
        )
    if stage is not None and content["stage"] != stage:
        raise FeatureFileError(f"{path}: written by the {content['stage']!r} stage, not {stage!r}; {remedy}")
    if not isinstance(content["ids"], str):
        raise FeatureFileError(f"{path}: its ids are not one string of lines; {remedy}")
    ids, data = content["ids"].split("\n") if content["ids"] else [], content["data"]
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.dtype != torch.float32 \
            or data.shape[0] != len(ids):
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise FeatureFileError(
            f"{path}: {len(ids)} ids for data of shape {shape}; ids must name the float32 rows one to one; {remedy}"
        )
    return Features(content["stage"], content["precision"], ids, data)


def count_precisions(paths: Iterable[str | Path]) -> dict[str, int]:
    """How many of the feature files at `paths` each precision computed; unreadable files are not counted."""
    counts: Counter[str] = Counter()
    for path in paths:
        try:
            counts[str(load_features(path).precision)] += 1
        except FeatureFileError:
            continue
    return dict(sorted(counts.items()))
