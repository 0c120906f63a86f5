"""Which model files a worker loads for each stage, from its options (--models, --dnabert-model, --esm-model)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virnucpro.backends.common import ModelFormatError, ModelNotFoundError

if TYPE_CHECKING:
    from virnucpro.worker import WorkerConfig


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


def load_backends(config: "WorkerConfig") -> dict[str, Any]:
    """Load the backend of every stage the worker serves, once."""
    from virnucpro.worker import WorkerSetupError

    backends: dict[str, Any] = {}
    stage = "model"
    try:
        paths = model_paths(config.models, config.dnabert_model, config.esm_model)
        for stage in config.stages:
            if stage == "dnabert":
                from virnucpro.backends.dnabert import DnabertBackend

                backends[stage] = DnabertBackend(paths["dnabert"], device=config.device)
            elif stage == "esm":
                from virnucpro.backends.esm import EsmBackend

                backends[stage] = EsmBackend(paths["esm"], device=config.device)
    except (ModelNotFoundError, ModelFormatError) as exc:
        raise WorkerSetupError(str(exc)) from None
    except ImportError as exc:
        raise WorkerSetupError(
            f"the {stage} backend needs {exc.name or 'a package'} ({exc}); install the models extra: "
            "pip install 'virnucpro[models]'"
        ) from None
    except RuntimeError as exc:  # torch: a device that does not exist or is not usable
        raise WorkerSetupError(f"cannot load models on {config.device}: {exc}") from None
    return backends
