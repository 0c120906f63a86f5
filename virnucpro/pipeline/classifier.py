"""The VirNucPro classifier: the published MLP, its whole-module checkpoints, and its scores."""

from __future__ import annotations

import contextlib
import hashlib
import io
import pickle
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INPUT_DIM = 3328  # DNABERT-S 768 + ESM-2 3B 2560
HIDDEN_DIM = 512
NUM_CLASS = 2
LABELS = ("others", "virus")  # class 0 = score1, class 1 = score2
# What torch.load raises for a file that is not a pickled module it can rebuild.
LOAD_ERRORS = (
    pickle.UnpicklingError, zipfile.BadZipFile, EOFError, AttributeError, ImportError, RuntimeError, KeyError
)


class ClassifierCheckpointError(ValueError):
    """A file that is not a VirNucPro classifier checkpoint; the message names the file and the fix."""


class MLPClassifier(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Dropout(0.5) -> Linear.

    Class and attribute names are those of the training script, where the
    published checkpoints were pickled as `__main__.MLPClassifier`.
    """

    def __init__(
        self, input_dim: int = INPUT_DIM, hidden_dim: int = HIDDEN_DIM, num_class: int = NUM_CLASS
    ) -> None:
        super().__init__()
        self.hidden_layer = nn.Linear(input_dim, hidden_dim)
        self.bn1 = nn.BatchNorm1d(hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, num_class)
        self.dropout = nn.Dropout(0.5)
        nn.init.xavier_uniform_(self.hidden_layer.weight)
        nn.init.xavier_uniform_(self.output_layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hidden_layer(x)
        x = self.bn1(x)
        x = F.relu(x)
        x = self.dropout(x)
        return self.output_layer(x)

    @property
    def input_dim(self) -> int:
        return self.hidden_layer.in_features


class _MainUnpickler(pickle.Unpickler):
    """Resolves the training script's `__main__.MLPClassifier` to this module's class, and nothing else there."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "__main__":
            if name == MLPClassifier.__name__:
                return MLPClassifier
            raise pickle.UnpicklingError(f"the checkpoint pickles __main__.{name}, not __main__.MLPClassifier")
        return super().find_class(module, name)


# torch.load takes the pickle module to use and needs its `load` and `Unpickler`; only the latter differs.
_pickle_with_main = types.ModuleType("virnucpro_classifier_pickle")
_pickle_with_main.load = pickle.load  # type: ignore[attr-defined]
_pickle_with_main.Unpickler = _MainUnpickler  # type: ignore[attr-defined]


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> MLPClassifier:
    """A published `300_model.pth` / `500_model.pth` (or the tiny one), in eval mode on `device`.

    These checkpoints are whole pickled modules, so loading one runs pickle:
    load only checkpoints from a source you trust. Raises
    ClassifierCheckpointError naming the file when it holds anything else.
    """
    return load_classifier_with_digest(path, device=device)[0]


def load_classifier_with_digest(path: str | Path, expected_sha256: str | None = None,
                                device: str | torch.device = "cpu") -> tuple[MLPClassifier, str]:
    """The classifier at `path` (as load_classifier) and the SHA-256 of its checkpoint's bytes.

    The digest is of the very bytes loaded, read once. With
    `expected_sha256`, a checkpoint with another digest is refused
    (ClassifierCheckpointError): the file changed since the digest was taken,
    or another file lies at that path.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ClassifierCheckpointError(
            f"{path}: no such classifier checkpoint; pass the path of 300_model.pth or 500_model.pth"
        ) from None
    except OSError as exc:
        raise ClassifierCheckpointError(f"{path}: the classifier checkpoint cannot be read ({exc.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise ClassifierCheckpointError(
            f"{path}: the classifier checkpoint has SHA-256 {digest}, not {expected_sha256} as submitted; it changed "
            "since, or this machine holds another file at that path"
        )
    return _load_checkpoint(path, data).to(device).eval(), digest


def _load_checkpoint(path: Path, data: bytes) -> MLPClassifier:
    try:
        model = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=_pickle_with_main)
    except LOAD_ERRORS as exc:
        raise ClassifierCheckpointError(
            f"{path}: not a VirNucPro classifier checkpoint ({type(exc).__name__}: {exc}); "
            "pass 300_model.pth or 500_model.pth as published"
        ) from None
    if not isinstance(model, MLPClassifier):
        raise ClassifierCheckpointError(
            f"{path}: holds a {type(model).__module__}.{type(model).__qualname__}, not a pickled "
            "VirNucPro MLPClassifier; pass 300_model.pth or 500_model.pth as published"
        )
    if model.output_layer.out_features != NUM_CLASS:
        raise ClassifierCheckpointError(
            f"{path}: the classifier has {model.output_layer.out_features} outputs, VirNucPro's has {NUM_CLASS}"
        )
    return model


@contextlib.contextmanager
def _pickled_as_main() -> Iterator[None]:
    """While open, MLPClassifier pickles as `__main__.MLPClassifier`, as the training script wrote it.

    Pickle stores a class by its __module__ and checks that the name resolves
    to the same object there, so the class is both renamed and registered in
    __main__ for the duration, then put back.
    """
    main = sys.modules["__main__"]
    missing = object()
    previous = main.__dict__.get(MLPClassifier.__name__, missing)
    MLPClassifier.__module__ = "__main__"
    setattr(main, MLPClassifier.__name__, MLPClassifier)
    try:
        yield
    finally:
        MLPClassifier.__module__ = __name__
        if previous is missing:
            delattr(main, MLPClassifier.__name__)
        else:
            setattr(main, MLPClassifier.__name__, previous)


def classifier_bytes(model: MLPClassifier) -> bytes:
    """`model` serialised in the published whole-module format (class pickled from `__main__`)."""
    buffer = io.BytesIO()
    with _pickled_as_main():
        torch.save(model, buffer)
    return buffer.getvalue()


def predict_scores(model: MLPClassifier, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Softmax scores, float32 [N, 2] on the CPU: column 0 = score1 = P(others), column 1 = score2 = P(virus)."""
    if features.ndim != 2 or features.shape[1] != model.input_dim:
        raise ValueError(
            f"features have shape {tuple(features.shape)} but the classifier takes {model.input_dim} columns; "
            "use the classifier that matches the embedding models"
        )
    device = next(model.parameters()).device
    scores = []
    with torch.inference_mode():
        for start in range(0, features.shape[0], batch_size):
            logits = model(features[start : start + batch_size].to(device=device, dtype=torch.float32))
            scores.append(F.softmax(logits.to(torch.float32), dim=1).cpu())
    return torch.cat(scores) if scores else torch.empty(0, NUM_CLASS)


def label_for(score1: float, score2: float) -> str:
    """`virus` when P(virus) is strictly higher; a tie goes to `others`, as argmax picks the first class."""
    return LABELS[1] if score2 > score1 else LABELS[0]
