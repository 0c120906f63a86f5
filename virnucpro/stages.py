"""What each embedding stage writes, when an output counts as finished, and how it is published."""

from __future__ import annotations

import errno
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".faa", ".fas")


class Cancelled(Exception):
    """The broker revoked the task while it ran; no output is published."""


@dataclass(frozen=True)
class Stage:
    name: str
    suffix: str  # appended to the input's stem to name its output
    help: str


STAGES: dict[str, Stage] = {
    "dnabert": Stage("dnabert", "_DNABERT_S.pt", "DNABERT-S embeddings of nucleotide files"),
    "esm": Stage("esm", "_ESM.pt", "ESM-2 embeddings of protein files"),
    "synthetic": Stage("synthetic", "_synthetic.json", "a stand-in that waits cost / speed seconds (benchmarks)"),
}


def input_stem(path: str | Path) -> str:
    """`output_3` for `output_3.fa` or `output_3.fa.gz`."""
    name = Path(path).name
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in FASTA_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_path(stage: str, input_path: str | Path, output_dir: str | Path) -> Path:
    """Where `stage` writes the output of `input_path`."""
    return Path(output_dir) / (input_stem(input_path) + STAGES[stage].suffix)


def is_complete(path: str | Path) -> bool:
    """True if `path` holds a whole, readable output.

    Outputs are published atomically, so a final name normally means a whole
    file; this also rejects one truncated or corrupted afterwards: JSON must
    parse, and a torch `.pt` (a zip archive) must pass its CRC checks.
    """
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
        if path.suffix == ".json":
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
            return True
        if path.suffix == ".pt":
            with zipfile.ZipFile(path) as archive:
                return archive.testzip() is None
        return True
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False


def publish(temporary: Path, final: Path) -> bool:
    """Give a fully written temporary file its final name, unless another copy got there first.

    The data is flushed to disk before the name appears, and the name is
    created with a hard link, which fails rather than replace an existing
    file: an output is written exactly once even when two workers finish
    the same file. Returns False (and removes `temporary`) if a complete
    output already existed.
    """
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    try:
        os.link(temporary, final)
    except FileExistsError:
        if is_complete(final):
            published = False
        else:
            # A damaged leftover (truncated by hand, a disk error) is not an output: replace it.
            os.replace(temporary, final)
            published = True
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
            raise
        # A file system without hard links: rename is still atomic, last writer wins.
        if final.exists():
            published = False
        else:
            os.replace(temporary, final)
            return True
    else:
        published = True
    temporary.unlink(missing_ok=True)
    _sync_directory(final.parent)
    return published


def _sync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the data itself is already synced
    finally:
        os.close(fd)
