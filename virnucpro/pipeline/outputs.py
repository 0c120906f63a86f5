"""The prediction outputs: per-frame scores and the per-chunk consensus, written file by file."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from virnucpro.atomic import atomic_write
from virnucpro.pipeline.classifier import MLPClassifier, label_for, load_classifier, predict_scores
from virnucpro.pipeline.merge import load_feature_dict

RESULTS_NAME = "prediction_results.txt"
HIGHESTSCORE_NAME = "prediction_results_highestscore.csv"
RESULTS_HEADER = "Sequence_ID\tPrediction\tscore1\tscore2\n"
# The original writes the first two columns; the two maxima follow as in virnucpro-broad,
# whose consumers (viral-ngs' contig classification) read them.
HIGHESTSCORE_HEADER = "Modified_ID\tIs_Virus\tmax_score_0\tmax_score_1\n"


class OutputError(ValueError):
    """A merged feature file that cannot be scored; the message names the file and the fix."""


@dataclass(frozen=True)
class PredictionOutputs:
    """What write_predictions wrote: the two files, their row counts."""

    results: Path
    highestscore: Path
    frames: int
    chunks: int


def format_score(value: float) -> str:
    """A score as the original writes it: str() of a numpy float32, the shortest text that reads back exactly."""
    return str(np.float32(value))


def write_predictions(
    merged_paths: Iterable[str | Path],
    classifier: MLPClassifier | str | Path,
    output_dir: str | Path,
    device: str = "cpu",
) -> PredictionOutputs:
    """Score every row of the merged files and write both prediction files into `output_dir`.

    Files are read one at a time, in the order given (merge_files returns them
    by k); `prediction_results.txt` lists every frame in that order.
    `prediction_results_highestscore.csv` has one row per chunk, sorted by
    Modified_ID as the original's pandas groupby sorts it: Modified_ID is the
    Sequence_ID without its last two characters (the frame), Is_Virus is
    max(score2) >= max(score1) over the chunk's frames. Both files appear
    atomically; memory grows with the number of chunks, not of features.
    A classifier given as a path is loaded onto `device`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = classifier if isinstance(classifier, MLPClassifier) else load_classifier(classifier, device)
    maxima: dict[str, list[np.float32]] = {}
    frames = 0
    results_path = output_dir / RESULTS_NAME
    with atomic_write(results_path, newline="\n") as results:
        results.write(RESULTS_HEADER)
        for path in map(Path, merged_paths):
            ids, features = _load_merged(path)
            if not ids:
                continue
            if features.shape[1] != model.input_dim:
                raise OutputError(
                    f"{path}: features have {features.shape[1]} columns but the classifier takes "
                    f"{model.input_dim}; use the classifier that matches the embedding models"
                )
            scores = predict_scores(model, features).numpy()
            for sequence_id, (score1, score2) in zip(ids, scores, strict=True):
                results.write(
                    f"{sequence_id}\t{label_for(score1, score2)}\t{format_score(score1)}\t{format_score(score2)}\n"
                )
                best = maxima.setdefault(sequence_id[:-2], [score1, score2])
                best[0] = max(best[0], score1)
                best[1] = max(best[1], score2)
            frames += len(ids)
    highestscore_path = output_dir / HIGHESTSCORE_NAME
    with atomic_write(highestscore_path, newline="\n") as highestscore:
        highestscore.write(HIGHESTSCORE_HEADER)
        for chunk_id in sorted(maxima):
            max_score1, max_score2 = maxima[chunk_id]
            highestscore.write(
                f"{chunk_id}\t{max_score2 >= max_score1}\t{format_score(max_score1)}\t{format_score(max_score2)}\n"
            )
    return PredictionOutputs(results_path, highestscore_path, frames, len(maxima))


def _load_merged(path: Path) -> tuple[list[str], torch.Tensor]:
    content = load_feature_dict(path, ("ids", "data"), OutputError, remedy="merge")
    ids, data = list(content["ids"]), content["data"]
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.shape[0] != len(ids):
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise OutputError(
            f"{path}: {len(ids)} ids for data of shape {shape}; ids must name the rows one to one "
            "(the original merge leaves them unfiltered), so merge it again with virnucpro"
        )
    return ids, data.to(torch.float32)
