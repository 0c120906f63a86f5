"""What the embedding backends share: the run of one file, token-budget batches, OOM halving, precision."""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from virnucpro.backends.interface import PRECISIONS, Cancelled
from virnucpro.pipeline.fasta import FastaError, read_fasta
from virnucpro.pipeline.features import save_features

__all__ = [
    "PRECISIONS",
    "EmbedBatch",
    "EmbeddingBackend",
    "ModelFormatError",
    "ModelNotFoundError",
    "PrecisionError",
    "autocast",
    "check_token_budget",
    "embed_in_batches",
    "has_native_bf16",
    "plan_batches",
    "read_records",
    "resolve_device",
    "resolve_precision",
]

logger = logging.getLogger(__name__)

EmbedBatch = Callable[[list[int]], torch.Tensor]


class ModelNotFoundError(FileNotFoundError):
    """A model the user named is not on this machine; the message says where it looked and what to pass."""


class ModelFormatError(ValueError):
    """A model file or directory exists but is not in the format its loader reads; the message says why."""


class PrecisionError(ValueError):
    """A precision this device cannot run; the message says what to pass instead."""


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


class EmbeddingBackend(ABC):
    """A model loaded once on one device; `run` embeds one FASTA file into one feature file.

    Subclasses load their model and say how to tokenise (`prepare`), how to
    embed one batch, and what input they refuse (`check`); reading, batching,
    cancellation and the output are the same for both models.
    """

    stage: str
    width: int  # features per sequence

    def __init__(self, device: str, token_budget: int, precision: str | None) -> None:
        self.device = resolve_device(device)
        self.token_budget = check_token_budget(token_budget)
        self.precision = resolve_precision(self.device, precision)

    def run(
        self, input_path: Path, output_path: Path, should_stop: Callable[[], bool] = lambda: False
    ) -> tuple[int, int]:
        """Embed every record of the FASTA input_path and save ids and features to output_path.

        Returns (sequences, residues). Raises Cancelled, writing nothing, when
        should_stop() turns True between batches.
        """
        started = time.monotonic()
        ids, sequences = read_records(input_path)
        self.check(input_path, ids, sequences)
        lengths, embed_batch = self.prepare(sequences)
        features = embed_in_batches(lengths, self.token_budget, embed_batch, should_stop) if ids \
            else torch.empty(0, self.width)
        save_features(output_path, self.stage, ids, features, self.precision)
        logger.debug("%s: %d sequences in %.2f s (%s)", input_path, len(ids), time.monotonic() - started,
                     self.precision)
        return len(ids), sum(len(sequence) for sequence in sequences)

    @abstractmethod
    def check(self, path: Path, ids: list[str], sequences: list[str]) -> None:
        """Raise FastaError naming `path` and the record for input this model cannot embed."""

    @abstractmethod
    def prepare(self, sequences: list[str]) -> tuple[list[int], EmbedBatch]:
        """Each sequence's length in tokens, and the function that embeds a batch of them by index."""

    def autocast(self) -> AbstractContextManager[object]:
        return autocast(self.device, self.precision)


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


def has_native_bf16(device: torch.device) -> bool:
    """True for a CUDA device that computes in bfloat16 natively (Ampere and later), not by emulation."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch < 2.4 has no emulation flag and reports native support only
            return bool(torch.cuda.is_bf16_supported())


def resolve_precision(device: torch.device, requested: str | None = None) -> str:
    """The precision a forward pass on `device` runs in: `requested`, or bf16 where native and fp32 elsewhere.

    bf16 on a GPU without native support would be emulated (slowly), so it
    is refused: PrecisionError says what to pass instead. On a CPU it is
    allowed (torch's CPU autocast), though rarely faster.
    """
    if requested is None:
        return "bf16" if has_native_bf16(device) else "fp32"
    if requested not in PRECISIONS:
        raise PrecisionError(f"precision {requested!r}: pass one of {', '.join(PRECISIONS)}")
    if requested == "bf16" and device.type == "cuda" and not has_native_bf16(device):
        raise PrecisionError(
            f"{device} ({torch.cuda.get_device_name(device)}) has no native bf16; "
            "pass --precision fp32, or leave --precision out to use what the GPU has"
        )
    return requested


def autocast(device: torch.device, precision: str) -> AbstractContextManager[object]:
    """The context a forward pass on `device` runs under: bf16 autocast, or none (fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


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
    """Features of every sequence as one array, one row each, in input order.

    `embed_batch(indices)` returns a CPU tensor with one row per index. Batches
    come from plan_batches. `should_stop` is asked before each batch; True
    raises Cancelled. A batch that runs out of GPU memory is halved and retried,
    and later batches of the same call are cut to that size too, so one
    oversized budget costs one failed batch per halving rather than one per
    batch; a single sequence that does not fit re-raises the error.
    """
    out: torch.Tensor | None = None
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
            if out is None:
                out = torch.empty(len(lengths), features.shape[1], dtype=features.dtype)
            out[batch] = features
            continue
        # Outside the except block the failed batch's tensors are unreferenced, so the cache can go back.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out if out is not None else torch.empty(0, 0)
