"""Model files made by other processes: the tiny set built by two at once, a classifier pickled by a training script."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from virnucpro.backends.dnabert import DnabertBackend
from virnucpro.backends.esm import EsmBackend
from virnucpro.backends.tiny import ensure_tiny_models
from virnucpro.pipeline.classifier import ClassifierCheckpointError, MLPClassifier, load_classifier, predict_scores


def test_two_processes_creating_the_tiny_models_at_once_both_get_a_complete_set(tmp_path):
    target = tmp_path / "shared"
    code = "import sys; from virnucpro.backends.tiny import ensure_tiny_models; ensure_tiny_models(sys.argv[1])"
    processes = [
        subprocess.Popen([sys.executable, "-c", code, str(target)], stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    assert not [path for path in target.rglob(".*") if path.name.endswith(".tmp")]
    models = ensure_tiny_models(target)
    DnabertBackend(models.dnabert_dir)
    EsmBackend(models.esm_path)


# The class as the training script defines it, saved the way it saved the published models.
TRAINING_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import torch.nn.functional as F
    from torch import nn

    class MLPClassifier(nn.Module):
        def __init__(self, input_dim, hidden_dim, num_class):
            super(MLPClassifier, self).__init__()
            self.hidden_layer = nn.Linear(input_dim, hidden_dim)
            self.bn1 = nn.BatchNorm1d(hidden_dim)
            self.output_layer = nn.Linear(hidden_dim, num_class)
            self.dropout = nn.Dropout(0.5)
            self.init_weights()

        def init_weights(self):
            nn.init.xavier_uniform_(self.hidden_layer.weight)
            nn.init.xavier_uniform_(self.output_layer.weight)

        def forward(self, x):
            x = self.hidden_layer(x)
            x = self.bn1(x)
            x = F.relu(x)
            x = self.dropout(x)
            x = self.output_layer(x)
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 2)

    torch.manual_seed(0)
    model = MLPClassifier(3328, 512, 2)
    model.bn1.running_mean.uniform_(-0.5, 0.5)
    model.bn1.running_var.uniform_(0.5, 2.0)
    model.eval()
    torch.save(model, sys.argv[1] + "/500_model.pth")
    features = torch.randn(5, 3328)
    with torch.no_grad():
        scores = F.softmax(model(features), dim=1)
    torch.save({"features": features, "scores": scores}, sys.argv[1] + "/expected.pt")
    torch.save(Net(), sys.argv[1] + "/other_model.pth")
    """
)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("published")
    script = directory / "train.py"
    script.write_text(TRAINING_SCRIPT)
    subprocess.run([sys.executable, str(script), str(directory)], check=True)
    return directory


def test_a_whole_module_pickled_from_a_training_scripts_main_loads_and_scores_the_same(published):
    model = load_classifier(published / "500_model.pth")
    assert isinstance(model, MLPClassifier)
    assert not model.training
    expected = torch.load(published / "expected.pt")
    assert torch.allclose(predict_scores(model, expected["features"]), expected["scores"], atol=1e-6)


def test_a_module_of_another_class_in_main_is_not_taken_for_the_classifier(published):
    with pytest.raises(ClassifierCheckpointError, match=r"other_model\.pth: .*__main__\.Net"):
        load_classifier(published / "other_model.pth")
