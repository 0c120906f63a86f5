"""Feature files as arrays, the merge of a file pair by id, its classification, and the two prediction files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from virnucpro.backends.dnabert import DnabertBackend
from virnucpro.backends.esm import EsmBackend
from virnucpro.backends.tiny import FEATURE_DIM, ensure_tiny_models
from virnucpro.pipeline import outputs
from virnucpro.pipeline.classifier import MLPClassifier, load_classifier, predict_scores
from virnucpro.pipeline.features import FeatureFileError, load_features, save_features
from virnucpro.pipeline.merge import MergeError, merge_features
from virnucpro.pipeline.outputs import (
    HIGHESTSCORE_NAME,
    RESULTS_NAME,
    OutputError,
    assemble_predictions,
    classify_pair,
)
from virnucpro.stages import is_complete


def write_pair(directory: Path, k: int, ids: Sequence[str], dna: torch.Tensor, protein: torch.Tensor,
               esm_ids: Sequence[str] | None = None) -> tuple[Path, Path]:
    dnabert_path, esm_path = directory / f"output_{k}_DNABERT_S.pt", directory / f"output_{k}_ESM.pt"
    save_features(dnabert_path, "dnabert", ids, dna, "fp32")
    save_features(esm_path, "esm", ids if esm_ids is None else esm_ids, protein, "fp32")
    return dnabert_path, esm_path


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


def predict_logits(tmp_path: Path, pairs: Sequence[tuple[Sequence[str], Sequence[Sequence[float]]]]):
    """Classify pairs k = 1, 2, ... whose two logits per frame are the DNABERT-S and ESM-2 features."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (ids, logits) in enumerate(pairs, start=1):
        values = torch.tensor(logits)
        dnabert, esm = write_pair(tmp_path, k, ids, values[:, :1], values[:, 1:])
        paths.append(classify_pair(dnabert, esm, logit_classifier(), tmp_path / f"pair_{k}.tsv").path)
    return assemble_predictions(paths, tmp_path / "out")


def old_predictions(pairs: Sequence[tuple[list[str], torch.Tensor]], classifier: MLPClassifier) -> tuple[str, str]:
    """Both files as the merged-file path wrote them before per-pair classification (the reference)."""
    results = [outputs.RESULTS_HEADER]
    maxima: dict[str, list[np.float32]] = {}
    for ids, features in pairs:
        for sequence_id, (score1, score2) in zip(ids, predict_scores(classifier, features).numpy(), strict=True):
            label = "virus" if score2 > score1 else "others"
            results.append(f"{sequence_id}\t{label}\t{str(np.float32(score1))}\t{str(np.float32(score2))}\n")
            best = maxima.setdefault(sequence_id[:-2], [score1, score2])
            best[0] = max(best[0], score1)
            best[1] = max(best[1], score2)
    highestscore = [outputs.HIGHESTSCORE_HEADER] + [
        f"{chunk}\t{maxima[chunk][1] >= maxima[chunk][0]}\t{str(maxima[chunk][0])}\t{str(maxima[chunk][1])}\n"
        for chunk in sorted(maxima)]
    return "".join(results), "".join(highestscore)


# ---------------------------------------------------------------- feature files


def test_a_feature_file_round_trips_its_ids_array_stage_and_precision(tmp_path):
    data = torch.rand(3, 5)
    save_features(tmp_path / "f.pt", "esm", ["a", "b", "c"], data, "bf16")
    features = load_features(tmp_path / "f.pt", "esm")
    assert (features.stage, features.precision, features.ids) == ("esm", "bf16", ["a", "b", "c"])
    assert torch.equal(features.data, data) and features.data.is_contiguous()


def test_saving_some_rows_of_a_larger_array_saves_those_rows_only(tmp_path):
    big = torch.rand(1000, 64)
    save_features(tmp_path / "few.pt", "dnabert", ["a", "b"], big[10:12])
    assert torch.equal(load_features(tmp_path / "few.pt").data, big[10:12])
    assert (tmp_path / "few.pt").stat().st_size < 10_000


