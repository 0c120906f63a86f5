"""--precision from the command line to the backends: passed to the workers predict starts, checked up front."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from virnucpro.backends.loading import load_backends
from virnucpro.backends.tiny import ensure_tiny_models
from virnucpro.client.options import PredictError, PredictOptions, check_options
from virnucpro.client.session import check_precision, worker_options
from virnucpro.worker.config import WorkerConfig, WorkerSetupError, open_backends


def options(tmp_path: Path, **given: object) -> PredictOptions:
    (tmp_path / "reads.fa").write_text(">r1\nATGAAACCC\n")
    return PredictOptions(input_fasta=tmp_path / "reads.fa", output_dir=tmp_path / "out", **given)


def no_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-PCIE-16GB")


def test_the_workers_predict_starts_get_its_precision(tmp_path):
    assert worker_options(options(tmp_path, models="tiny", precision="fp32"))[-2:] == ["--precision", "fp32"]
    assert "--precision" not in worker_options(options(tmp_path, models="tiny"))


def test_bf16_for_a_local_gpu_without_it_stops_predict_before_any_worker_starts(tmp_path, monkeypatch):
    no_native_bf16(monkeypatch)
    with pytest.raises(PredictError, match=r"--precision bf16: cuda:0 \(Tesla V100-PCIE-16GB\) has no native bf16"):
        check_precision(options(tmp_path, precision="bf16"), ["cuda:0", "cuda:0"])
    check_precision(options(tmp_path, precision="fp32"), ["cuda:0"])
    check_precision(options(tmp_path, precision="bf16"), ["cpu"])  # torch's CPU autocast


def test_precision_is_set_where_the_workers_run_when_predict_uses_a_running_broker(tmp_path):
    with pytest.raises(PredictError, match=r"--precision configure the broker and workers this command starts"):
        check_options(options(tmp_path, broker="tcp://127.0.0.1:9", precision="fp32"))


def test_a_worker_loads_its_backends_in_the_precision_it_is_given(tmp_path):
    tiny = ensure_tiny_models(tmp_path / "tiny")
    backends = load_backends(("esm",), "cpu", esm_model=str(tiny.esm_path), precision="bf16")
    assert backends["esm"].precision == "bf16"


def test_a_worker_asked_for_bf16_on_a_gpu_without_it_says_so_at_setup(tmp_path, monkeypatch):
    no_native_bf16(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    # The precision is checked before any model is looked for.
    config = WorkerConfig(broker="tcp://127.0.0.1:9", device="cuda:0", stages=("esm",), esm_model="absent.pt",
                          precision="bf16")
    with pytest.raises(WorkerSetupError, match=r"has no native bf16; pass --precision fp32"):
        open_backends(config)
