"""The run directory of `virnucpro predict`: its layout, the split and its manifest, resume, failed files, summary.

Everything under OUT/work is the run's state. A finished output is published
atomically and checked before it is reused, so a rerun with --resume
continues after any interruption and recomputes nothing that finished:

    OUT/work/split.json                     the split's manifest (written last)
    OUT/work/nucleotide/output_k.fa         file pair k's nucleotide frames
    OUT/work/protein/output_k.fa            ... and its proteins, with the same ids
    OUT/work/dnabert/output_k_DNABERT_S.pt  DNABERT-S features of pair k, and run_report.json
    OUT/work/esm/output_k_ESM.pt            ESM-2 features of pair k, and run_report.json
    OUT/work/classify/output_k_predictions.tsv  pair k's prediction rows, and run_report.json
    OUT/work/merged/output_k_merged.pt      with --keep-features only
    OUT/work/logs/                          the broker's and workers' logs, when started here
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from virnucpro.atomic import write_text_atomically
from virnucpro.client.embed import Plan, plan_job
from virnucpro.client.options import PredictError, PredictOptions
from virnucpro.pipeline.outputs import RESULTS_NAME, OutputError, pair_predictions_path, read_pair_header
from virnucpro.pipeline.reads import SampleReads
from virnucpro.pipeline.sequences import FilePair, split_into_files
from virnucpro.stages import is_complete, output_path

FAILED_FILES_NAME = "failed_files.txt"
SUMMARY_NAME = "summary.json"
MANIFEST_NAME = "split.json"

# Stage, the split's subdirectory it reads, and the work subdirectory it writes.
STAGE_DIRS = (("dnabert", "nucleotide", "dnabert"), ("esm", "protein", "esm"))
CLASSIFY_DIR = "classify"
MERGED_DIR = "merged"
# The stages a run's jobs need workers for.
RUN_STAGES = ("dnabert", "esm", "classify")

# Without --sequences-per-file, files are sized so that a sample makes about this
# many (a shorter tail when workers steal), never more than the original's 10,000
# sequences and never so few that per-file overhead dominates.
AUTO_FILES_PER_SAMPLE = 32
MIN_AUTO_SEQUENCES_PER_FILE = 50
MAX_SEQUENCES_PER_FILE = 10000
GZIP_RATIO = 4  # a gzipped FASTA is about a quarter of its text
FASTQ_RATIO = 2  # a FASTQ holds a quality per base besides the bases


def holds_run(output_dir: Path) -> bool:
    """True if `output_dir` has the work or the results of an earlier run."""
    return (output_dir / "work").exists() or (output_dir / RESULTS_NAME).exists()


def auto_sequences_per_file(input_fasta: Path, expected_length: int) -> int:
    """A file size from the input's size alone.

    Never from the worker count: embeddings are batched within a file, so the
    file size must not change with the hardware for outputs to stay the same.
    A chunk of C bases keeps about one frame, so the bases over C estimate
    the frames.
    """
    size = input_fasta.stat().st_size
    with open(input_fasta, "rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open if compressed else open)(input_fasta, "rb") as handle:
            fastq = handle.read(256).lstrip().startswith(b"@")
    except (OSError, EOFError):
        fastq = False  # reading the input says what is wrong with it
    size = size * (GZIP_RATIO if compressed else 1) // (FASTQ_RATIO if fastq else 1)
    frames = size // expected_length
    return min(MAX_SEQUENCES_PER_FILE, max(MIN_AUTO_SEQUENCES_PER_FILE, -(-frames // AUTO_FILES_PER_SAMPLE)))


def _split_identity(options: PredictOptions, sequences_per_file: int) -> dict[str, Any]:
    """What the split and its embeddings depend on; a resume must match it."""
    stat = options.input_fasta.stat()
    return {"input": str(options.input_fasta.resolve()), "input_size": stat.st_size,
            "input_mtime_ns": stat.st_mtime_ns, "expected_length": options.expected_length,
            "sequences_per_file": sequences_per_file, "models": options.models,
            "dnabert_model": options.dnabert_model, "esm_model": options.esm_model,
            "rename_duplicates": options.rename_duplicates}


# What a manifest written before an identity key existed meant by it.
IDENTITY_DEFAULTS = {"rename_duplicates": False}


@dataclass(frozen=True)
class Split:
    """The file pairs of a run, and the reads they came from (None for a manifest of an older version)."""

    pairs: list[FilePair]
    reads: int | None

    @property
    def frames(self) -> int:
        return sum(pair.sequences for pair in self.pairs)


def split_input(options: PredictOptions, work_dir: Path, console: Console) -> Split:
    """The paired files of the run: split now, or on --resume those of the earlier split if it finished.

    The split counts as finished only once its manifest (work/split.json,
    written atomically after the last file) exists: the split writes no
    manifest until then, and the embeddings start only after it.
    """
    manifest_path = work_dir / MANIFEST_NAME
    if options.resume and manifest_path.is_file():
        manifest = _read_manifest(manifest_path)
        wanted = _split_identity(options, options.sequences_per_file or manifest["sequences_per_file"])
        earlier = {key: manifest.get(key, IDENTITY_DEFAULTS.get(key)) for key in wanted}
        changed = [key for key, value in wanted.items() if earlier[key] != value]
        if changed:
            raise PredictError(
                f"{manifest_path}: the run there was started with other "
                + ", ".join(f"{key} ({earlier[key]!r}, now {wanted[key]!r})" for key in changed)
                + "; resume with the same input and options, or start a new run with another -o"
            )
        pairs = [FilePair(p["index"], work_dir / p["nucleotide"], work_dir / p["protein"], p["sequences"])
                 for p in manifest["files"]]
        if all(p.nucleotide.is_file() and p.protein.is_file() for p in pairs):
            console.print(f"split: reusing the {len(pairs)} file pairs of {manifest_path}", markup=False)
            return Split(pairs, manifest.get("reads"))
        console.print(f"split: files listed in {manifest_path} are missing; splitting again", markup=False)
    sequences_per_file = options.sequences_per_file or auto_sequences_per_file(
        options.input_fasta, options.expected_length)
    identity = _split_identity(options, sequences_per_file)
    manifest_path.unlink(missing_ok=True)
    reads = SampleReads(options.input_fasta, options.rename_duplicates)
    pairs = split_into_files(reads, work_dir, options.expected_length, sequences_per_file)
    if reads.empty:
        console.print(f"[yellow]warning:[/yellow] {reads.empty:,} empty records skipped (a header and no bases)")
    if reads.renamed:
        console.print(f"[yellow]warning:[/yellow] {reads.renamed:,} reads had an id already used and were renamed "
                      "id.2, id.3, ... (--rename-duplicates)")
    files = [{"index": p.index, "nucleotide": str(p.nucleotide.relative_to(work_dir)),
              "protein": str(p.protein.relative_to(work_dir)), "sequences": p.sequences} for p in pairs]
    write_text_atomically(manifest_path, json.dumps({**identity, "reads": reads.reads, "files": files}, indent=2) + "\n")
    console.print(f"split: {reads.reads:,} reads, {sum(p.sequences for p in pairs):,} frames into {len(pairs)} file pairs "
                  f"of up to {sequences_per_file:,} sequences", markup=False)
    return Split(pairs, reads.reads)


def _read_manifest(path: Path) -> dict[str, Any]:
    """The split manifest of an earlier run; PredictError if it cannot be used."""
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise PredictError(f"{path}: not a readable split manifest ({exc}); start a new run with another -o") from None
    if not isinstance(manifest, dict) or not {"sequences_per_file", "files"} <= manifest.keys():
        raise PredictError(f"{path}: lacks the list of split files; start a new run with another -o")
    return manifest


def plan_stages(pairs: Sequence[FilePair], work_dir: Path, console: Console) -> list[Plan]:
    """Each embedding stage's files that still lack a complete output.

    A damaged output of a file to be embedded again is removed now, so that
    in the run directory a feature file that exists is a whole one: predict
    classifies a pair as soon as both of its feature files exist.
    """
    plans = []
    for stage, input_subdir, output_subdir in STAGE_DIRS:
        (work_dir / output_subdir).mkdir(parents=True, exist_ok=True)
        inputs = [p.nucleotide if input_subdir == "nucleotide" else p.protein for p in pairs]
        plan = plan_job(stage, inputs, work_dir / output_subdir)
        for spec in plan.todo:
            Path(spec["output"]).unlink(missing_ok=True)
        if plan.skipped:
            console.print(f"{stage}: {len(plan.skipped)} of {len(inputs)} files already embedded; skipped")
        plans.append(plan)
    return plans


def feature_paths(pair: FilePair, work_dir: Path) -> tuple[Path, Path]:
    """Where the DNABERT-S and the ESM-2 features of file pair k lie."""
    dnabert_stage, dnabert_input, dnabert_dir = STAGE_DIRS[0]
    esm_stage, esm_input, esm_dir = STAGE_DIRS[1]
    return (output_path(dnabert_stage, pair.nucleotide, work_dir.resolve() / dnabert_dir),
            output_path(esm_stage, pair.protein, work_dir.resolve() / esm_dir))


def classify_spec(pair: FilePair, work_dir: Path) -> dict[str, Any]:
    """The classify job's file of pair k: both feature files in, its per-pair predictions out; its frames as cost."""
    dnabert, esm = feature_paths(pair, work_dir)
    output = pair_predictions_path(work_dir.resolve() / CLASSIFY_DIR, pair.index)
    return {"path": str(dnabert), "paired": str(esm), "output": str(output), "sequences": pair.sequences,
            "residues": pair.sequences}