@pytest.mark.parametrize("ids", [["a", ""], ["a", "b\nc"]])
def test_ids_that_could_not_be_read_back_are_refused_when_saving(tmp_path, ids):
    with pytest.raises(ValueError, match="ids must be non-empty and hold no line break"):
        save_features(tmp_path / "f.pt", "esm", ids, torch.zeros(2, 1))
    assert not (tmp_path / "f.pt").exists()


def test_the_per_row_format_of_earlier_versions_is_refused_and_not_complete(tmp_path):
    path = tmp_path / "output_1_DNABERT_S.pt"
    torch.save({"nucleotide": ["a"], "data": [{"label": "a", "mean_representation": [0.5, 0.25]}]}, path)
    with pytest.raises(FeatureFileError, match=r"output_1_DNABERT_S\.pt: .*older version's per-row format"):
        load_features(path)
    assert not is_complete(path)


def test_a_file_from_another_stage_is_refused(tmp_path):
    save_features(tmp_path / "output_1_ESM.pt", "esm", ["a"], torch.zeros(1, 2))
    with pytest.raises(FeatureFileError, match=r"output_1_ESM\.pt: written by the 'esm' stage, not 'dnabert'"):
        load_features(tmp_path / "output_1_ESM.pt", "dnabert")


def test_ids_that_do_not_name_the_rows_one_to_one_are_refused(tmp_path):
    path = tmp_path / "f.pt"
    torch.save({"stage": "esm", "precision": "fp32", "ids": "a\nb", "data": torch.zeros(1, 2)}, path)
    with pytest.raises(FeatureFileError, match=r"f\.pt: 2 ids for data of shape \(1, 2\)"):
        load_features(path)
    assert not is_complete(path)


def test_a_whole_feature_file_is_complete_and_a_truncated_one_is_not(tmp_path):
    path = tmp_path / "output_1_ESM.pt"
    save_features(path, "esm", ["a", "b"], torch.rand(2, 300))
    assert is_complete(path)
    path.write_bytes(path.read_bytes()[:-100])
    assert not is_complete(path)


# ---------------------------------------------------------------- merge


def test_rows_are_the_dnabert_feature_then_the_esm_feature_of_the_same_id(tmp_path):
    dna, protein = torch.rand(4, 3), torch.rand(4, 2)
    merged = merge_features(*write_pair(tmp_path, 1, ["a", "b", "c", "d"], dna, protein))
    assert merged.ids == ["a", "b", "c", "d"]
    assert torch.equal(merged.data, torch.cat((dna, protein), dim=1))


@pytest.mark.parametrize("esm_ids, difference", [
    (["a", "c", "b"], r"row 2 is 'b' in the first and 'c' in the second"),
    (["a", "b"], r"the first holds 3 ids, the second 2"),
])
def test_ids_that_differ_between_the_pair_name_both_files_and_merge_nothing(tmp_path, esm_ids, difference):
    dnabert, esm = write_pair(tmp_path, 3, ["a", "b", "c"], torch.rand(3, 3), torch.rand(len(esm_ids), 2), esm_ids)
    with pytest.raises(MergeError, match=rf"output_3_DNABERT_S\.pt and .*output_3_ESM\.pt: {difference}"):
        classify_pair(dnabert, esm, logit_classifier(), tmp_path / "pair.tsv")
    assert not (tmp_path / "pair.tsv").exists()


# ---------------------------------------------------------------- classification and outputs


