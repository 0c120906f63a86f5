"""The prediction outputs: each file pair classified into its own rows, then the two files assembled in order.

classify_pair scores file pair k and writes what the final files need from
it to one per-pair file: its prediction_results.txt rows, and the maximum
scores of each chunk its frames belong to. Pairs are independent, so they
can be classified in any order and in parallel; assemble_predictions then
concatenates the rows in order of k and merges the per-chunk maxima.
"""

from __future__ import annotations

import heapq
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import IO

import numpy as np

from virnucpro.atomic import atomic_write
from virnucpro.pipeline.classifier import LABELS, MLPClassifier, predict_scores
from virnucpro.pipeline.features import save_features
from virnucpro.pipeline.merge import merge_features

RESULTS_NAME = "prediction_results.txt"
HIGHESTSCORE_NAME = "prediction_results_highestscore.csv"
RESULTS_HEADER = "Sequence_ID\tPrediction\tscore1\tscore2\n"
# The original writes the first two columns; the two maxima follow as in virnucpro-broad,
# whose consumers (viral-ngs' contig classification) read them.
HIGHESTSCORE_HEADER = "Modified_ID\tIs_Virus\tmax_score_0\tmax_score_1\n"
# First line of a per-pair file, followed by its frame count, the byte length of its rows, its chunk count and
# the SHA-256 of the classifier checkpoint that scored it (UNKNOWN_CLASSIFIER when the caller did not say).
PAIR_MAGIC = "#virnucpro-pair-predictions-v2"
UNKNOWN_CLASSIFIER = "unknown"
# Per-pair files merged at once; more are merged in rounds, so open files stay well under the usual limit.
MERGE_FAN_IN = 256

ChunkRow = tuple[str, str, str]  # chunk id, max score1, max score2 (as written)


class OutputError(ValueError):
    """Features or per-pair predictions that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class PairPredictions:
    """What classify_pair wrote for one file pair."""

    path: Path
    frames: int
    chunks: int


@dataclass(frozen=True)
class PredictionOutputs:
    """What assemble_predictions wrote: the two files, their row counts."""

    results: Path
    highestscore: Path
    frames: int
    chunks: int


def format_score(value: float) -> str:
    """A score as the original writes it: str() of a numpy float32, the shortest text that reads back exactly."""
    return str(np.float32(value))


def pair_predictions_path(directory: str | Path, k: int) -> Path:
    return Path(directory) / f"output_{k}_predictions.tsv"


def classify_pair(
    dnabert_path: str | Path,
    esm_path: str | Path,
    classifier: MLPClassifier,
    output_path: str | Path,
    keep_features: str | Path | None = None,
    classifier_sha256: str | None = None,
) -> PairPredictions:
    """Merge and score file pair k, and write its prediction rows and per-chunk maxima to `output_path`.

    The rows are those prediction_results.txt holds for the pair's frames,
    in the files' order. A chunk (Modified_ID: the Sequence_ID without its
    two frame characters) gets the maximum of each score over its frames in
    this pair; a chunk whose frames continue in the next pair is completed
    by assemble_predictions. With `keep_features`, the merged features are
    saved there too. The file records `classifier_sha256`, the digest of the
    classifier's checkpoint, so that a later run knows whether it may reuse
    the rows. Every file appears atomically.
    """
    merged = merge_features(dnabert_path, esm_path)
    if merged.data.shape[1] != classifier.input_dim:
        raise OutputError(
            f"{dnabert_path} + {esm_path}: features have {merged.data.shape[1]} columns but the classifier takes "
            f"{classifier.input_dim}; use the classifier that matches the embedding models"
        )
    if keep_features is not None:
        save_features(keep_features, "merged", merged.ids, merged.data, merged.precision)
    scores = predict_scores(classifier, merged.data).numpy()
    rows = []
    maxima: dict[str, list[float]] = {}
    # Python floats hold float32 values exactly, so comparing them compares the float32 scores.
    for sequence_id, (score1, score2) in zip(merged.ids, scores.tolist(), strict=True):
        label = LABELS[1] if score2 > score1 else LABELS[0]
        rows.append(f"{sequence_id}\t{label}\t{format_score(score1)}\t{format_score(score2)}\n")
        best = maxima.setdefault(sequence_id[:-2], [score1, score2])
        best[0] = max(best[0], score1)
        best[1] = max(best[1], score2)
    body = "".join(rows).encode("ascii")
    chunks = "".join(f"{chunk}\t{format_score(best[0])}\t{format_score(best[1])}\n"
                     for chunk, best in sorted(maxima.items()))
    with atomic_write(output_path, "wb") as handle:
        made_by = classifier_sha256 or UNKNOWN_CLASSIFIER
        handle.write(f"{PAIR_MAGIC}\t{len(rows)}\t{len(body)}\t{len(maxima)}\t{made_by}\n".encode("ascii"))
        handle.write(body)
        handle.write(chunks.encode("ascii"))
    return PairPredictions(Path(output_path), len(rows), len(maxima))


def assemble_predictions(pair_paths: Sequence[str | Path], output_dir: str | Path) -> PredictionOutputs:
    """Write both prediction files into `output_dir` from per-pair files given in order of k.

    `prediction_results.txt` is the pairs' rows one after the other.
    `prediction_results_highestscore.csv` has one row per chunk, sorted by
    Modified_ID as the original's pandas groupby sorts it, with Is_Virus =
    max(score2) >= max(score1) over the chunk's frames in every pair. Both
    files appear atomically; memory does not grow with the sample: rows are
    copied and the sorted per-pair maxima merged as streams.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    headers = [read_pair_header(Path(path)) for path in pair_paths]
    results_path, highestscore_path = output_dir / RESULTS_NAME, output_dir / HIGHESTSCORE_NAME
    chunks = 0
    # Both files appear only once both are whole.
    with atomic_write(results_path, "wb") as results, \
            atomic_write(highestscore_path, "w", encoding="ascii", newline="\n") as highestscore:
        results.write(RESULTS_HEADER.encode("ascii"))
        for path, header in zip(pair_paths, headers, strict=True):
            with open(path, "rb") as source:
                source.seek(header.rows_offset)
                _copy(source, results, header.rows_bytes, Path(path))
        highestscore.write(HIGHESTSCORE_HEADER)
        sources = [(Path(path), header.chunks_offset, header.chunks)
                   for path, header in zip(pair_paths, headers, strict=True)]
        for chunk, max_score1, max_score2 in _merged_maxima(sources):
            highestscore.write(f"{chunk}\t{float(max_score2) >= float(max_score1)}\t{max_score1}\t{max_score2}\n")
            chunks += 1
    return PredictionOutputs(results_path, highestscore_path, sum(h.frames for h in headers), chunks)


