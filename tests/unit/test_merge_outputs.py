"""Merge of feature files by name and id, and the two prediction files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from virnucpro.backends.dnabert import DnabertBackend
from virnucpro.backends.esm import EsmBackend
from virnucpro.backends.tiny import FEATURE_DIM, ensure_tiny_models
from virnucpro.pipeline.classifier import MLPClassifier
from virnucpro.pipeline.merge import MergeError, merge_files, merge_pair
from virnucpro.pipeline.outputs import HIGHESTSCORE_NAME, RESULTS_NAME, OutputError, write_predictions


def write_dnabert(path: Path, ids: Sequence[str], features: torch.Tensor) -> Path:
    data = [{"label": i, "mean_representation": row.tolist()} for i, row in zip(ids, features, strict=True)]
    torch.save({"nucleotide": list(ids), "data": data}, path)
    return path


def write_esm(path: Path, ids: Sequence[str], features: torch.Tensor) -> Path:
    torch.save({"proteins": list(ids), "data": [row.clone() for row in features]}, path)
    return path


def write_merged(path: Path, ids: Sequence[str], data: torch.Tensor) -> Path:
    torch.save({"ids": list(ids), "data": data}, path)
    return path


def logit_classifier() -> MLPClassifier:
    """A 2-input VirNucPro MLP whose logits are its (non-negative) inputs, so scores are chosen by the test."""
    model = MLPClassifier(2).eval()
    with torch.no_grad():
        for layer in (model.hidden_layer, model.output_layer):
            layer.weight.zero_()
            layer.bias.zero_()
            layer.weight[0, 0] = layer.weight[1, 1] = 1.0
        model.bn1.running_mean.zero_()
        model.bn1.running_var.fill_(1.0)
    return model


def softmax(logits: Sequence[float]) -> list[float]:
    return torch.softmax(torch.tensor([logits]) / (1 + 1e-5) ** 0.5, dim=1)[0].tolist()


def read_table(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- merge


def test_files_are_paired_by_their_number_not_their_position_in_the_lists(tmp_path):
    dna = {k: torch.full((2, 3), float(k)) for k in (1, 2)}
    protein = {k: torch.full((2, 2), 10.0 * k) for k in (1, 2)}
    dnabert_files = [write_dnabert(tmp_path / f"output_{k}_DNABERT_S.pt", ["a", "b"], dna[k]) for k in (1, 2)]
    esm_files = [write_esm(tmp_path / f"output_{k}_ESM.pt", ["a", "b"], protein[k]) for k in (2, 1)]
    outputs = merge_files(dnabert_files, esm_files, tmp_path / "merged")
    assert [path.name for path in outputs] == ["output_1_merged.pt", "output_2_merged.pt"]
    for k, path in zip((1, 2), outputs, strict=True):
        assert torch.equal(torch.load(path)["data"], torch.cat((dna[k], protein[k]), dim=1))


def test_ids_missing_on_one_side_are_left_out_and_ids_stay_aligned_with_rows(tmp_path):
    dna = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    protein = -torch.arange(8, dtype=torch.float32).reshape(4, 2)
    write_dnabert(tmp_path / "output_1_DNABERT_S.pt", ["a", "b", "c", "d"], dna)
    write_esm(tmp_path / "output_1_ESM.pt", ["d", "a", "z", "c"], protein)  # no b; z has no DNA side
    rows = merge_pair(tmp_path / "output_1_DNABERT_S.pt", tmp_path / "output_1_ESM.pt", tmp_path / "m.pt")
    merged = torch.load(tmp_path / "m.pt")
    assert rows == 3
    assert merged["ids"] == ["a", "c", "d"]  # DNABERT-S order
    expected = torch.stack([torch.cat((dna[d], protein[p])) for d, p in [(0, 1), (2, 3), (3, 0)]])
    assert torch.equal(merged["data"], expected)


def test_the_merged_file_holds_exactly_ids_and_a_float_matrix(tmp_path):
    write_dnabert(tmp_path / "output_3_DNABERT_S.pt", ["a", "b"], torch.rand(2, 768))
    write_esm(tmp_path / "output_3_ESM.pt", ["a", "b"], torch.rand(2, 2560))
    [output] = merge_files([tmp_path / "output_3_DNABERT_S.pt"], [tmp_path / "output_3_ESM.pt"], tmp_path)
    merged = torch.load(output)
    assert set(merged) == {"ids", "data"}
    assert merged["data"].dtype == torch.float32 and merged["data"].shape == (2, 3328)
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def test_a_file_without_its_partner_is_named_with_the_missing_one(tmp_path):
    dnabert_files = [
        write_dnabert(tmp_path / f"output_{k}_DNABERT_S.pt", ["a"], torch.zeros(1, 3)) for k in (1, 2)
    ]
    esm_files = [write_esm(tmp_path / "output_1_ESM.pt", ["a"], torch.zeros(1, 2))]
    with pytest.raises(MergeError, match=r"output_2_DNABERT_S\.pt: has no partner output_2_ESM\.pt"):
        merge_files(dnabert_files, esm_files, tmp_path)


def test_a_feature_file_with_an_unexpected_name_is_refused(tmp_path):
    path = write_dnabert(tmp_path / "features.pt", ["a"], torch.zeros(1, 3))
    with pytest.raises(MergeError, match=r"features\.pt: the name does not match"):
        merge_files([path], [], tmp_path)


# ---------------------------------------------------------------- outputs


def test_prediction_results_have_the_original_header_labels_and_float32_text(tmp_path):
    logits = [[2.0, 0.5], [0.25, 3.0], [1.0, 1.0]]
    merged = write_merged(tmp_path / "output_1_merged.pt", ["r1_chunk_1F1", "r1_chunk_1R2", "r2_chunk_1F3"],
                          torch.tensor(logits))
    outputs = write_predictions([merged], logit_classifier(), tmp_path / "out")
    rows = read_table(outputs.results)
    assert outputs.results.name == RESULTS_NAME
    assert rows[0] == ["Sequence_ID", "Prediction", "score1", "score2"]
    assert [row[:2] for row in rows[1:]] == [
        ["r1_chunk_1F1", "others"],
        ["r1_chunk_1R2", "virus"],
        ["r2_chunk_1F3", "others"],
    ]
    for row, pair in zip(rows[1:], logits, strict=True):
        expected = softmax(pair)
        assert row[2:] == [str(np.float32(expected[0])), str(np.float32(expected[1]))]
    assert outputs.frames == 3


def test_highestscore_calls_a_chunk_virus_when_its_best_virus_score_reaches_its_best_others_score(tmp_path):
    ids = [
        "readB_chunk_1F1", "readB_chunk_1R1",  # frames tie on their maxima -> True
        "readA_chunk_1F1", "readA_chunk_1R2",  # one frame says virus, but others' max is higher -> False
        "readA_chunk_2F2",  # a lone virus frame -> True
    ]
    logits = [[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.5]]
    merged = write_merged(tmp_path / "output_1_merged.pt", ids, torch.tensor(logits))
    outputs = write_predictions([merged], logit_classifier(), tmp_path)
    rows = read_table(outputs.highestscore)
    assert outputs.highestscore.name == HIGHESTSCORE_NAME
    assert rows[0] == ["Modified_ID", "Is_Virus", "max_score_0", "max_score_1"]
    # Sorted by Modified_ID, the Sequence_ID less its two frame characters.
    assert [row[:2] for row in rows[1:]] == [
        ["readA_chunk_1", "False"],
        ["readA_chunk_2", "True"],
        ["readB_chunk_1", "True"],
    ]
    best_others = max(softmax(logits[2])[0], softmax(logits[3])[0])
    best_virus = max(softmax(logits[2])[1], softmax(logits[3])[1])
    assert rows[1][2:] == [str(np.float32(best_others)), str(np.float32(best_virus))]
    assert rows[3][2] == rows[3][3]  # readB's maxima are an exact tie
    assert outputs.chunks == 3


def test_a_chunk_whose_frames_span_two_merged_files_gets_one_consensus_row(tmp_path):
    first = write_merged(tmp_path / "output_1_merged.pt", ["r_chunk_1F1"], torch.tensor([[3.0, 0.0]]))
    second = write_merged(tmp_path / "output_2_merged.pt", ["r_chunk_1R3"], torch.tensor([[0.0, 3.0]]))
    outputs = write_predictions([first, second], logit_classifier(), tmp_path)
    assert [row[0] for row in read_table(outputs.results)[1:]] == ["r_chunk_1F1", "r_chunk_1R3"]
    assert [row[:2] for row in read_table(outputs.highestscore)[1:]] == [["r_chunk_1", "True"]]


def test_a_merged_file_whose_ids_do_not_name_its_rows_is_refused(tmp_path):
    # What the original merge writes when an id lacks a protein: all ids, fewer rows.
    merged = write_merged(tmp_path / "output_1_merged.pt", ["a_chunk_1F1", "a_chunk_1F2"], torch.zeros(1, 2))
    with pytest.raises(OutputError, match=r"output_1_merged\.pt: 2 ids for data of shape \(1, 2\)"):
        write_predictions([merged], logit_classifier(), tmp_path / "out")
    assert not (tmp_path / "out" / RESULTS_NAME).exists()


def test_features_that_do_not_fit_the_classifier_name_the_file(tmp_path):
    merged = write_merged(tmp_path / "output_1_merged.pt", ["a_chunk_1F1"], torch.zeros(1, 5))
    with pytest.raises(OutputError, match=r"output_1_merged\.pt: features have 5 columns .* takes 2"):
        write_predictions([merged], logit_classifier(), tmp_path)


def test_tiny_models_run_end_to_end_from_fasta_to_both_prediction_files(tmp_path):
    tiny = ensure_tiny_models(tmp_path / "tiny")
    (tmp_path / "output_1.fa").write_text(">r1_chunk_1F1\nATGAAACCCGGGTTT\n>r1_chunk_1R2\nATGCCCAAAGGG\n")
    (tmp_path / "output_1.faa").write_text(">r1_chunk_1F1\nMKPGF\n>r1_chunk_1R2\nMPKG\n")
    DnabertBackend(tiny.dnabert_dir).run(tmp_path / "output_1.fa", tmp_path / "output_1_DNABERT_S.pt")
    EsmBackend(tiny.esm_path).run(tmp_path / "output_1.faa", tmp_path / "output_1_ESM.pt")
    merged = merge_files([tmp_path / "output_1_DNABERT_S.pt"], [tmp_path / "output_1_ESM.pt"], tmp_path / "merged")
    assert torch.load(merged[0])["data"].shape == (2, FEATURE_DIM)
    outputs = write_predictions(merged, tiny.classifier_path, tmp_path / "merged")
    assert (outputs.frames, outputs.chunks) == (2, 1)
    assert [row[0] for row in read_table(outputs.results)[1:]] == ["r1_chunk_1F1", "r1_chunk_1R2"]
