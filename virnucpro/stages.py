"""The stages a worker serves: what each writes for an input, and when an output counts as finished."""

from __future__ import annotations

import json
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

from broker import paths

FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".faa", ".fas")


@dataclass(frozen=True)
class Stage:
    name: str
    suffix: str  # appended to the input's stem to name its output
    help: str
    fasta_input: bool = True  # its task reads one FASTA file (`virnucpro embed` can submit it)
    input_suffix: str = ""  # for a stage that reads another's output: that suffix, cut off to find the stem


STAGES: dict[str, Stage] = {
    "dnabert": Stage("dnabert", "_DNABERT_S.pt", "DNABERT-S embeddings of nucleotide files"),
    "esm": Stage("esm", "_ESM.pt", "ESM-2 embeddings of protein files"),
    # A task per file pair k: its two feature files in, its prediction rows out (work/classify/output_k_predictions.tsv).
    "classify": Stage("classify", "_predictions.tsv", "the classifier's scores of a file pair's features",
                      fasta_input=False, input_suffix="_DNABERT_S.pt"),
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
    """Where `stage` writes the output of `input_path` (a classify task's input is the pair's DNABERT-S features:
    `output_3_DNABERT_S.pt` gives `output_3_predictions.tsv`)."""
    cut = STAGES[stage].input_suffix
    name = Path(input_path).name
    stem = name[: -len(cut)] if cut and name.endswith(cut) and name != cut else input_stem(input_path)
    return Path(output_dir) / (stem + STAGES[stage].suffix)


class OutputRefused(ValueError):
    """A task whose output this worker will not write: the reason says which path and why."""


def task_output(stage: str, input_path: str, output_dir: str, claimed: str | None = None) -> Path:
    """Where a worker writes the output of a task: derived here from the stage, the input and the job's directory.

    The worker never writes where a message tells it to: OutputRefused if
    the directory is not one a job may name (broker.paths), if the derived
    name holds a control character, or if `claimed` (the output the broker
    sent) is not the derived path.
    """
    problem = paths.output_dir_problem(output_dir)
    if problem:
        raise OutputRefused(problem)
    output = output_path(stage, input_path, output_dir)
    bad = paths.control_character(output.name)
    if bad is not None:
        raise OutputRefused(f"the output name {output.name!r} (from the input's name) holds the control character "
                            f"{bad}; rename the input")
    if claimed is not None and claimed != str(output):
        raise OutputRefused(f"the broker names the output {claimed!r}, but a {stage} task of {input_path!r} writes "
                            f"{str(output)!r}")
    return output


def is_complete(path: str | Path, classifier_sha256: str | None = None) -> bool:
    """True if `path` holds a whole, readable output, and is a regular file rather than a link to one.

    Outputs are published atomically, so a final name normally means a whole
    file; this also rejects one truncated or corrupted afterwards: JSON must
    parse, a torch `.pt` (a zip archive) must pass its CRC checks and be
    a feature file of this version (ids naming the rows of one float32
    array), so an older version's per-row format is computed again, and a
    per-pair predictions file (`.tsv`) must hold every row its header counts
    and, given `classifier_sha256`, have been made by that classifier. A
    symbolic link is never followed: whatever it points at, it is not an
    output, and publishing replaces the link itself.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        with open(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
                return False
            if path.suffix == ".json":
                json.load(handle)
                return True
            if path.suffix == ".pt":
                with zipfile.ZipFile(handle) as archive:
                    if archive.testzip() is not None:
                        return False
            if path.suffix == ".tsv":
                from virnucpro.pipeline.outputs import check_pair_file

                made_by = check_pair_file(path).classifier_sha256
                # Read by name: still the file checked above, not one put in its place meanwhile.
                return os.path.samestat(info, os.lstat(path)) and classifier_sha256 in (None, made_by)
        if path.suffix == ".pt":
            from virnucpro.pipeline.features import load_features

            load_features(path)
            # Read by name: still the file checked above, not one put in its place meanwhile.
            return os.path.samestat(info, os.lstat(path))
        return True
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False
