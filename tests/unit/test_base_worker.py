"""Static assignment of files to GPUs: unweighted default and weighted by GPU model."""

import logging

import pytest

from virnucpro.pipeline import base_worker
from virnucpro.pipeline.base_worker import BaseEmbeddingWorker, assign_files_by_sequences, count_sequences
from virnucpro.pipeline.fasta import FastaError


@pytest.fixture
def gpus(monkeypatch):
    """Mock torch's device names: this machine has no GPU."""
    import torch

    names = {}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[device])
    monkeypatch.delenv("VIRNUCPRO_GPU_WEIGHTS", raising=False)
    return names


def test_count_sequences_counts_records(fasta_factory):
    assert count_sequences(fasta_factory("a.fa", [5, 6, 7, 8])) == 4


def test_unweighted_default_is_the_original_greedy_packing_by_sequence_count(fasta_factory):
    files = [fasta_factory(f"f{i}.fa", [10] * n) for i, n in enumerate([5, 9, 2, 7, 7, 1])]
    assignment = assign_files_by_sequences(files, 2)
    # Largest first, each to the worker with fewer sequences so far, ties to worker 0.
    assert assignment == [[files[1], files[0], files[2]], [files[3], files[4], files[5]]]


def test_unweighted_packing_ignores_sequence_length(fasta_factory):
    long_reads = fasta_factory("long.fa", [5000] * 3)
    short_reads = fasta_factory("short.fa", [10] * 4)
    assert assign_files_by_sequences([long_reads, short_reads], 2) == [[short_reads], [long_reads]]


def test_weighted_assignment_uses_each_gpus_weight(fasta_factory, gpus):
    gpus.update({0: "NVIDIA GeForce RTX 3090", 1: "NVIDIA GeForce RTX 4090"})
    files = [fasta_factory(f"f{i:02d}.fa", [100] * 10) for i in range(50)]
    assignment = assign_files_by_sequences(files, 2, use_weighted_assignment=True)
    assert (len(assignment[0]), len(assignment[1])) == (20, 30)


def test_weighted_assignment_logs_one_line_per_gpu_with_model_and_weight(fasta_factory, gpus, caplog):
    gpus.update({0: "NVIDIA GeForce RTX 3090", 1: "NVIDIA GeForce RTX 4090"})
    files = [fasta_factory(f"f{i:02d}.fa", [10] * 2500) for i in range(50)]
    with caplog.at_level(logging.INFO, logger=base_worker.__name__):
        assign_files_by_sequences(files, 2, use_weighted_assignment=True)
    lines = [r.getMessage() for r in caplog.records]
    assert "GPU 0 (RTX 3090, weight=1.00): 20 files, 50000 sequences" in lines
    assert "GPU 1 (RTX 4090, weight=1.50): 30 files, 75000 sequences" in lines


def test_weighted_assignment_reads_the_given_device_ids(fasta_factory, gpus, caplog):
    gpus.update({2: "NVIDIA H100 80GB HBM3", 5: "NVIDIA GeForce RTX 3090"})
    files = [fasta_factory(f"f{i:02d}.fa", [100] * 10) for i in range(7)]
    with caplog.at_level(logging.INFO, logger=base_worker.__name__):
        assignment = assign_files_by_sequences(files, 2, use_weighted_assignment=True, device_ids=[2, 5])
    assert (len(assignment[0]), len(assignment[1])) == (5, 2)
    assert any(r.getMessage().startswith("GPU 2 (H100, weight=2.50)") for r in caplog.records)


def test_unknown_gpu_is_logged_under_its_own_name_with_weight_one(fasta_factory, gpus, caplog):
    gpus.update({0: "NVIDIA L40S"})
    files = [fasta_factory("a.fa", [10])]
    with caplog.at_level(logging.INFO):
        assign_files_by_sequences(files, 1, use_weighted_assignment=True)
    assert "GPU 0 (NVIDIA L40S, weight=1.00): 1 files, 1 sequences" in [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("weighted", [False, True])
def test_single_worker_gets_every_file(fasta_factory, gpus, weighted):
    gpus.update({0: "NVIDIA A100-SXM4-80GB"})
    files = [fasta_factory(f"f{i}.fa", [10] * (i + 1)) for i in range(4)]
    assert sorted(assign_files_by_sequences(files, 1, use_weighted_assignment=weighted)[0]) == sorted(files)


@pytest.mark.parametrize("make_bad", ["missing", "empty", "not_fasta"])
def test_a_bad_file_stops_assignment_with_an_error_naming_it(fasta_factory, tmp_path, make_bad):
    good = fasta_factory("good.fa", [10])
    bad = tmp_path / f"{make_bad}.fa"
    if make_bad == "empty":
        bad.write_text("")
    elif make_bad == "not_fasta":
        bad.write_text("hello world\n")
    with pytest.raises(FastaError, match=f"{make_bad}.fa"):
        assign_files_by_sequences([good, bad], 2)


def test_num_workers_below_one_is_rejected(fasta_factory):
    with pytest.raises(ValueError, match="num_workers must be an integer >= 1"):
        assign_files_by_sequences([fasta_factory("a.fa", [1])], 0)


def test_base_worker_cannot_be_instantiated_without_its_two_methods():
    class Half(BaseEmbeddingWorker):
        def get_optimal_batch_size(self, device):
            return 1

    with pytest.raises(TypeError):
        Half()
