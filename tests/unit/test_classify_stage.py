"""The classify stage on a worker: its backend, the classifier checked by digest, and per-pair files it can trust."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import torch
from rich.console import Console

from virnucpro.backends.classify import ClassifyBackend
from virnucpro.backends.interface import Cancelled
from virnucpro.client.run_dir import classify_spec, plan_classify
from virnucpro.pipeline.classifier import (
    INPUT_DIM,
    ClassifierCheckpointError,
    MLPClassifier,
    classifier_bytes,
    load_classifier,
)
from virnucpro.pipeline.features import save_features
from virnucpro.pipeline.outputs import check_pair_file, classify_pair, read_pair_header
from virnucpro.pipeline.sequences import FilePair
from virnucpro.stages import is_complete
from virnucpro.worker.publish import publish

DNABERT_DIM = 768


def write_checkpoint(path: Path, seed: int) -> dict[str, str]:
    """A classifier of the published shape with seeded random weights; its {"path", "sha256"}."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        data = classifier_bytes(MLPClassifier(INPUT_DIM).eval())
    path.write_bytes(data)
    return {"path": str(path), "sha256": hashlib.sha256(data).hexdigest()}


def write_features(directory: Path, k: int, frames: int) -> tuple[Path, Path]:
    """Pair k's DNABERT-S and ESM-2 feature files at the real widths, random, with the split's ids."""
    generator = torch.Generator().manual_seed(k)
    ids = [f"read{k}_{i // 3}_chunk_1F{i % 3 + 1}" for i in range(frames)]
    dnabert = directory / "dnabert" / f"output_{k}_DNABERT_S.pt"
    esm = directory / "esm" / f"output_{k}_ESM.pt"
    for path in (dnabert, esm):
        path.parent.mkdir(parents=True, exist_ok=True)
    save_features(dnabert, "dnabert", ids, torch.randn(frames, DNABERT_DIM, generator=generator), "fp32")
    save_features(esm, "esm", ids, torch.randn(frames, INPUT_DIM - DNABERT_DIM, generator=generator), "fp32")
    return dnabert, esm


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return write_features(tmp_path, 1, 600)


@pytest.fixture
def checkpoint(tmp_path: Path) -> dict[str, str]:
    return write_checkpoint(tmp_path / "500_model.pth", seed=7)


def test_the_backend_writes_what_classify_pair_writes_and_records_the_classifiers_digest(tmp_path, pair, checkpoint):
    frames, cost = ClassifyBackend().run_pair(*pair, checkpoint, tmp_path / "by_backend.tsv")
    classify_pair(*pair, load_classifier(checkpoint["path"]), tmp_path / "direct.tsv",
                  classifier_sha256=checkpoint["sha256"])
    assert (frames, cost) == (600, 600)
    assert (tmp_path / "by_backend.tsv").read_bytes() == (tmp_path / "direct.tsv").read_bytes()
    assert read_pair_header(tmp_path / "by_backend.tsv").classifier_sha256 == checkpoint["sha256"]


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_the_stage_writes_the_same_bytes_whatever_the_workers_thread_count(tmp_path, checkpoint, threads):
    """Pairs whose last batch holds 1 to 12 frames: on this machine torch's scores of 5 to 11 rows differ in the
    last bits between one thread and two, so the stage must not use the worker's count."""
    previous = torch.get_num_threads()
    try:
        for frames in (*range(1, 13), 4096 + 7):
            dnabert, esm = write_features(tmp_path / f"in-{frames}", 1, frames)
            torch.set_num_threads(1)
            classify_pair(dnabert, esm, load_classifier(checkpoint["path"]), tmp_path / f"one-{frames}.tsv",
                          classifier_sha256=checkpoint["sha256"])
            torch.set_num_threads(threads)
            ClassifyBackend().run_pair(dnabert, esm, checkpoint, tmp_path / f"stage-{frames}.tsv")
            assert torch.get_num_threads() == threads  # the worker's own count, given back
            assert (tmp_path / f"stage-{frames}.tsv").read_bytes() == (tmp_path / f"one-{frames}.tsv").read_bytes()
    finally:
        torch.set_num_threads(previous)


