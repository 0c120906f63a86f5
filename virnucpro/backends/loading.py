"""Which model files a worker loads for each stage, from its options (--models, --dnabert-model, --esm-model)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from virnucpro.backends.interface import Backend, PairBackend


def tiny_models_dir() -> Path:
    """Where the `--models tiny` checkpoints are materialised ($XDG_CACHE_HOME or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "virnucpro" / "tiny-models"


def model_paths(models: str, dnabert_model: str | None, esm_model: str | None) -> dict[str, Any]:
    """The DNABERT-S, ESM-2 and classifier locations for a model set; explicit paths win."""
    from virnucpro.backends.dnabert import DNABERT_S_MODEL
    from virnucpro.backends.esm import ESM2_3B_MODEL

    if models == "tiny":
        from virnucpro.backends.tiny import ensure_tiny_models

        tiny = ensure_tiny_models(tiny_models_dir())
        return {"dnabert": dnabert_model or tiny.dnabert_dir, "esm": esm_model or tiny.esm_path,
                "classifier": tiny.classifier_path}
    return {"dnabert": dnabert_model or DNABERT_S_MODEL, "esm": esm_model or ESM2_3B_MODEL, "classifier": None}


def load_backends(
    stages: tuple[str, ...], device: str, models: str = "virnucpro",
    dnabert_model: str | None = None, esm_model: str | None = None, precision: str | None = None,
) -> dict[str, Backend | PairBackend]:
    """Load the backend of every stage in `stages` onto `device`, once, to run in `precision`.

    Raises ModelNotFoundError or ModelFormatError for a model that is not
    there or not in its format, ImportError when the models extra is
    missing, PrecisionError for a precision the device lacks, and
    RuntimeError for a device torch cannot use. `precision` None is bf16
    where the GPU has it natively, fp32 elsewhere. Classify loads nothing
    now: each job names its classifier, loaded on its first task.
    """
    backends: dict[str, Backend | PairBackend] = {}
    paths = model_paths(models, dnabert_model, esm_model)
    for stage in stages:
        if stage == "dnabert":
            from virnucpro.backends.dnabert import DnabertBackend

            backends[stage] = DnabertBackend(paths["dnabert"], device=device, precision=precision)
        elif stage == "esm":
            from virnucpro.backends.esm import EsmBackend

            backends[stage] = EsmBackend(paths["esm"], device=device, precision=precision)
        elif stage == "classify":
            from virnucpro.backends.classify import ClassifyBackend

            backends[stage] = ClassifyBackend()
    return backends
