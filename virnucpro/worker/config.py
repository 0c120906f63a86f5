"""What a worker is asked to be: its options, its device name, the backends it loads, and its setup errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from virnucpro.backends.interface import Backend, PairBackend
from virnucpro.stages import MODEL_STAGES

# `virnucpro worker` exits with this (sysexits' EX_CONFIG) when it cannot start, so that whoever
# restarts workers (virnucpro.worker.supervisor) knows that starting it again would fail the same way.
SETUP_ERROR_EXIT = 78
INSTALL_MODELS = "pip install 'virnucpro[models]'"


class WorkerSetupError(RuntimeError):
    """The worker cannot start (a model that does not load, a bad device); says what to fix."""


@dataclass
class WorkerConfig:
    broker: str
    device: str = "cpu"
    name: str | None = None
    gpu_name: str | None = None
    synthetic_speed: float | None = None
    synthetic_change: tuple[float, float] | None = None  # (seconds after the first file starts, new speed)
    stages: tuple[str, ...] = MODEL_STAGES
    models: str = "virnucpro"
    dnabert_model: str | None = None
    esm_model: str | None = None
    precision: str | None = None  # None: bf16 where the GPU has it natively, fp32 elsewhere
    broker_timeout: float = 10.0
    insecure: bool = False  # talk to an --insecure broker in the clear, with no key
    options: dict[str, Any] = field(default_factory=dict)


def device_name(config: WorkerConfig) -> str:
    """The GPU name the broker looks the weight up by."""
    if config.gpu_name:
        return config.gpu_name
    if config.synthetic_speed is not None:
        return "synthetic"
    if config.device.startswith("cuda"):
        import torch

        index = int(config.device.split(":", 1)[1]) if ":" in config.device else 0
        return torch.cuda.get_device_name(index)
    return "cpu"


def open_backends(config: WorkerConfig) -> dict[str, Backend | PairBackend]:
    """Load every backend this worker serves; WorkerSetupError says why one cannot load."""
    if config.synthetic_speed is not None:
        from virnucpro.backends.synthetic import SyntheticBackend

        return {"synthetic": SyntheticBackend(config.synthetic_speed, config.synthetic_change)}
    if config.synthetic_change is not None:
        raise WorkerSetupError("--synthetic-speed-change applies to a synthetic worker: give --synthetic-speed R too")
    if "synthetic" in config.stages:
        raise WorkerSetupError("the synthetic stage needs --synthetic-speed R (residues per second)")
    try:
        from virnucpro.backends.common import ModelFormatError, ModelNotFoundError, PrecisionError
        from virnucpro.backends.loading import load_backends
    except ImportError as exc:
        raise WorkerSetupError(_missing_extra(exc)) from None
    try:
        return load_backends(config.stages, config.device, config.models, config.dnabert_model, config.esm_model,
                             config.precision)
    except (ModelNotFoundError, ModelFormatError, PrecisionError) as exc:
        raise WorkerSetupError(str(exc)) from None
    except ImportError as exc:
        raise WorkerSetupError(_missing_extra(exc)) from None
    except RuntimeError as exc:  # torch: a device that does not exist or is not usable
        raise WorkerSetupError(f"cannot load models on {config.device}: {exc}") from None


def _missing_extra(exc: ImportError) -> str:
    return f"the model stages need {exc.name or 'a package'} ({exc}); install the models extra: {INSTALL_MODELS}"
