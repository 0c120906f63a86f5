"""Streaming FASTA (and FASTQ) reading with errors that name the file and say what is wrong."""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from Bio.SeqIO.FastaIO import SimpleFastaParser
from Bio.SeqIO.QualityIO import FastqGeneralIterator


class FastaError(ValueError):
    """A FASTA input that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class FastaStats:
    """Size of one FASTA file: record count and total residues (the file's cost)."""

    sequences: int
    residues: int


def _open_text(path: Path) -> IO[str]:
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise FastaError(f"{path}: file not found; check the path") from None
    except IsADirectoryError:
        raise FastaError(f"{path}: is a directory, not a FASTA file") from None
    except OSError as exc:
        raise FastaError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    magic = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
    stream = gzip.GzipFile(fileobj=raw) if magic == b"\x1f\x8b" else raw
    return io.TextIOWrapper(stream, encoding="ascii", newline=None)


def read_fasta(path: str | Path) -> Iterator[tuple[str, str]]:
    """Yield (header, sequence) per record, one record in memory at a time.

    Whitespace inside the sequence is dropped, as Biopython's SeqIO does.
    Plain or gzip-compressed files are accepted. Raises FastaError naming the
    file when it is missing, unreadable, binary, or does not start with '>'.
    An empty file yields nothing; callers that need records check for that.
    """
    return _read(Path(path), fastq=False)


def read_sequence_file(path: str | Path) -> Iterator[tuple[str, str]]:
    """As read_fasta, for a FASTA or a FASTQ file (told apart by its first character; qualities are ignored)."""
    return _read(Path(path), fastq=True)


def _read(path: Path, fastq: bool) -> Iterator[tuple[str, str]]:
    with _open_text(path) as handle:
        try:
            first = _first_content_line(handle)
            if first is None:
                return
            if first.startswith(">"):
                for header, sequence in SimpleFastaParser(_chain_line(first, handle)):
                    yield header, "".join(sequence.split())
            elif first.startswith("@") and fastq:
                handle.seek(0)  # the parser takes a file, not lines; it skips the blank lines before the first record
                try:
                    for header, sequence, _quality in FastqGeneralIterator(handle):
                        yield header, sequence
                except ValueError as exc:
                    if isinstance(exc, UnicodeDecodeError):
                        raise
                    raise FastaError(f"{path}: not a valid FASTQ file ({exc})") from None
            else:
                wanted = "'>' (FASTA) or '@' (FASTQ)" if fastq else "'>'"
                raise FastaError(
                    f"{path}: not a {'FASTA or FASTQ' if fastq else 'FASTA'} file (the first non-blank line must "
                    f"start with {wanted}, found {first[:40]!r})"
                )
        except UnicodeDecodeError:
            raise FastaError(f"{path}: not a text FASTA file (binary content)") from None
        except (OSError, EOFError) as exc:
            raise FastaError(f"{path}: cannot be read to the end ({exc}); the file may be truncated") from None


def _first_content_line(handle: IO[str]) -> str | None:
    for line in handle:
        if line.strip():
            return line
    return None


def _chain_line(first: str, handle: IO[str]) -> Iterator[str]:
    yield first
    yield from handle


def fasta_stats(path: str | Path) -> FastaStats:
    """Count records and residues of a FASTA file by streaming it.

    Raises FastaError naming the file if it has no records.
    """
    sequences = residues = 0
    for _title, sequence in read_fasta(path):
        sequences += 1
        residues += len(sequence)
    if sequences == 0:
        raise FastaError(f"{path}: holds no FASTA records; give a file with at least one '>' record")
    return FastaStats(sequences=sequences, residues=residues)