def test_per_pair_classification_writes_byte_for_byte_what_the_merged_file_path_wrote(tmp_path):
    torch.manual_seed(5)
    classifier = MLPClassifier(24).eval()
    torch.nn.init.normal_(classifier.bn1.running_mean)
    # Two chunks of two frames per read, in an order unlike the sorted one; pairs of 7, 5 and 9 frames
    # cut chunks in two, so their maxima are completed across pairs.
    frame_ids = [f"read{17 * r % 23}_chunk_{c}{frame}" for r in range(6) for c in (1, 2) for frame in ("F1", "R2")]
    pairs = []
    for start, end in ((0, 7), (7, 12), (12, 21)):
        pairs.append((frame_ids[start:end], torch.randn(end - start, 24) * 3))
    paths = []
    for k, (ids, features) in enumerate(pairs, start=1):
        dnabert, esm = write_pair(tmp_path, k, ids, features[:, :16], features[:, 16:])
        paths.append(classify_pair(dnabert, esm, classifier, tmp_path / f"pair_{k}.tsv").path)
    written = assemble_predictions(paths, tmp_path / "out")
    results, highestscore = old_predictions(pairs, classifier)
    assert written.results.read_text() == results
    assert written.highestscore.read_text() == highestscore
    assert (written.frames, written.chunks) == (21, highestscore.count("\n") - 1)


def test_merging_the_per_chunk_maxima_in_rounds_gives_the_same_file(tmp_path, monkeypatch):
    pairs = [([f"r{n % 3}_chunk_1F{k}", f"r{k}{n}_chunk_2R1"], [[float(k), float(n)], [1.0, 2.0]])
             for k in range(1, 4) for n in range(3)]
    at_once = predict_logits(tmp_path / "once", pairs)
    monkeypatch.setattr(outputs, "MERGE_FAN_IN", 2)
    in_rounds = predict_logits(tmp_path / "rounds", pairs)
    assert not list((tmp_path / "rounds").glob(".merge-*"))
    assert in_rounds.highestscore.read_bytes() == at_once.highestscore.read_bytes()
    assert in_rounds.results.read_bytes() == at_once.results.read_bytes()


def test_prediction_results_have_the_original_header_labels_and_float32_text(tmp_path):
    logits = [[2.0, 0.5], [0.25, 3.0], [1.0, 1.0]]
    written = predict_logits(tmp_path, [(["r1_chunk_1F1", "r1_chunk_1R2", "r2_chunk_1F3"], logits)])
    rows = read_table(written.results)
    assert written.results.name == RESULTS_NAME
    assert rows[0] == ["Sequence_ID", "Prediction", "score1", "score2"]
    assert [row[:2] for row in rows[1:]] == [
        ["r1_chunk_1F1", "others"],
        ["r1_chunk_1R2", "virus"],
        ["r2_chunk_1F3", "others"],
    ]
    for row, pair in zip(rows[1:], logits, strict=True):
        expected = softmax(pair)
        assert row[2:] == [str(np.float32(expected[0])), str(np.float32(expected[1]))]
    assert written.frames == 3


def test_highestscore_calls_a_chunk_virus_when_its_best_virus_score_reaches_its_best_others_score(tmp_path):
    ids = [
        "readB_chunk_1F1", "readB_chunk_1R1",  # frames tie on their maxima -> True
        "readA_chunk_1F1", "readA_chunk_1R2",  # one frame says virus, but others' max is higher -> False
        "readA_chunk_2F2",  # a lone virus frame -> True
    ]
    logits = [[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.5]]
    written = predict_logits(tmp_path, [(ids, logits)])
    rows = read_table(written.highestscore)
    assert written.highestscore.name == HIGHESTSCORE_NAME
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
    assert written.chunks == 3


def test_a_chunk_whose_frames_span_two_pairs_gets_one_consensus_row(tmp_path):
    written = predict_logits(tmp_path, [(["r_chunk_1F1"], [[3.0, 0.0]]), (["r_chunk_1R3"], [[0.0, 3.0]])])
    assert [row[0] for row in read_table(written.results)[1:]] == ["r_chunk_1F1", "r_chunk_1R3"]
    assert [row[:2] for row in read_table(written.highestscore)[1:]] == [["r_chunk_1", "True"]]