@dataclass
class ClassifyPlan:
    """File pairs whose per-pair predictions this classifier made already, and those still to classify."""

    classifier_sha256: str
    reused: list[FilePair] = field(default_factory=list)
    todo: list[FilePair] = field(default_factory=list)


def plan_classify(pairs: Sequence[FilePair], work_dir: Path, classifier_sha256: str, console: Console) -> ClassifyPlan:
    """Reuse each pair's per-pair predictions if whole and made by this classifier; remove any other.

    A per-pair file records its classifier's digest, so --resume with
    another --model-path scores every pair again rather than mixing rows.
    """
    (work_dir / CLASSIFY_DIR).mkdir(parents=True, exist_ok=True)
    plan = ClassifyPlan(classifier_sha256)
    for pair in pairs:
        path = Path(classify_spec(pair, work_dir)["output"])
        if is_complete(path, classifier_sha256):
            plan.reused.append(pair)
        else:
            path.unlink(missing_ok=True)
            plan.todo.append(pair)
    if plan.reused:
        console.print(f"classify: {len(plan.reused)} of {len(pairs)} file pairs already classified by this "
                      "classifier; reused", markup=False)
    return plan


def classified(pair: FilePair, work_dir: Path, classifier_sha256: str) -> bool:
    """True if pair k's predictions are there, made by this classifier (their header says so)."""
    try:
        return read_pair_header(classify_spec(pair, work_dir)["output"]).classifier_sha256 == classifier_sha256
    except OutputError:
        return False


