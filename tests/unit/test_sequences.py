"""Sequence stages: chunking, six-frame translation and paired file splitting, as docs/method.md 1-3 specify."""

from __future__ import annotations

import itertools
import random
import tracemalloc
from pathlib import Path

import pytest
from Bio.Data.CodonTable import standard_dna_table
from hypothesis import given
from hypothesis import strategies as st

import virnucpro.pipeline.reads as reads_module
from virnucpro.pipeline.fasta import FastaError, read_fasta
from virnucpro.pipeline.reads import SampleReads
from virnucpro.pipeline.sequences import FilePair, chunk_records, chunk_spans, split_into_files, translate_six_frames

IDSET_PEAK_BYTES_PER_ID = 60  # see tests/unit/test_reads.py
STANDARD_CODE = {**standard_dna_table.forward_table, **{codon: "*" for codon in standard_dna_table.stop_codons}}


def starts(length: int, expected_length: int) -> list[int]:
    return [start for start, _end in chunk_spans(length, expected_length)]


def frames(record_id: str, sequence: str) -> dict[str, tuple[str, str]]:
    return {frame_id: (nucleotide, protein) for frame_id, nucleotide, protein in translate_six_frames(record_id, sequence)}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def ids_of(path: Path) -> list[str]:
    return [header for header, _sequence in read_fasta(path)]


# Section 1: chunking


def test_999_bases_at_500_give_chunks_starting_at_0_and_499():
    assert chunk_spans(999, 500) == [(0, 500), (499, 999)]


def test_1499_bases_at_500_give_chunks_starting_at_0_499_999():
    assert starts(1499, 500) == [0, 499, 999]


def test_1200_bases_at_500_divide_the_surplus_by_n_leaving_a_last_chunk_of_402():
    assert chunk_spans(1200, 500) == [(0, 500), (399, 899), (798, 1200)]


def test_501_bases_at_500_give_0_to_500_and_250_to_501():
    assert chunk_spans(501, 500) == [(0, 500), (250, 501)]


@pytest.mark.parametrize("length", [1, 150, 299, 300])
def test_a_read_no_longer_than_the_chunk_length_is_one_whole_chunk(length):
    assert chunk_spans(length, 300) == [(0, length)]


def test_a_read_with_no_bases_has_no_chunk():
    assert chunk_spans(0, 500) == []


