"""Batching shared by the embedding backends: token-budget batches, OOM halving, precision, cancellation."""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from virnucpro.backends.interface import Cancelled
from virnucpro.pipeline.fasta import FastaError, read_fasta

__all__ = [
    "ModelFormatError",
    "ModelNotFoundError",
    "autocast_dtype",
    "check_token_budget",
    "embed_in_batches",
    "plan_batches",
    "precision",
    "read_records",
    "resolve_device",
]

logger = logging.getLogger(__name__)

EmbedBatch = Callable[[list[int]], torch.Tensor]


class ModelNotFoundError(FileNotFoundError):
    """A model the user named is not on this machine; the message says where it looked and what to pass."""


class ModelFormatError(ValueError):
    """A model file or directory exists but is not in the format its loader reads; the message says why."""


def read_records(path: str | Path) -> tuple[list[str], list[str]]:
    """(ids, sequences) of a FASTA file; the id is the first word of the header, as Biopython's record.id."""
    ids: list[str] = []
    sequences: list[str] = []
    for number, (header, sequence) in enumerate(read_fasta(path), start=1):
        words = header.split(maxsplit=1)
        if not words:
            raise FastaError(f"{path}: record {number} has an empty header; give every record an id")
        ids.append(words[0])
        sequences.append(sequence)
    return ids, sequences


def resolve_device(name: str) -> torch.device:
    """The torch device for `name` ('cpu', 'cuda', 'cuda:N'); ValueError says what this machine offers."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {name!r} is not a torch device; pass cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(
                f"device {name!r} is not available: this torch build sees {count} CUDA device(s); "
                "pass --device cpu or one of the listed GPUs"
            )
    return device


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 on a CUDA device with native bf16, else None: full fp32 (CPU, older GPUs)."""
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        try:
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
        except TypeError:  # torch < 2.4 has no emulation flag and reports native support only
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None


def precision(device: torch.device) -> AbstractContextManager[object]:
    """The autocast context a forward pass on `device` runs under (bf16 where native, else none)."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_token_budget(token_budget: int) -> int:
    """`token_budget` if it is a whole number of tokens >= 1; ValueError otherwise."""
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"token_budget must be an integer >= 1, got {token_budget!r}")
    return token_budget


def plan_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices into `lengths` grouped into batches, longest sequences first.

    A batch is padded to its longest member, so its cost is count x longest
    tokens; each batch stays within `token_budget`, except that a sequence
    longer than the budget forms a batch of its own. Longest first makes the
    largest batch run first, so a batch that does not fit shows at once.
    """
    check_token_budget(token_budget)
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if batch and (len(batch) + 1) * longest > token_budget:
            batches.append(batch)
            batch = []
        if not batch:
            longest = lengths[index]
        batch.append(index)
    if batch:
        batches.append(batch)
    return batches


def embed_in_batches(
    lengths: Sequence[int],
    token_budget: int,
    embed_batch: EmbedBatch,
    should_stop: Callable[[], bool] = lambda: False,
) -> torch.Tensor:
    """Features of every sequence, one row each, in input order.

    `embed_batch(indices)` returns a CPU tensor with one row per index. Batches
    come from plan_batches. `should_stop` is asked before each batch; True
    raises Cancelled. A batch that runs out of GPU memory is halved and retried,
    and later batches of the same call are cut to that size too, so one
    oversized budget costs one failed batch per halving rather than one per
    batch; a single sequence that does not fit re-raises the error.
    """
    rows: list[torch.Tensor | None] = [None] * len(lengths)
    pending = deque(plan_batches(lengths, token_budget))
    cap: int | None = None
    while pending:
        batch = pending.popleft()
        if cap is not None and len(batch) > cap:
            pieces = [batch[start : start + cap] for start in range(0, len(batch), cap)]
            pending.extendleft(reversed(pieces))
            continue
        if should_stop():
            raise Cancelled("cancelled between batches")
        try:
            features = embed_batch(batch)
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
            cap = (len(batch) + 1) // 2
            logger.warning(
                "out of GPU memory on a batch of %d sequences; retrying in batches of %d", len(batch), cap
            )
            pending.appendleft(batch)
        else:
            for index, row in zip(batch, features, strict=True):
                rows[index] = row
            continue
        # Outside the except block the failed batch's tensors are unreferenced, so the cache can go back.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not rows:
        return torch.empty(0, 0)
    return torch.stack(rows)  # type: ignore[arg-type]
