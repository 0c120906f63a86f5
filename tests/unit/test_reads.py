"""The reads of a sample: ids from headers, and every check that reads are who they say they are."""

from __future__ import annotations

import gzip
import random
import tracemalloc
from pathlib import Path

import pytest

from virnucpro.pipeline.fasta import FastaError
from virnucpro.pipeline.reads import IdSet, SampleReads


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def dna(length: int, seed: int) -> str:
    return "".join(random.Random(seed).choices("ACGT", k=length))


def read_all(path: Path, rename_duplicates: bool = False) -> tuple[list[tuple[str, str]], SampleReads]:
    reads = SampleReads(path, rename_duplicates)
    return list(reads), reads


# ---------------------------------------------------------------- ids


def test_the_id_is_the_first_word_of_the_header_split_on_spaces_or_tabs(tmp_path):
    source = write(tmp_path / "in.fa", ">r1 a description\nACGT\n>r2\tsample=A\tlane=1\nACGT\n>r3\nACGT\n")
    assert [read_id for read_id, _ in read_all(source)[0]] == ["r1", "r2", "r3"]


def test_headers_whose_first_word_is_shared_before_a_tab_are_refused_instead_of_collapsed(tmp_path):
    # Reads named "sampleA<TAB>read1", "sampleA<TAB>read2", ... all have the id sampleA: once they were scored
    # with each other's protein features and reported as one chunk.
    source = write(tmp_path / "in.fa", "".join(f">sampleA\tread{i}\n{dna(300, i)}\n" for i in range(4)))
    with pytest.raises(FastaError, match=r"in\.fa: 1 id is shared by several reads \(sampleA\); .*first space or "
                                         r"tab.*--rename-duplicates"):
        read_all(source)


def test_duplicate_ids_are_refused_naming_the_first_five(tmp_path):
    text = "".join(f">m{i}/1\n{dna(50, i)}\n>m{i}/1\n{dna(50, i + 100)}\n" for i in range(8))
    with pytest.raises(FastaError, match=r"5 or more ids are each shared by several reads \(m0/1, m1/1, m2/1, m3/1, "
                                         r"m4/1\)"):
        read_all(write(tmp_path / "pairs.fa", text))


def test_duplicate_ids_are_all_named_when_fewer_than_five(tmp_path):
    text = ">a\nACGT\n>b\nACGT\n>a\nACGT\n>c\nACGT\n>b\nACGT\n>a\nACGT\n"
    with pytest.raises(FastaError, match=r"2 ids are each shared by several reads \(a, b\)"):
        read_all(write(tmp_path / "in.fa", text))


def test_renamed_duplicates_are_id_then_id_2_id_3_and_counted(tmp_path):
    text = ">a\nACGT\n>b\nACGT\n>a x\nACGG\n>a\nACGC\n"
    reads, counts = read_all(write(tmp_path / "in.fa", text), rename_duplicates=True)
    assert reads == [("a", "ACGT"), ("b", "ACGT"), ("a.2", "ACGG"), ("a.3", "ACGC")]
    assert (counts.reads, counts.renamed) == (4, 2)


def test_a_renamed_id_never_takes_an_id_already_in_use(tmp_path):
    text = ">a\nACGT\n>a.2\nACGT\n>a\nACGT\n>a.3\nACGT\n"
    reads, _ = read_all(write(tmp_path / "in.fa", text), rename_duplicates=True)
    assert [read_id for read_id, _ in reads] == ["a", "a.2", "a.3", "a.3.2"]


def test_a_record_without_an_id_is_refused_naming_it(tmp_path):
    with pytest.raises(FastaError, match=r"in\.fa: record 2 has an empty header"):
        read_all(write(tmp_path / "in.fa", ">r1\nACGT\n>\nACGT\n"))


# ---------------------------------------------------------------- sequences


