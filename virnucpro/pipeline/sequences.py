"""Cut reads into chunks, keep their stop-free reading frames, and split them into paired FASTA files.

These are the sequence stages of VirNucPro (docs/method.md, sections 1-3), done in
one streaming pass: memory does not grow with the input, so a 22M-read sample
is split as easily as a small one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice, product
from pathlib import Path

from virnucpro.atomic import atomic_write
from virnucpro.pipeline.fasta import FastaError
from virnucpro.pipeline.reads import SampleReads

EXPECTED_LENGTHS = (300, 500)
"""The chunk lengths the published classifiers (300_model.pth, 500_model.pth) were trained on."""

# The standard genetic code, codons in TCAG order; stops are '*'.
_CODON_TABLE = dict(
    zip(
        ("".join(codon) for codon in product("TCAG", repeat=3)),
        "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG", strict=True,
    )
)
_COMPLEMENT = str.maketrans("ACGT", "TGCA")
# Most frames of a read hold a stop codon; finding the first in-frame stop with
# the regex engine and skipping the frame is about 5x faster than translating
# every frame codon by codon first.
_IN_FRAME_STOP = re.compile(r"(?:...)*?(?:TAA|TAG|TGA)", re.DOTALL)


@dataclass(frozen=True)
class FilePair:
    """File k of the nucleotide set and of the protein set: the same ids, in the same order."""

    index: int
    nucleotide: Path
    protein: Path
    sequences: int


def chunk_spans(length: int, expected_length: int) -> list[tuple[int, int]]:
    """Half-open [start, end) spans that cut a read of `length` bases into chunks.

    n = ceil(L / C) chunks of C bases (the last cut at L), stepped back so they
    spread over the read. The surplus n*C - L is divided by n, not n - 1, as the
    original VirNucPro does: that quirk is kept so chunk ids and sequences match
    its outputs (1200/500 gives starts 0, 399, 798 and a last chunk of 402).
    A read with no bases has no chunk.
    """
    if length <= 0:
        return []
    n = -(-length // expected_length)
    surplus = n * expected_length - length
    q = surplus // n
    longer_steps = min(surplus - q * (n - 1), n - 1)
    spans = []
    start = 0
    for i in range(n):
        spans.append((start, min(start + expected_length, length)))
        start += expected_length - (q + 1 if i < longer_steps else q)
    return spans


def chunk_records(reads: Iterable[tuple[str, str]], expected_length: int) -> Iterator[tuple[str, str]]:
    """Yield (`<id>_chunk_<i>`, chunk) for every chunk of every (id, sequence) read."""
    for record_id, sequence in reads:
        for i, (start, end) in enumerate(chunk_spans(len(sequence), expected_length), start=1):
            yield f"{record_id}_chunk_{i}", sequence[start:end]


def translate_six_frames(record_id: str, sequence: str) -> Iterator[tuple[str, str, str]]:
    """Yield (frame_id, nucleotide, protein) for each kept frame, in order F1, F2, F3, R1, R2, R3.

    A frame is kept when its protein is not empty and has no stop. Codons with
    a base other than ACGT are left out of the protein. The nucleotide is the
    3p+1 bases from the frame's start (p = protein length), cut at the end, as
    the original slices it.
    """
    forward = sequence.upper()
    reverse = forward.translate(_COMPLEMENT)[::-1]
    for strand, strand_sequence in (("F", forward), ("R", reverse)):
        for frame in (1, 2, 3):
            offset = frame - 1
            if _IN_FRAME_STOP.match(strand_sequence, offset):
                continue
            protein = "".join(
                [_CODON_TABLE.get(strand_sequence[i : i + 3], "") for i in range(offset, len(strand_sequence) - 2, 3)]
            )
            if protein:
                yield f"{record_id}{strand}{frame}", strand_sequence[offset : frame + 3 * len(protein)], protein


def split_into_files(
    reads: SampleReads, work_dir: Path, expected_length: int, sequences_per_file: int = 10000
) -> list[FilePair]:
    """Chunk and translate the reads, writing paired files of `sequences_per_file` frames.

    Writes `work_dir/nucleotide/output_k.fa` and `work_dir/protein/output_k.fa`
    for k = 1, 2, ...; every file but the last holds exactly
    `sequences_per_file` records. Each file appears under its final name only
    once complete. Raises ValueError for a bad `expected_length` or
    `sequences_per_file`, and FastaError naming the input when it is
    missing, not FASTA or FASTQ, empty, fails a check of SampleReads, or has
    no open reading frame.
    """
    if expected_length not in EXPECTED_LENGTHS:
        raise ValueError(
            f"expected_length must be 300 or 500 (the lengths the published models were trained on), "
            f"got {expected_length!r}"
        )
    if sequences_per_file < 1:
        raise ValueError(f"sequences_per_file must be at least 1, got {sequences_per_file!r}")
    work_dir = Path(work_dir)
    frames = (
        frame
        for chunk_id, chunk in chunk_records(reads, expected_length)
        for frame in translate_six_frames(chunk_id, chunk)
    )

    nucleotide_dir, protein_dir = work_dir / "nucleotide", work_dir / "protein"
    pairs: list[FilePair] = []
    # Each turn takes one frame, and the inner loop the next sequences_per_file - 1
    # from the same generator: a file is only opened when it gets a record.
    for first_frame in frames:
        if not pairs:
            nucleotide_dir.mkdir(parents=True, exist_ok=True)
            protein_dir.mkdir(parents=True, exist_ok=True)
        index = len(pairs) + 1
        nucleotide_path = nucleotide_dir / f"output_{index}.fa"
        protein_path = protein_dir / f"output_{index}.fa"
        count = 0
        with atomic_write(nucleotide_path, encoding="ascii") as nucleotide_out, \
                atomic_write(protein_path, encoding="ascii") as protein_out:
            for frame_id, nucleotide, protein in chain([first_frame], islice(frames, sequences_per_file - 1)):
                nucleotide_out.write(f">{frame_id}\n{nucleotide}\n")
                protein_out.write(f">{frame_id}\n{protein}\n")
                count += 1
        pairs.append(FilePair(index, nucleotide_path, protein_path, count))
    if not pairs:
        raise FastaError(
            f"no open reading frame in any read of {reads.path}: every frame of every chunk has a stop "
            f"codon or no complete ACGT codon; check that the file holds nucleotide reads"
        )
    return pairs
