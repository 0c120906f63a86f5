"""The VirNucPro classifier: published whole-module checkpoints, scores, labels, clear errors."""

from __future__ import annotations

import sys
import zipfile

import pytest
import torch

import virnucpro.pipeline.classifier
from virnucpro.backends.tiny import FEATURE_DIM, build_tiny_classifier
from virnucpro.pipeline.classifier import (
    ClassifierCheckpointError,
    MLPClassifier,
    classifier_bytes,
    label_for,
    load_classifier,
    predict_scores,
)


def test_a_state_dict_is_not_taken_for_the_classifier(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(MLPClassifier().state_dict(), path)
    with pytest.raises(ClassifierCheckpointError, match=r"weights\.pth: holds a collections\.OrderedDict"):
        load_classifier(path)


def test_a_file_that_is_no_checkpoint_at_all_is_named(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a model\n")
    with pytest.raises(ClassifierCheckpointError, match=r"notes\.txt: not a VirNucPro classifier checkpoint"):
        load_classifier(path)


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ClassifierCheckpointError, match=r"300_model\.pth: no such classifier checkpoint"):
        load_classifier(tmp_path / "300_model.pth")


def test_the_checkpoint_errors_are_value_errors():
    assert issubclass(ClassifierCheckpointError, ValueError)


def test_a_saved_classifier_pickles_its_class_as_main_mlpclassifier(tmp_path):
    path = tmp_path / "tiny_model.pth"
    path.write_bytes(classifier_bytes(build_tiny_classifier()))
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
    assert b"c__main__\nMLPClassifier\n" in pickled
    assert load_classifier(path).input_dim == FEATURE_DIM


def test_saving_puts_the_class_and_main_back_as_they_were():
    main = sys.modules["__main__"]
    had_name = hasattr(main, "MLPClassifier")
    classifier_bytes(MLPClassifier(8))
    assert MLPClassifier.__module__ == virnucpro.pipeline.classifier.__name__
    assert hasattr(main, "MLPClassifier") == had_name


def test_scores_are_the_softmax_with_score1_for_others_and_score2_for_virus():
    model = MLPClassifier(4).eval()
    features = torch.randn(3, 4)
    scores = predict_scores(model, features)
    with torch.no_grad():
        expected = torch.softmax(model(features), dim=1)
    assert scores.dtype == torch.float32 and scores.shape == (3, 2)
    assert torch.allclose(scores, expected)
    assert [label_for(*row) for row in scores.tolist()] == [
        "virus" if p_virus > p_others else "others" for p_others, p_virus in expected.tolist()
    ]


def test_a_tie_goes_to_others():
    model = MLPClassifier(4).eval()
    with torch.no_grad():
        model.output_layer.weight.zero_()
        model.output_layer.bias.zero_()
    score1, score2 = predict_scores(model, torch.randn(1, 4))[0].tolist()
    assert score1 == score2 == 0.5
    assert label_for(score1, score2) == "others"
    assert label_for(0.4, 0.6) == "virus"


def test_features_of_the_wrong_width_are_refused_with_both_widths():
    with pytest.raises(ValueError, match=r"shape \(2, 5\).*takes 4 columns"):
        predict_scores(MLPClassifier(4).eval(), torch.zeros(2, 5))