@given(length=st.integers(1, 20_000), expected_length=st.sampled_from([300, 500]))
def test_chunks_cover_the_read_in_increasing_overlapping_spans_of_the_chunk_length(length, expected_length):
    spans = chunk_spans(length, expected_length)
    assert len(spans) == -(-length // expected_length)
    assert spans[0][0] == 0 and spans[-1][1] == length
    for (start, end), (next_start, _next_end) in itertools.pairwise(spans):
        assert end - start == expected_length
        assert start < next_start <= end
    assert 0 < spans[-1][1] - spans[-1][0] <= expected_length


def test_chunk_ids_are_the_read_id_and_the_chunk_number_from_1():
    read = "A" * 500 + "C" * 499
    chunks = list(chunk_records([("read7", read), ("short", "ACGT")], 500))
    assert chunks == [
        ("read7_chunk_1", read[0:500]),
        ("read7_chunk_2", read[499:999]),
        ("short_chunk_1", "ACGT"),
    ]


# Section 2: six-frame translation and ORF selection


def test_all_six_frames_are_kept_in_order_with_f_and_r_appended_directly_to_the_id():
    # ACG repeats have no stop in any frame of either strand.
    assert [frame_id for frame_id, _n, _p in translate_six_frames("read7_chunk_1", "ACGACGACG")] == [
        "read7_chunk_1F1", "read7_chunk_1F2", "read7_chunk_1F3",
        "read7_chunk_1R1", "read7_chunk_1R2", "read7_chunk_1R3",
    ]  # fmt: skip


def test_proteins_use_the_standard_code_on_both_strands():
    result = frames("r", "ACGACGACG")  # reverse complement: CGTCGTCGT
    assert {frame_id: protein for frame_id, (_n, protein) in result.items()} == {
        "rF1": "TTT", "rF2": "RR", "rF3": "DD", "rR1": "RRR", "rR2": "VV", "rR3": "SS",
    }  # fmt: skip


def test_the_nucleotide_slice_is_3p_plus_1_bases_from_the_frame_start():
    result = frames("r", "ACGACGACGAC")
    assert result["rF1"] == ("ACGACGACGA", "TTT")  # seq[0:10]
    assert result["rF2"] == ("CGACGACGAC", "RRR")  # seq[1:11]
    assert result["rR1"] == ("GTCGTCGTCG", "VVV")  # revcomp GTCGTCGTCGT [0:10]


def test_the_nucleotide_slice_is_cut_at_the_end_of_the_read():
    result = frames("r", "ACGACGACG")
    assert result["rF1"] == ("ACGACGACG", "TTT")  # seq[0:10] of 9 bases
    assert result["rF3"] == ("GACGACG", "DD")  # seq[2:9], exactly 3p+1


def test_the_sequence_is_upper_cased_before_translation():
    assert frames("r", "acgacgacg") == frames("r", "ACGACGACG")


def test_codons_with_a_non_acgt_base_are_dropped_and_the_slice_follows_the_shorter_protein():
    nucleotide, protein = frames("r", "ATGNNNATGCC")["rF1"]
    assert protein == "MM"
    assert nucleotide == "ATGNNNA"  # 3p+1 = 7 bases, although the frame spans 3 codons


def test_the_complement_passes_non_acgt_characters_through_unchanged():
    # reverse complement of AAARCCC is GGGRTTT: R stays R, not its IUPAC complement Y.
    assert frames("r", "AAARCCC")["rR1"] == ("GGGR", "G")


def test_frames_with_a_stop_codon_are_dropped():
    # F1 reads TAA TAA TAA; the other frames have no stop.
    assert list(frames("r", "TAATAATAA")) == ["rF2", "rF3", "rR1", "rR2", "rR3"]


@pytest.mark.parametrize("sequence", ["", "AC", "NNNNNN", "ANNNNA"])
def test_frames_with_an_empty_protein_are_dropped(sequence):
    assert frames("r", sequence) == {}


@given(st.text(alphabet="ACGTNacgt", max_size=60))
def test_kept_frames_are_exactly_those_whose_codon_by_codon_translation_is_stop_free(sequence):
    upper = sequence.upper()
    reverse = upper.translate(str.maketrans("ACGT", "TGCA"))[::-1]
    expected = {}
    for strand, strand_sequence in (("F", upper), ("R", reverse)):
        for frame in (1, 2, 3):
            codons = [strand_sequence[i : i + 3] for i in range(frame - 1, len(strand_sequence) - 2, 3)]
            protein = "".join(STANDARD_CODE.get(codon, "") for codon in codons)
            if protein and "*" not in protein:
                expected[f"r{strand}{frame}"] = (strand_sequence[frame - 1 : frame + 3 * len(protein)], protein)
    assert frames("r", sequence) == expected


# Section 3: splitting into paired files


def random_reads(count: int, length: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    return "".join(f">read{i} sample\n{''.join(rng.choices('ACGT', k=length))}\n" for i in range(count))


def test_file_k_of_both_sets_holds_the_same_ids_in_the_same_order(tmp_path):
    source = write(tmp_path / "in.fa", random_reads(200, 150))
    pairs = split_into_files(SampleReads(source), tmp_path / "work", 300, sequences_per_file=7)
    assert len(pairs) > 2
    for pair in pairs:
        assert ids_of(pair.nucleotide) == ids_of(pair.protein)


def test_files_hold_sequences_per_file_records_and_the_last_holds_the_rest(tmp_path):
    # ACG repeats keep all six frames: 4 reads give 24 records, in files of 10, 10, 4.
    source = write(tmp_path / "in.fa", "".join(f">r{i}\nACGACGACG\n" for i in range(4)))
    pairs = split_into_files(SampleReads(source), tmp_path / "work", 300, sequences_per_file=10)
    work = tmp_path / "work"
    assert pairs == [
        FilePair(1, work / "nucleotide" / "output_1.fa", work / "protein" / "output_1.fa", 10),
        FilePair(2, work / "nucleotide" / "output_2.fa", work / "protein" / "output_2.fa", 10),
        FilePair(3, work / "nucleotide" / "output_3.fa", work / "protein" / "output_3.fa", 4),
    ]
    assert [len(ids_of(pair.nucleotide)) for pair in pairs] == [10, 10, 4]
    assert ids_of(pairs[2].protein) == ["r3_chunk_1F3", "r3_chunk_1R1", "r3_chunk_1R2", "r3_chunk_1R3"]


def test_files_hold_every_kept_frame_in_input_then_frame_order_one_line_per_sequence(tmp_path):
    text = random_reads(50, 700)
    source = write(tmp_path / "in.fa", text)
    pairs = split_into_files(SampleReads(source), tmp_path / "work", 500, sequences_per_file=9)
    expected = [
        frame
        for chunk_id, chunk in chunk_records(((h.split()[0], s) for h, s in read_fasta(source)), 500)
        for frame in translate_six_frames(chunk_id, chunk)
    ]
    nucleotide_text = "".join(pair.nucleotide.read_text() for pair in pairs)
    protein_text = "".join(pair.protein.read_text() for pair in pairs)
    assert nucleotide_text == "".join(f">{frame_id}\n{nucleotide}\n" for frame_id, nucleotide, _p in expected)
    assert protein_text == "".join(f">{frame_id}\n{protein}\n" for frame_id, _n, protein in expected)
    assert sum(pair.sequences for pair in pairs) == len(expected)


def test_a_failure_mid_input_leaves_only_complete_files_and_no_temporary_ones(tmp_path, monkeypatch):
    def failing_reader(path):
        yield from [(f"r{i}", "ACGACGACG") for i in range(3)]  # 18 frames: one full file of 10
        raise FastaError(f"{path}: cannot be read to the end")

    monkeypatch.setattr(reads_module, "read_sequence_file", failing_reader)
    work = tmp_path / "work"
    with pytest.raises(FastaError, match="cannot be read to the end"):
        split_into_files(SampleReads(tmp_path / "in.fa"), work, 300, sequences_per_file=10)
    for kind in ("nucleotide", "protein"):
        assert sorted(p.name for p in (work / kind).iterdir()) == ["output_1.fa"]
        assert len(ids_of(work / kind / "output_1.fa")) == 10


def test_splitting_streams_so_memory_grows_only_by_the_duplicate_check_on_a_multi_megabyte_input(tmp_path):
    source = write(tmp_path / "in.fa", random_reads(15_000, 150))
    assert source.stat().st_size > 2_000_000
    tracemalloc.start()
    try:
        split_into_files(SampleReads(source), tmp_path / "work", 300, sequences_per_file=10_000)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 500_000 + 15_000 * IDSET_PEAK_BYTES_PER_ID


# Bad input


def test_a_missing_input_is_a_fasta_error_naming_the_file(tmp_path):
    with pytest.raises(FastaError, match=r"nope\.fa: file not found"):
        split_into_files(SampleReads(tmp_path / "nope.fa"), tmp_path / "work", 300)


def test_an_input_that_is_not_fasta_is_a_fasta_error_naming_the_file(tmp_path):
    source = write(tmp_path / "reads.csv", "id,sequence\nr1,ACGT\n")
    with pytest.raises(FastaError, match=r"reads\.csv: not a FASTA or FASTQ file"):
        split_into_files(SampleReads(source), tmp_path / "work", 300)


def test_an_input_without_records_is_a_fasta_error_naming_the_file(tmp_path):
    source = write(tmp_path / "empty.fa", "\n")
    with pytest.raises(FastaError, match=r"empty\.fa: holds no FASTA records"):
        split_into_files(SampleReads(source), tmp_path / "work", 300)


def test_an_input_where_no_frame_survives_is_a_fasta_error_and_writes_no_file(tmp_path):
    # TTAATTAATTAA is its own reverse complement and has a stop in each of its three frames.
    source = write(tmp_path / "stops.fa", ">r1\nTTAATTAATTAA\n>r2\nNNNNNNNN\n>r3\nAC\n")
    with pytest.raises(FastaError, match=r"no open reading frame in any read of .*stops\.fa"):
        split_into_files(SampleReads(source), tmp_path / "work", 300)
    assert list((tmp_path / "work").rglob("*.fa")) == []


@pytest.mark.parametrize("expected_length", [0, 150, 400, 1000])
def test_an_expected_length_other_than_300_or_500_is_a_value_error(tmp_path, expected_length):
    source = write(tmp_path / "in.fa", ">r1\nACGACGACG\n")
    with pytest.raises(ValueError, match="expected_length must be 300 or 500"):
        split_into_files(SampleReads(source), tmp_path / "work", expected_length)


def test_a_sequences_per_file_below_1_is_a_value_error(tmp_path):
    source = write(tmp_path / "in.fa", ">r1\nACGACGACG\n")
    with pytest.raises(ValueError, match="sequences_per_file must be at least 1"):
        split_into_files(SampleReads(source), tmp_path / "work", 300, sequences_per_file=0)
