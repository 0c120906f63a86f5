"""What `virnucpro predict` was asked to do, and the checks on it before anything is read or started."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from virnucpro.pipeline.gpu_weights import WeightFileError, load_weight_table
from virnucpro.pipeline.sequences import EXPECTED_LENGTHS


class PredictError(RuntimeError):
    """The run cannot go on; the message names the file or option and what to do."""


@dataclass
class PredictOptions:
    """What `virnucpro predict` was asked to do."""

    input_fasta: Path
    output_dir: Path
    expected_length: int = 500
    model_path: Path | None = None
    models: str = "virnucpro"
    dnabert_model: str | None = None
    esm_model: str | None = None
    weighted: bool = False
    steal: bool = False
    backup: bool = True  # with steal: backup copies of straggling files
    broker: str | None = None
    gpus: tuple[int, ...] | None = None
    workers: int | None = None
    gpu_weights: Path | None = None
    throughput_log: Path | None = None
    worker_timeout: float | None = None
    sequences_per_file: int | None = None
    resume: bool = False
    timeout: float = 600.0
    rename_duplicates: bool = False
    precision: str | None = None  # None: bf16 where the GPU has it natively, fp32 elsewhere
    keep_features: bool = False
    transfer: str = "auto"
    transfer_address: str | None = None
    insecure: bool = False  # no keys: a given broker started with --insecure, or such a broker and workers here


def check_options(options: PredictOptions) -> None:
    """Reject contradictory options before anything is read or started."""
    if options.expected_length not in EXPECTED_LENGTHS:
        raise PredictError(f"--expected-length {options.expected_length}: must be 300 or 500, the chunk lengths "
                           "the published classifiers were trained on")
    if options.broker is not None:
        local_only = {"--gpus": options.gpus, "--workers": options.workers, "--gpu-weights": options.gpu_weights,
                      "--throughput-log": options.throughput_log, "--worker-timeout": options.worker_timeout,
                      "--dnabert-model": options.dnabert_model, "--esm-model": options.esm_model,
                      "--precision": options.precision}
        given = [name for name, value in local_only.items() if value is not None]
        if given:
            raise PredictError(f"{', '.join(given)} configure the broker and workers this command starts; with "
                               "--broker ADDR set them where that broker and its workers run")
    if options.gpus is not None and options.workers is not None:
        raise PredictError("give --gpus (one worker per GPU) or --workers N (CPU workers), not both")
    if options.gpu_weights is not None:
        try:
            load_weight_table(options.gpu_weights)
        except WeightFileError as exc:
            raise PredictError(str(exc)) from None
    path = options.input_fasta
    if not path.exists():
        raise PredictError(f"{path}: file not found; check the path of the input FASTA")
    if not path.is_file():
        raise PredictError(f"{path}: is not a file; give the input FASTA")