@dataclass(frozen=True)
class PairHeader:
    """What the first line of a per-pair file says: its counts, where its parts lie, which classifier made it."""

    frames: int
    rows_offset: int
    rows_bytes: int
    chunks: int
    classifier_sha256: str

    @property
    def chunks_offset(self) -> int:
        return self.rows_offset + self.rows_bytes


def read_pair_header(path: str | Path) -> PairHeader:
    """The header of the per-pair file at `path`; OutputError if it is not one of this version, or is cut short."""
    try:
        with open(path, "rb") as handle:
            line = handle.readline(300)
            size = handle.seek(0, 2)
    except OSError as exc:
        raise OutputError(f"{path}: cannot be read ({exc.strerror}); classify the pair again") from None
    fields = line.decode("ascii", "replace").rstrip("\n").split("\t")
    if len(fields) != 5 or fields[0] != PAIR_MAGIC or not all(f.isdigit() for f in fields[1:4]):
        raise OutputError(f"{path}: not a per-pair predictions file of this version; classify the pair again")
    header = PairHeader(int(fields[1]), len(line), int(fields[2]), int(fields[3]), fields[4])
    if header.chunks_offset > size:
        raise OutputError(f"{path}: shorter than its header says (truncated?); classify the pair again")
    return header


def check_pair_file(path: str | Path) -> PairHeader:
    """The header of a whole per-pair file: OutputError unless its rows and its per-chunk rows are all there."""
    header = read_pair_header(path)
    with open(path, "rb") as handle:
        handle.seek(header.chunks_offset)
        tail = handle.read()
    if tail.count(b"\n") != header.chunks or (tail and not tail.endswith(b"\n")):
        raise OutputError(f"{path}: its per-chunk rows are not the {header.chunks} its header says (truncated?); "
                          "classify the pair again")
    return header


def _copy(source: IO[bytes], target: IO[bytes], size: int, path: Path) -> None:
    while size > 0:
        block = source.read(min(size, 1 << 20))
        if not block:
            raise OutputError(f"{path}: ends before its rows do (truncated?); classify the pair again")
        target.write(block)
        size -= len(block)


def _chunk_rows(path: Path, offset: int, count: int) -> Iterator[ChunkRow]:
    """The `count` sorted per-chunk maxima of a per-pair file (or of a merged round) from `offset`."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        for _ in range(count):
            fields = handle.readline().decode("ascii").rstrip("\n").split("\t")
            if len(fields) != 3:
                raise OutputError(f"{path}: a per-chunk row is damaged or missing; classify the pair again")
            yield fields[0], fields[1], fields[2]


def _combined(rows: Iterable[ChunkRow]) -> Iterator[ChunkRow]:
    """Rows sorted by chunk, one per chunk: the maximum of each score over the chunk's rows, as written."""
    current: list[str] | None = None
    for chunk, score1, score2 in rows:
        if current is not None and current[0] == chunk:
            # The texts are float32 values written exactly, so float() compares them as float32.
            if float(score1) > float(current[1]):
                current[1] = score1
            if float(score2) > float(current[2]):
                current[2] = score2
            continue
        if current is not None:
            yield current[0], current[1], current[2]
        current = [chunk, score1, score2]
    if current is not None:
        yield current[0], current[1], current[2]


def _merged_maxima(sources: list[tuple[Path, int, int]]) -> Iterator[ChunkRow]:
    """The per-chunk maxima of every source, merged in sorted order; rounds of MERGE_FAN_IN files at a time.

    heapq.merge keeps equal chunks in the order of their sources (k), so
    maxima are combined in the order the frames come in. Rounds write their
    merged maxima to a temporary directory beside the first source.
    """
    if len(sources) <= MERGE_FAN_IN:
        yield from _combined(heapq.merge(*(_chunk_rows(*s) for s in sources), key=itemgetter(0)))
        return
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=sources[0][0].parent) as scratch:
        level = 0
        while len(sources) > MERGE_FAN_IN:
            level += 1
            rounds = []
            for start in range(0, len(sources), MERGE_FAN_IN):
                path = Path(scratch) / f"level-{level}-{start}.tsv"
                count = 0
                with open(path, "w", encoding="ascii", newline="\n") as handle:
                    group = sources[start:start + MERGE_FAN_IN]
                    for row in _combined(heapq.merge(*(_chunk_rows(*s) for s in group), key=itemgetter(0))):
                        handle.write("\t".join(row) + "\n")
                        count += 1
                rounds.append((path, 0, count))
            sources = rounds
        yield from _merged_maxima(sources)