def test_features_that_do_not_fit_the_classifier_name_the_files(tmp_path):
    dnabert, esm = write_pair(tmp_path, 1, ["a_chunk_1F1"], torch.zeros(1, 3), torch.zeros(1, 2))
    with pytest.raises(OutputError, match=r"output_1_DNABERT_S\.pt \+ .*output_1_ESM\.pt: features have 5 columns .* "
                                          r"takes 2"):
        classify_pair(dnabert, esm, logit_classifier(), tmp_path / "pair.tsv")


def test_merged_features_are_written_only_when_asked(tmp_path):
    dna, protein = torch.rand(2, 1), torch.rand(2, 1)
    dnabert, esm = write_pair(tmp_path, 1, ["a_chunk_1F1", "b_chunk_1F1"], dna, protein)
    classify_pair(dnabert, esm, logit_classifier(), tmp_path / "pair.tsv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output_1_DNABERT_S.pt", "output_1_ESM.pt", "pair.tsv"]
    classify_pair(dnabert, esm, logit_classifier(), tmp_path / "pair.tsv", keep_features=tmp_path / "merged.pt")
    merged = load_features(tmp_path / "merged.pt", "merged")
    assert merged.ids == ["a_chunk_1F1", "b_chunk_1F1"] and torch.equal(merged.data, torch.cat((dna, protein), 1))


def test_a_truncated_per_pair_file_is_refused_and_no_prediction_file_appears(tmp_path):
    written = predict_logits(tmp_path, [(["a_chunk_1F1", "a_chunk_1F2"], [[1.0, 0.0], [0.0, 1.0]])])
    pair = tmp_path / "pair_1.tsv"
    pair.write_bytes(pair.read_bytes()[:60])
    written.results.unlink()
    with pytest.raises(OutputError, match=r"pair_1\.tsv: .*truncated"):
        assemble_predictions([pair], tmp_path / "out")
    assert not written.results.exists()


def test_a_damaged_per_chunk_row_leaves_neither_prediction_file(tmp_path):
    written = predict_logits(tmp_path, [(["a_chunk_1F1", "b_chunk_1F2"], [[1.0, 0.0], [0.0, 1.0]])])
    written.results.unlink()
    written.highestscore.unlink()
    pair = tmp_path / "pair_1.tsv"
    pair.write_text(pair.read_text().replace("b_chunk_1\t", "b_chunk_1 "))
    with pytest.raises(OutputError, match=r"pair_1\.tsv: a per-chunk row is damaged"):
        assemble_predictions([pair], tmp_path / "out")
    assert not written.results.exists() and not written.highestscore.exists()


def test_tiny_models_run_end_to_end_from_fasta_to_both_prediction_files(tmp_path):
    tiny = ensure_tiny_models(tmp_path / "tiny")
    (tmp_path / "output_1.fa").write_text(">r1_chunk_1F1\nATGAAACCCGGGTTT\n>r1_chunk_1R2\nATGCCCAAAGGG\n")
    (tmp_path / "output_1.faa").write_text(">r1_chunk_1F1\nMKPGF\n>r1_chunk_1R2\nMPKG\n")
    DnabertBackend(tiny.dnabert_dir).run(tmp_path / "output_1.fa", tmp_path / "output_1_DNABERT_S.pt")
    EsmBackend(tiny.esm_path).run(tmp_path / "output_1.faa", tmp_path / "output_1_ESM.pt")
    pair = classify_pair(tmp_path / "output_1_DNABERT_S.pt", tmp_path / "output_1_ESM.pt",
                         load_classifier(tiny.classifier_path), tmp_path / "pair.tsv", tmp_path / "merged.pt")
    assert load_features(tmp_path / "merged.pt").data.shape == (2, FEATURE_DIM)
    written = assemble_predictions([pair.path], tmp_path / "out")
    assert (written.frames, written.chunks) == (2, 1)
    assert [row[0] for row in read_table(written.results)[1:]] == ["r1_chunk_1F1", "r1_chunk_1R2"]