def failed_rows(pairs: Sequence[FilePair], work_dir: Path, reasons: dict[str, str],
                classifier_sha256: str) -> list[tuple[str, str, str]]:
    """(stage, file, reasons) of every input whose output is missing after the run.

    A pair whose features both exist but whose predictions do not is listed
    under classify, by its DNABERT-S feature file. In the run directory an
    output that exists is whole (plan_stages removed the damaged ones, and
    outputs appear atomically), so existence is checked, not every byte.
    """
    rows = []
    for stage, input_subdir, output_subdir in STAGE_DIRS:
        for pair in pairs:
            source = (pair.nucleotide if input_subdir == "nucleotide" else pair.protein).resolve()
            if not output_path(stage, source, work_dir / output_subdir).exists():
                reason = reasons.get(str(source), "no output after the job; rerun with --resume")
                rows.append((stage, str(source), " ".join(reason.split())))
    for pair in pairs:
        features = feature_paths(pair, work_dir)
        if all(path.exists() for path in features) and not classified(pair, work_dir, classifier_sha256):
            reason = reasons.get(str(features[0]), "no predictions after the job; rerun with --resume")
            rows.append(("classify", str(features[0]), " ".join(reason.split())))
    return rows


def write_failed_files(output_dir: Path, rows: Sequence[tuple[str, str, str]]) -> None:
    """OUT/failed_files.txt: stage, file and reasons of every missing output; removed when none is."""
    path = output_dir / FAILED_FILES_NAME
    if rows:
        write_text_atomically(path, "stage\tfile\treasons\n" + "".join("\t".join(row) + "\n" for row in rows))
    else:
        path.unlink(missing_ok=True)


def write_summary(output_dir: Path, summary: dict[str, Any]) -> Path:
    """OUT/summary.json, written atomically."""
    return write_text_atomically(output_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