def test_whitespace_inside_sequence_lines_is_dropped_as_biopython_does(tmp_path):
    source = write(tmp_path / "in.fa", ">r1\nAC GT\tAC\r\nGG \t\n>r2\nA\tC\n")
    assert read_all(source)[0] == [("r1", "ACGTACGG"), ("r2", "AC")]


def test_empty_records_are_skipped_and_counted(tmp_path):
    source = write(tmp_path / "in.fa", ">r1\nACGT\n>r2\n>r3 x\n\t\n>r4\nACGT\n")
    reads, counts = read_all(source)
    assert [read_id for read_id, _ in reads] == ["r1", "r4"]
    assert (counts.reads, counts.empty) == (2, 2)


def test_an_input_of_empty_records_only_is_refused(tmp_path):
    with pytest.raises(FastaError, match=r"in\.fa: all 2 records are empty"):
        read_all(write(tmp_path / "in.fa", ">r1\n>r2\n"))


def test_protein_input_is_refused_as_looking_like_protein(tmp_path):
    proteins = "".join(f">p{i}\n{''.join(random.Random(i).choices('ACDEFGHIKLMNPQRSTVWY', k=80))}\n"
                       for i in range(20))
    with pytest.raises(FastaError, match=r"proteins\.fa: looks like protein, not nucleotide reads: only \d+% of its "
                                         r"first 1,600 letters are A, C, G, T, U or N"):
        read_all(write(tmp_path / "proteins.fa", proteins))


def test_a_large_protein_input_is_refused_before_it_is_read_to_the_end(tmp_path):
    rng = random.Random(3)
    proteins = "".join(f">p{i}\n{''.join(rng.choices('EFILPQ', k=1000))}\n" for i in range(300))
    reads = iter(SampleReads(write(tmp_path / "proteins.fa", proteins)))
    taken = []
    with pytest.raises(FastaError, match="looks like protein"):
        for read in reads:
            taken.append(read)
    assert len(taken) < 100


def test_lower_case_dna_and_iupac_ambiguity_codes_are_nucleotides(tmp_path):
    source = write(tmp_path / "in.fa", f">r1\n{dna(200, 1).lower()}\n>r2\n{'ACGTNRY' * 20}\n>r3\nNNNNNNNN\n")
    assert read_all(source)[1].reads == 3


def test_fastq_is_read_and_its_qualities_ignored(tmp_path):
    source = write(tmp_path / "in.fq", "@r1 1:N:0\nACGTAC\n+\nIIIIII\n@r2\nGGCC\n+r2\n!!!!\n")
    assert read_all(source)[0] == [("r1", "ACGTAC"), ("r2", "GGCC")]


def test_gzipped_fastq_is_read(tmp_path):
    with gzip.open(tmp_path / "in.fq.gz", "wt") as handle:
        handle.write("@r1\nACGTAC\n+\nIIIIII\n")
    assert read_all(tmp_path / "in.fq.gz")[0] == [("r1", "ACGTAC")]


def test_a_fastq_record_whose_qualities_do_not_match_is_refused_naming_the_file(tmp_path):
    with pytest.raises(FastaError, match=r"in\.fq: not a valid FASTQ file \(Lengths of sequence and quality"):
        read_all(write(tmp_path / "in.fq", "@r1\nACGT\n+\nIII\n"))


# ---------------------------------------------------------------- the id set


def test_the_id_set_tells_new_ids_from_seen_ones_across_its_merges():
    ids = IdSet()
    count = 3 * IdSet.MIN_MERGE + 17  # past several merges of the newest ids into the sorted array
    assert all(ids.add(f"read{i}") for i in range(count))
    assert not any(ids.add(f"read{i}") for i in range(0, count, 7))
    assert ids.add("read-new") and not ids.add("read-new")
    assert len(ids) == count + 1


def test_the_id_set_costs_about_twenty_bytes_per_id():
    tracemalloc.start()
    try:
        ids = IdSet()
        for i in range(100_000):
            ids.add(f"SRR13512345.{i}")
        current, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current < 100_000 * 25
