"""The classify stage: file pair k's two feature files in, its prediction rows out, on the worker's CPU.

The task reads the DNABERT-S and ESM-2 features of pair k, checks that their
ids agree, joins them, scores them with the job's classifier and writes the
pair's per-pair predictions file (virnucpro.pipeline.outputs.classify_pair).
It always runs on the CPU, whatever the worker's device, and on one thread,
whatever the worker's share of the cores, so that every worker gives the
same bytes: a GPU's arithmetic differs from the CPU's, and so, for a batch
of a few rows (5 to 11 here), does the CPU's on one thread and on two.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from virnucpro.backends.interface import Cancelled
from virnucpro.pipeline.classifier import MLPClassifier, load_classifier_with_digest
from virnucpro.pipeline.outputs import classify_pair

logger = logging.getLogger(__name__)

# CPU threads a classify task uses, on every worker: the scores are the same bytes only for the same count.
# One thread scores about 20,000 frames/s (a second would add only half as much again), and it takes no core
# from the workers beside it on a GPU machine.
THREADS = 1
# Classifiers kept loaded, by digest; the least recently used beyond this is dropped.
KEEP_CLASSIFIERS = 2


class ClassifyBackend:
    """Scores file pairs with the classifiers the jobs name, each loaded once and checked by its SHA-256."""

    stage = "classify"

    def __init__(self) -> None:
        self._classifiers: OrderedDict[str, MLPClassifier] = OrderedDict()

    def classifier(self, path: str, sha256: str) -> MLPClassifier:
        """The classifier whose checkpoint has digest `sha256`, read from `path` the first time it is asked for.

        Raises ClassifierCheckpointError (the task fails with its message)
        when the file cannot be read, is not a classifier, or has another
        digest.
        """
        model = self._classifiers.get(sha256)
        if model is None:
            model, _ = load_classifier_with_digest(path, expected_sha256=sha256)
            self._classifiers[sha256] = model
            logger.info("classifier %s loaded (SHA-256 %s)", path, sha256[:12])
            while len(self._classifiers) > KEEP_CLASSIFIERS:
                self._classifiers.popitem(last=False)
        self._classifiers.move_to_end(sha256)
        return model

    def knows(self, sha256: str) -> bool:
        """True if the classifier with this digest is loaded already."""
        return sha256 in self._classifiers

    def run_pair(self, path: Path, paired: Path, classifier: dict[str, str], output_path: Path,
                 should_stop: Callable[[], bool] = lambda: False) -> tuple[int, int]:
        """Classify the pair whose DNABERT-S features are at `path` and ESM-2 features at `paired`.

        Returns (frames, frames): a classify task's cost is its frame count.
        Raises Cancelled, writing nothing, if `should_stop()` is True before
        it starts (a pair takes under a second).
        """
        for features in (path, paired):
            if not features.exists():
                raise FileNotFoundError(f"{features}: not on this worker, which does not share the client's file "
                                        "system; let the files travel to it (predict --transfer auto)")
        model = self.classifier(classifier["path"], classifier["sha256"])
        if should_stop():
            raise Cancelled("cancelled before classifying")
        with _threads(THREADS):
            written = classify_pair(path, paired, model, output_path, classifier_sha256=classifier["sha256"])
        return written.frames, written.frames


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """While open, torch computes on `count` threads; the worker runs one task at a time, so this is its own."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
