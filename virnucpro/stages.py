"""The stages a worker serves: what each writes for an input, and when an output counts as finished."""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".faa", ".fas")


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
    parse, and a torch `.pt` (a zip archive) must pass its CRC checks and be
    a feature file of this version (ids naming the rows of one float32
    array), so an older version's per-row format is computed again.
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
                if archive.testzip() is not None:
                    return False
            from virnucpro.pipeline.features import load_features

            load_features(path)
        return True
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False
