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
    fasta_input: bool = True  # its task reads one FASTA file (`virnucpro embed` can submit it)


STAGES: dict[str, Stage] = {
    "dnabert": Stage("dnabert", "_DNABERT_S.pt", "DNABERT-S embeddings of nucleotide files"),
    "esm": Stage("esm", "_ESM.pt", "ESM-2 embeddings of protein files"),
    # A task per file pair k: its two feature files in, its prediction rows out (work/classify/output_k_predictions.tsv).
    "classify": Stage("classify", "_predictions.tsv", "the classifier's scores of a file pair's features",
                      fasta_input=False),
    "synthetic": Stage("synthetic", "_synthetic.json", "a stand-in that waits cost / speed seconds (benchmarks)"),
}
# The stages a worker with models serves unless told otherwise: both embeddings, and classify beside them.
MODEL_STAGES = ("dnabert", "esm", "classify")


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


def is_complete(path: str | Path, classifier_sha256: str | None = None) -> bool:
    """True if `path` holds a whole, readable output.

    Outputs are published atomically, so a final name normally means a whole
    file; this also rejects one truncated or corrupted afterwards: JSON must
    parse, a torch `.pt` (a zip archive) must pass its CRC checks and be
    a feature file of this version (ids naming the rows of one float32
    array), so an older version's per-row format is computed again, and a
    per-pair predictions file (`.tsv`) must hold every row its header counts
    and, given `classifier_sha256`, have been made by that classifier.
    """
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
        if path.suffix == ".json":
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
            return True
        if path.suffix == ".tsv":
            from virnucpro.pipeline.outputs import check_pair_file

            made_by = check_pair_file(path).classifier_sha256
            return classifier_sha256 is None or made_by == classifier_sha256
        if path.suffix == ".pt":
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is not None:
                    return False
            from virnucpro.pipeline.features import load_features

            load_features(path)
        return True
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False
