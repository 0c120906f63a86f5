"""Write a small example FASTA of reads for `make demo`: some viral-like, some not, from a fixed seed.

Viral-like reads carry one long open reading frame (no stop codon over the
whole read in one frame), in an AT-rich codon usage. Host-like reads are
GC-rich and carry a long frame too, so both kinds reach the classifier; a few
purely random reads have a stop in every frame and are dropped by the ORF
filter, as real non-coding reads are. The same seed writes the same bytes.
"""

from __future__ import annotations

import argparse
import random
from itertools import product
from pathlib import Path

STOPS = {"TAA", "TAG", "TGA"}
SENSE_CODONS = ["".join(c) for c in product("ACGT", repeat=3) if "".join(c) not in STOPS]


def _codon_weights(at_bias: float) -> list[float]:
    """Weights favouring codons rich in A/T (at_bias > 1) or in G/C (at_bias < 1)."""
    return [at_bias ** sum(base in "AT" for base in codon) for codon in SENSE_CODONS]


def open_frame_read(rng: random.Random, length: int, at_bias: float) -> str:
    """A read with a stop-free frame over its whole length on a random strand and offset."""
    weights = _codon_weights(at_bias)
    offset = rng.randrange(3)
    codons = rng.choices(SENSE_CODONS, weights=weights, k=length // 3 + 2)
    read = ("".join(rng.choices("ACGT", k=offset)) + "".join(codons))[:length]
    if rng.random() < 0.5:
        read = read.translate(str.maketrans("ACGT", "TGCA"))[::-1]
    return read


def random_read(rng: random.Random, length: int) -> str:
    return "".join(rng.choices("ACGT", k=length))


def write_reads(path: Path, reads: int, seed: int) -> None:
    """`reads` records: about 45% viral-like, 45% host-like, 10% random, lengths 300-1200."""
    rng = random.Random(seed)
    lines = []
    for number in range(1, reads + 1):
        length = rng.randint(300, 1200)
        kind = rng.random()
        if kind < 0.45:
            name, sequence = "viral", open_frame_read(rng, length, at_bias=2.0)
        elif kind < 0.9:
            name, sequence = "host", open_frame_read(rng, length, at_bias=0.5)
        else:
            name, sequence = "random", random_read(rng, length)
        lines.append(f">{name}_{number:04d} length={length}")
        lines.extend(sequence[start : start + 60] for start in range(0, length, 60))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="FASTA file to write")
    parser.add_argument("--reads", type=int, default=300, help="number of reads (default 300)")
    parser.add_argument("--seed", type=int, default=1997, help="random seed (default 1997)")
    args = parser.parse_args()
    write_reads(args.output, args.reads, args.seed)
    print(f"wrote {args.reads} example reads to {args.output}")


if __name__ == "__main__":
    main()