def test_a_checkpoint_that_changed_since_submission_fails_the_task_naming_both_digests(tmp_path, pair, checkpoint):
    other = write_checkpoint(tmp_path / "other.pth", seed=8)
    with pytest.raises(ClassifierCheckpointError, match=f"has SHA-256 {other['sha256']}, not {checkpoint['sha256']} "
                                                        "as submitted"):
        ClassifyBackend().run_pair(*pair, {"path": other["path"], "sha256": checkpoint["sha256"]},
                                   tmp_path / "out.tsv")
    assert not (tmp_path / "out.tsv").exists()


def test_a_checkpoint_the_worker_cannot_read_fails_the_task_with_its_path(tmp_path, pair, checkpoint):
    missing = {"path": str(tmp_path / "elsewhere" / "500_model.pth"), "sha256": checkpoint["sha256"]}
    with pytest.raises(ClassifierCheckpointError, match="elsewhere/500_model.pth: no such classifier checkpoint"):
        ClassifyBackend().run_pair(*pair, missing, tmp_path / "out.tsv")


def test_a_classifier_is_read_once_per_digest_and_the_least_recently_used_is_dropped(tmp_path, pair, checkpoint):
    backend = ClassifyBackend()
    backend.run_pair(*pair, checkpoint, tmp_path / "a.tsv")
    Path(checkpoint["path"]).unlink()
    backend.run_pair(*pair, checkpoint, tmp_path / "b.tsv")  # from memory: the file is gone
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
    for seed in (8, 9):
        backend.run_pair(*pair, write_checkpoint(tmp_path / f"{seed}.pth", seed), tmp_path / f"{seed}.tsv")
    with pytest.raises(ClassifierCheckpointError, match="no such classifier checkpoint"):
        backend.run_pair(*pair, checkpoint, tmp_path / "c.tsv")


def test_a_revoked_task_writes_nothing(tmp_path, pair, checkpoint):
    with pytest.raises(Cancelled):
        ClassifyBackend().run_pair(*pair, checkpoint, tmp_path / "out.tsv", should_stop=lambda: True)
    assert not (tmp_path / "out.tsv").exists()


def test_a_per_pair_file_counts_as_complete_only_for_the_classifier_that_made_it(tmp_path, pair, checkpoint):
    ClassifyBackend().run_pair(*pair, checkpoint, tmp_path / "out.tsv")
    assert is_complete(tmp_path / "out.tsv") and is_complete(tmp_path / "out.tsv", checkpoint["sha256"])
    assert not is_complete(tmp_path / "out.tsv", "0" * 64)
    data = (tmp_path / "out.tsv").read_bytes()
    (tmp_path / "cut.tsv").write_bytes(data[:-10])
    assert not is_complete(tmp_path / "cut.tsv")
    assert check_pair_file(tmp_path / "out.tsv").frames == 600


def test_publishing_replaces_a_per_pair_file_another_classifier_made(tmp_path, pair, checkpoint):
    other = write_checkpoint(tmp_path / "other.pth", seed=8)
    backend = ClassifyBackend()
    backend.run_pair(*pair, other, tmp_path / "final.tsv")
    backend.run_pair(*pair, checkpoint, tmp_path / ".final.tsv.tmp")
    assert publish(tmp_path / ".final.tsv.tmp", tmp_path / "final.tsv",
                   lambda path: is_complete(path, checkpoint["sha256"]))
    assert read_pair_header(tmp_path / "final.tsv").classifier_sha256 == checkpoint["sha256"]


def test_resume_reuses_pairs_this_classifier_made_and_removes_those_of_another(tmp_path, checkpoint):
    work = tmp_path / "work"
    pairs = [FilePair(k, work / "nucleotide" / f"output_{k}.fa", work / "protein" / f"output_{k}.fa", 30)
             for k in (1, 2, 3)]
    other = write_checkpoint(tmp_path / "other.pth", seed=8)
    backend = ClassifyBackend()
    for pair_k, made_by in zip(pairs[:2], (checkpoint, other), strict=True):
        spec = classify_spec(pair_k, work)
        write_features(work, pair_k.index, 30)
        Path(spec["output"]).parent.mkdir(parents=True, exist_ok=True)
        backend.run_pair(Path(spec["path"]), Path(spec["paired"]), made_by, Path(spec["output"]))
    plan = plan_classify(pairs, work, checkpoint["sha256"], Console(file=io.StringIO()))
    assert [p.index for p in plan.reused] == [1] and [p.index for p in plan.todo] == [2, 3]
    assert not Path(classify_spec(pairs[1], work)["output"]).exists()
