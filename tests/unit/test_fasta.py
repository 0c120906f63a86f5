"""FASTA reading: counts by streaming, and one clear error per kind of bad file."""

import gzip
import tracemalloc

import pytest

from virnucpro.pipeline.fasta import FastaError, fasta_stats, read_fasta


def test_stats_count_records_and_residues_across_wrapped_lines(fasta_factory):
    path = fasta_factory("a.fa", [10, 130, 1])
    stats = fasta_stats(path)
    assert (stats.sequences, stats.residues) == (3, 141)


def test_gzip_files_are_read_transparently(tmp_path):
    path = tmp_path / "a.fa.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(">r1\nACGT\n>r2\nAA\n")
    assert [t for t, _ in read_fasta(path)] == ["r1", "r2"]
    assert fasta_stats(path).residues == 6


def test_missing_file_error_names_the_file(tmp_path):
    with pytest.raises(FastaError, match=r"nope\.fa: file not found"):
        fasta_stats(tmp_path / "nope.fa")


def test_empty_file_error_says_no_records(tmp_path):
    path = tmp_path / "empty.fa"
    path.write_text("\n\n")
    with pytest.raises(FastaError, match=r"empty\.fa: holds no FASTA records"):
        fasta_stats(path)


def test_text_that_is_not_fasta_is_rejected_with_the_first_line(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("id,sequence\nr1,ACGT\n")
    with pytest.raises(FastaError, match=r"table\.csv: not a FASTA file.*id,sequence"):
        fasta_stats(path)


def test_binary_file_is_rejected(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b">\xff\xfe\x00\x01binary")
    with pytest.raises(FastaError, match=r"model\.bin: not a text FASTA file"):
        fasta_stats(path)


def test_directory_is_rejected(tmp_path):
    with pytest.raises(FastaError, match="is a directory"):
        fasta_stats(tmp_path)


def test_unreadable_file_is_rejected(tmp_path, monkeypatch):
    path = tmp_path / "locked.fa"
    path.write_text(">a\nAC\n")
    real_open = open

    def deny(file, mode="r", *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(FastaError, match=r"locked\.fa: cannot be read \(Permission denied\)"):
        fasta_stats(path)


def test_counting_streams_instead_of_reading_the_whole_file(tmp_path):
    path = tmp_path / "big.fa"
    record = ">r\n" + ("ACGT" * 15 + "\n") * 4
    with open(path, "w") as handle:
        handle.write(record * 40_000)  # about 10 MB
    tracemalloc.start()
    try:
        stats = fasta_stats(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.sequences == 40_000
    assert peak < 1_000_000
