"""The reads of a sample, checked as they stream: one id per read, nucleotides, no empty record.

A read's id is the first word of its header, split on any whitespace (a
space or a tab), as Biopython's record.id. Everything downstream is keyed by
it (chunk and frame ids, the per-chunk consensus), so two reads sharing an
id would be scored with each other's features and reported as one: that is
refused, or, when asked, the later copies are renamed id.2, id.3, ...
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np

from virnucpro.pipeline.fasta import FastaError, read_sequence_file

NAMED_DUPLICATES = 5  # duplicate ids named in the error
PROTEIN_SAMPLE = 100_000  # letters looked at before deciding whether the input is protein
NUCLEOTIDE_CODES = "ACGTUN"
MIN_NUCLEOTIDE_FRACTION = 0.5


class IdSet:
    """The ids seen so far, in about 20 bytes each instead of a Python set's 100.

    An id is kept as a 128-bit digest (120 bits of BLAKE2b, then a 1 byte so
    that numpy's fixed-width bytes never lose a trailing zero): most in one
    sorted numpy array, the newest in a small Python set that is merged into
    the array once it holds a sixteenth as many. Two distinct ids share a
    digest with probability about n^2 / 2^121: 2e-22 for 22 million reads.
    """

    MIN_MERGE = 4096

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype="S16")
        self._recent: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def add(self, read_id: str) -> bool:
        """Add `read_id`; True if it was not there yet."""
        key = hashlib.blake2b(read_id.encode(), digest_size=15).digest() + b"\x01"
        if key in self._recent:
            return False
        index = int(self._sorted.searchsorted(key))
        if index < len(self._sorted) and self._sorted[index] == key:
            return False
        self._recent.add(key)
        if len(self._recent) >= max(self.MIN_MERGE, len(self._sorted) // 16):
            recent = np.sort(np.array(list(self._recent), dtype="S16"))
            self._sorted = np.insert(self._sorted, self._sorted.searchsorted(recent), recent)
            self._recent.clear()
        return True


class SampleReads:
    """(id, sequence) of every usable read of a FASTA or FASTQ file, checked in the one pass that reads it.

    Iterating raises FastaError naming the file for: a record without an id;
    duplicate ids (naming the first few), unless `rename_duplicates`; an
    input that looks like protein; no record at all. Empty records are
    skipped. After the pass, `reads`, `empty` and `renamed` count them.
    """

    def __init__(self, path: str | Path, rename_duplicates: bool = False) -> None:
        self.path = Path(path)
        self.rename_duplicates = rename_duplicates
        self.reads = self.empty = self.renamed = 0

    def __iter__(self) -> Iterator[tuple[str, str]]:
        self.reads = self.empty = self.renamed = 0
        seen = IdSet()
        letters = nucleotides = 0
        records = enumerate(read_sequence_file(self.path), start=1)
        for number, (header, sequence) in records:
            read_id = self._id(number, header)
            if not sequence:
                self.empty += 1
                continue
            if not seen.add(read_id):
                if not self.rename_duplicates:
                    self._refuse_duplicates(read_id, records, seen)
                read_id = self._rename(read_id, seen)
            if letters < PROTEIN_SAMPLE:
                letters += len(sequence)
                upper = sequence.upper()
                nucleotides += sum(upper.count(code) for code in NUCLEOTIDE_CODES)
                if letters >= PROTEIN_SAMPLE:
                    self._check_nucleotides(letters, nucleotides)
            self.reads += 1
            yield read_id, sequence
        if self.reads == 0:
            if self.empty:
                raise FastaError(f"{self.path}: all {self.empty:,} records are empty; give reads with bases")
            raise FastaError(f"{self.path}: holds no FASTA records; give a FASTA or FASTQ file with at least one read")
        if letters < PROTEIN_SAMPLE:
            self._check_nucleotides(letters, nucleotides)

    def _id(self, number: int, header: str) -> str:
        words = header.split(maxsplit=1)
        if not words:
            raise FastaError(f"{self.path}: record {number:,} has an empty header; give every read an id")
        return words[0]

    def _rename(self, read_id: str, seen: IdSet) -> str:
        copy = 2
        while not seen.add(f"{read_id}.{copy}"):
            copy += 1
        self.renamed += 1
        return f"{read_id}.{copy}"

    def _refuse_duplicates(self, first: str, records: Iterator[tuple[int, tuple[str, str]]], seen: IdSet) -> NoReturn:
        """Read on (ids only) until NAMED_DUPLICATES ids repeat or the input ends, then raise naming them."""
        duplicates = [first]
        ended = True
        for number, (header, sequence) in records:
            read_id = self._id(number, header)
            if sequence and not seen.add(read_id) and read_id not in duplicates:
                duplicates.append(read_id)
                if len(duplicates) == NAMED_DUPLICATES:
                    ended = False
                    break
        if not ended:
            which = f"{NAMED_DUPLICATES} or more ids are each"
        else:
            which = f"{len(duplicates)} ids are each" if len(duplicates) > 1 else "1 id is"
        raise FastaError(
            f"{self.path}: {which} shared by several reads ({', '.join(duplicates)}); a read's id is the first "
            "word of its header, up to the first space or tab, and reads sharing one would be scored with each "
            "other's features (both mates of a pair in one file share theirs); make the ids unique, or pass "
            "--rename-duplicates to call the later copies id.2, id.3, ..."
        )

    def _check_nucleotides(self, letters: int, nucleotides: int) -> None:
        if letters and nucleotides < MIN_NUCLEOTIDE_FRACTION * letters:
            raise FastaError(
                f"{self.path}: looks like protein, not nucleotide reads: only {100 * nucleotides / letters:.0f}% of "
                f"its first {letters:,} letters are A, C, G, T, U or N; give the reads' DNA sequences"
            )
