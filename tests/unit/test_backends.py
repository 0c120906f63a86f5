"""Embedding backends: batching, OOM halving, cancellation, and the real loaders on the tiny checkpoints."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from virnucpro.backends.common import (
    ModelFormatError,
    ModelNotFoundError,
    PrecisionError,
    autocast,
    embed_in_batches,
    plan_batches,
    resolve_precision,
)
from virnucpro.backends.dnabert import DnabertBackend
from virnucpro.backends.esm import EsmBackend
from virnucpro.backends.interface import Cancelled
from virnucpro.backends.tiny import (
    DNABERT_HIDDEN,
    ESM_DIM,
    ESM_LAYERS,
    build_tiny_dnabert,
    build_tiny_esm,
    build_tiny_tokenizer,
    ensure_tiny_models,
)
from virnucpro.pipeline.fasta import FastaError
from virnucpro.pipeline.features import load_features

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def write_records(path: Path, sequences: Sequence[str], prefix: str = "r") -> Path:
    with open(path, "w") as handle:
        for n, sequence in enumerate(sequences):
            handle.write(f">{prefix}{n} some description\n{sequence}\n")
    return path


def features(path: Path) -> torch.Tensor:
    return load_features(path).data


def random_sequences(alphabet: str, lengths: Sequence[int], seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(length)) for length in lengths]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def dnabert(tiny):
    return DnabertBackend(tiny.dnabert_dir)


@pytest.fixture(scope="module")
def esm_backend(tiny):
    return EsmBackend(tiny.esm_path)


# Lengths out of order, so length sorting reorders them and batches need padding.
DNA_LENGTHS = [150, 37, 301, 90, 150, 5, 222, 61]
PROTEIN_LENGTHS = [50, 12, 99, 3, 50, 71, 1, 33]


# ---------------------------------------------------------------- batching


def test_plan_batches_keep_each_padded_batch_within_the_token_budget():
    lengths = [5, 40, 12, 33, 33, 7, 90, 1, 18, 60]
    batches = plan_batches(lengths, token_budget=100)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 100


def test_plan_batches_run_longest_sequences_first():
    lengths = [5, 40, 12, 90]
    order = [i for batch in plan_batches(lengths, token_budget=1000) for i in batch]
    assert order == [3, 1, 2, 0]


def test_a_sequence_longer_than_the_budget_gets_a_batch_of_its_own():
    batches = plan_batches([10, 500, 10], token_budget=100)
    assert [1] in batches
    assert sorted(i for batch in batches for i in batch) == [0, 1, 2]


def test_embed_in_batches_returns_rows_in_input_order():
    lengths = [3, 9, 1, 7, 5]
    features = embed_in_batches(lengths, 12, lambda batch: torch.tensor([[float(i)] for i in batch]))
    assert features[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_out_of_memory_halves_the_batch_and_retries_until_it_fits():
    calls: list[int] = []

    def embed(batch: list[int]) -> torch.Tensor:
        calls.append(len(batch))
        if len(batch) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return torch.tensor([[float(i)] for i in batch])

    features = embed_in_batches([10] * 16, token_budget=160, embed_batch=embed)
    assert features[:, 0].tolist() == [float(i) for i in range(16)]
    assert calls[:3] == [16, 8, 4]  # halved on each failure
    assert max(calls[3:]) <= 2  # the reduced size is kept for the rest of the file


def test_out_of_memory_on_a_single_sequence_is_raised():
    def embed(batch: list[int]) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        embed_in_batches([10, 10], token_budget=20, embed_batch=embed)


def test_cancellation_is_checked_before_every_batch():
    embedded: list[list[int]] = []
    asked = iter([False, False, True])

    def embed(batch: list[int]) -> torch.Tensor:
        embedded.append(batch)
        return torch.zeros(len(batch), 1)

    with pytest.raises(Cancelled):
        embed_in_batches([4] * 6, token_budget=4, embed_batch=embed, should_stop=lambda: next(asked))
    assert len(embedded) == 2


def test_cpu_runs_in_full_precision_by_default():
    assert resolve_precision(torch.device("cpu")) == "fp32"
    with autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")


def fake_gpu(monkeypatch, native_bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-PCIE-16GB")


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_a_gpu_defaults_to_bf16_only_where_it_has_it_natively(monkeypatch, native, expected):
    fake_gpu(monkeypatch, native)
    assert resolve_precision(torch.device("cuda:0")) == expected


def test_fp32_can_be_chosen_on_a_gpu_with_native_bf16(monkeypatch):
    fake_gpu(monkeypatch, True)
    assert resolve_precision(torch.device("cuda:0"), "fp32") == "fp32"


def test_bf16_on_a_gpu_without_it_is_refused_naming_the_gpu_and_the_option(monkeypatch):
    fake_gpu(monkeypatch, False)
    with pytest.raises(PrecisionError, match=r"Tesla V100-PCIE-16GB\) has no native bf16; pass --precision fp32"):
        resolve_precision(torch.device("cuda:0"), "bf16")


def test_bf16_autocasts_the_forward_pass():
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.nn.functional.linear(torch.ones(1, 4), torch.ones(2, 4)).dtype == torch.bfloat16


# ---------------------------------------------------------------- tiny models


def test_tiny_models_are_the_same_bytes_on_every_build(tiny, tmp_path):
    again = ensure_tiny_models(tmp_path / "again")
    for original, rebuilt in [
        (tiny.esm_path, again.esm_path),
        (tiny.classifier_path, again.classifier_path),
        *[(tiny.dnabert_dir / name, again.dnabert_dir / name) for name in os.listdir(tiny.dnabert_dir)],
    ]:
        assert original.read_bytes() == rebuilt.read_bytes(), original.name


def test_ensure_tiny_models_leaves_an_existing_set_untouched(tiny):
    files = [tiny.esm_path, tiny.classifier_path, *tiny.dnabert_dir.iterdir()]
    before = {path: path.stat().st_mtime_ns for path in files}
    assert ensure_tiny_models(tiny.esm_path.parent) == tiny
    assert {path: path.stat().st_mtime_ns for path in files} == before




# ---------------------------------------------------------------- DNABERT-S


def test_dnabert_backend_matches_the_in_memory_model_fed_one_sequence_at_a_time(dnabert, tmp_path):
    sequences = random_sequences("ACGT", DNA_LENGTHS, seed=1)
    fasta = write_records(tmp_path / "output_1.fa", sequences)
    assert dnabert.run(fasta, tmp_path / "out.pt") == (len(sequences), sum(DNA_LENGTHS))
    # The original recipe: no padding, no mask, plain mean over [CLS] ... [SEP].
    model, tokenizer = build_tiny_dnabert(), build_tiny_tokenizer()
    for sequence, row in zip(sequences, features(tmp_path / "out.pt"), strict=True):
        with torch.inference_mode():
            hidden = model(torch.tensor([tokenizer.encode(sequence).ids]))[0]
        assert torch.allclose(row, hidden.mean(dim=1)[0], atol=1e-5)


def test_dnabert_padded_batches_give_the_same_numbers_as_unpadded(tiny, tmp_path):
    fasta = write_records(tmp_path / "n.fa", random_sequences("ACGT", DNA_LENGTHS, seed=2))
    DnabertBackend(tiny.dnabert_dir, token_budget=1).run(fasta, tmp_path / "alone.pt")
    DnabertBackend(tiny.dnabert_dir, token_budget=100_000).run(fasta, tmp_path / "padded.pt")
    assert torch.allclose(features(tmp_path / "alone.pt"), features(tmp_path / "padded.pt"), atol=1e-5)


def test_dnabert_output_holds_the_ids_and_one_contiguous_float32_array(dnabert, tmp_path):
    fasta = write_records(tmp_path / "n.fa", random_sequences("ACGT", DNA_LENGTHS, seed=3), prefix="read")
    dnabert.run(fasta, tmp_path / "out.pt")
    assert set(torch.load(tmp_path / "out.pt")) == {"stage", "precision", "ids", "data"}
    output = load_features(tmp_path / "out.pt")
    assert (output.stage, output.precision) == ("dnabert", "fp32")
    assert output.ids == [f"read{n}" for n in range(len(DNA_LENGTHS))]  # ids: first word, input order
    data = torch.load(tmp_path / "out.pt")["data"]
    assert data.shape == (len(DNA_LENGTHS), DNABERT_HIDDEN) and data.dtype == torch.float32
    assert data.is_contiguous() and data.untyped_storage().nbytes() == data.numel() * 4


def test_dnabert_survives_a_fake_out_of_memory_with_the_same_result(tiny, tmp_path, monkeypatch):
    fasta = write_records(tmp_path / "n.fa", random_sequences("ACGT", DNA_LENGTHS, seed=4))
    backend = DnabertBackend(tiny.dnabert_dir)
    backend.run(fasta, tmp_path / "plain.pt")
    real_embed = backend._embed

    def embed_or_oom(batch):
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return real_embed(batch)

    monkeypatch.setattr(backend, "_embed", embed_or_oom)
    backend.run(fasta, tmp_path / "halved.pt")
    assert load_features(tmp_path / "plain.pt").ids == load_features(tmp_path / "halved.pt").ids
    assert torch.allclose(features(tmp_path / "plain.pt"), features(tmp_path / "halved.pt"), atol=1e-5)


def test_a_cancelled_dnabert_run_raises_and_writes_nothing(tiny, tmp_path):
    fasta = write_records(tmp_path / "n.fa", random_sequences("ACGT", DNA_LENGTHS, seed=5))
    backend = DnabertBackend(tiny.dnabert_dir, token_budget=200)
    asked = iter([False, True])
    with pytest.raises(Cancelled):
        backend.run(fasta, tmp_path / "out.pt", should_stop=lambda: next(asked, True))
    assert not (tmp_path / "out.pt").exists()


def test_dnabert_model_name_absent_from_the_cache_names_the_model_and_the_option(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=r"zhihan1996/DNABERT-S.*--dnabert-model PATH"):
        DnabertBackend("zhihan1996/DNABERT-S")


# ---------------------------------------------------------------- ESM-2


def esm_reference(sequence: str, model, alphabet) -> torch.Tensor:
    """The original recipe for one protein, unpadded: last layer, positions 1..min(1024, length)."""
    _, _, tokens = alphabet.get_batch_converter()([("", sequence)])
    with torch.inference_mode():
        representations = model(tokens, repr_layers=[ESM_LAYERS])["representations"][ESM_LAYERS]
    return representations[0, 1 : min(1024, len(sequence)) + 1].mean(dim=0)


def test_esm_backend_matches_the_in_memory_model_fed_one_protein_at_a_time(esm_backend, tmp_path):
    proteins = random_sequences(AMINO_ACIDS, PROTEIN_LENGTHS, seed=6)
    fasta = write_records(tmp_path / "output_1.fa", proteins)
    assert esm_backend.run(fasta, tmp_path / "out.pt") == (len(proteins), sum(PROTEIN_LENGTHS))
    model = build_tiny_esm()
    for protein, feature in zip(proteins, features(tmp_path / "out.pt"), strict=True):
        assert torch.allclose(feature, esm_reference(protein, model, model.alphabet), atol=1e-5)


def test_esm_output_holds_the_ids_in_input_order_and_one_float32_array(esm_backend, tmp_path):
    fasta = write_records(tmp_path / "p.fa", random_sequences(AMINO_ACIDS, PROTEIN_LENGTHS, seed=7), prefix="orf")
    assert [i for b in plan_batches([n + 2 for n in PROTEIN_LENGTHS], 2048) for i in b] != list(range(8))
    esm_backend.run(fasta, tmp_path / "out.pt")
    output = load_features(tmp_path / "out.pt", "esm")
    assert output.ids == [f"orf{n}" for n in range(len(PROTEIN_LENGTHS))]
    assert output.data.shape == (len(PROTEIN_LENGTHS), ESM_DIM) and output.data.dtype == torch.float32


def test_esm_padded_batches_give_the_same_numbers_as_unpadded(tiny, tmp_path):
    fasta = write_records(tmp_path / "p.fa", random_sequences(AMINO_ACIDS, PROTEIN_LENGTHS, seed=8))
    EsmBackend(tiny.esm_path, token_budget=1).run(fasta, tmp_path / "alone.pt")
    EsmBackend(tiny.esm_path, token_budget=100_000).run(fasta, tmp_path / "padded.pt")
    assert torch.allclose(features(tmp_path / "alone.pt"), features(tmp_path / "padded.pt"), atol=1e-5)


def test_esm_averages_the_first_1024_residues_of_a_longer_protein_seen_whole(esm_backend, tmp_path):
    protein = random_sequences(AMINO_ACIDS, [1100], seed=9)[0]
    esm_backend.run(write_records(tmp_path / "long.fa", [protein]), tmp_path / "out.pt")
    model = build_tiny_esm()
    feature = features(tmp_path / "out.pt")[0]
    assert torch.allclose(feature, esm_reference(protein, model, model.alphabet), atol=1e-5)


def test_esm_survives_a_fake_out_of_memory_with_the_same_result(tiny, tmp_path, monkeypatch):
    fasta = write_records(tmp_path / "p.fa", random_sequences(AMINO_ACIDS, PROTEIN_LENGTHS, seed=10))
    backend = EsmBackend(tiny.esm_path)
    backend.run(fasta, tmp_path / "plain.pt")
    real_embed = backend._embed

    def embed_or_oom(batch):
        if len(batch) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return real_embed(batch)

    monkeypatch.setattr(backend, "_embed", embed_or_oom)
    backend.run(fasta, tmp_path / "halved.pt")
    assert torch.allclose(features(tmp_path / "plain.pt"), features(tmp_path / "halved.pt"), atol=1e-5)


def test_a_cancelled_esm_run_raises_and_writes_nothing(esm_backend, tmp_path):
    fasta = write_records(tmp_path / "p.fa", random_sequences(AMINO_ACIDS, PROTEIN_LENGTHS, seed=11))
    with pytest.raises(Cancelled):
        esm_backend.run(fasta, tmp_path / "out.pt", should_stop=lambda: True)
    assert not (tmp_path / "out.pt").exists()


def test_a_protein_with_a_residue_outside_the_alphabet_is_named(esm_backend, tmp_path):
    fasta = write_records(tmp_path / "p.fa", ["MKV", "MK*V"])
    with pytest.raises(FastaError, match=r"p\.fa: protein r1 holds '\*'"):
        esm_backend.run(fasta, tmp_path / "out.pt")


def test_esm_model_name_is_looked_up_in_the_torch_hub_checkpoints(tiny, tmp_path, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    shutil.copy(tiny.esm_path, checkpoints)
    shutil.copy(tiny.esm_path.with_name("esm2_t2_tiny-contact-regression.pt"), checkpoints)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert EsmBackend("esm2_t2_tiny").layer == ESM_LAYERS


def test_esm_model_name_absent_from_the_hub_directory_names_the_model_and_the_option(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=r"esm2_t36_3B_UR50D.*--esm-model PATH"):
        EsmBackend("esm2_t36_3B_UR50D")


def test_esm_checkpoint_without_its_contact_regression_file_says_which_file_is_missing(tiny, tmp_path):
    shutil.copy(tiny.esm_path, tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"esm2_t2_tiny-contact-regression\.pt: missing"):
        EsmBackend(tmp_path / "esm2_t2_tiny.pt")


def test_esm_checkpoint_whose_name_does_not_start_with_esm2_is_refused(tiny, tmp_path):
    shutil.copy(tiny.esm_path, tmp_path / "protein_model.pt")
    with pytest.raises(ModelFormatError, match=r"protein_model\.pt: .*starts with 'esm2'"):
        EsmBackend(tmp_path / "protein_model.pt")


# ---------------------------------------------------------------- precision and the shared run


@pytest.mark.parametrize("backend_class, alphabet, lengths", [
    (DnabertBackend, "ACGT", DNA_LENGTHS), (EsmBackend, AMINO_ACIDS, PROTEIN_LENGTHS)])
def test_bf16_features_stay_close_to_fp32_ones_and_the_file_says_bf16(tiny, tmp_path, backend_class, alphabet,
                                                                      lengths):
    model = tiny.dnabert_dir if backend_class is DnabertBackend else tiny.esm_path
    fasta = write_records(tmp_path / "in.fa", random_sequences(alphabet, lengths, seed=12))
    backend_class(model, precision="fp32").run(fasta, tmp_path / "fp32.pt")
    backend_class(model, precision="bf16").run(fasta, tmp_path / "bf16.pt")
    full, half = load_features(tmp_path / "fp32.pt"), load_features(tmp_path / "bf16.pt")
    assert (full.precision, half.precision) == ("fp32", "bf16")
    assert not torch.equal(full.data, half.data)
    assert torch.nn.functional.cosine_similarity(full.data, half.data, dim=1).min() > 0.99


def test_an_input_without_records_gives_an_empty_array_of_the_model_width(esm_backend, tmp_path):
    (tmp_path / "empty.fa").write_text("")
    assert esm_backend.run(tmp_path / "empty.fa", tmp_path / "out.pt") == (0, 0)
    assert load_features(tmp_path / "out.pt").data.shape == (0, ESM_DIM)


def test_an_empty_nucleotide_sequence_is_named(dnabert, tmp_path):
    fasta = write_records(tmp_path / "n.fa", ["ACGT", ""])
    with pytest.raises(FastaError, match=r"n\.fa: sequence r1 is empty"):
        dnabert.run(fasta, tmp_path / "out.pt")
