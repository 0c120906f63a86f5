"""ESM-2 embedding of protein FASTA files: last-layer mean over the residues, as the original VirNucPro."""

from __future__ import annotations

import argparse
import logging
import pickle
import zipfile
from pathlib import Path

import torch

from virnucpro.backends.common import EmbedBatch, EmbeddingBackend, ModelFormatError, ModelNotFoundError
from virnucpro.pipeline.fasta import FastaError

logger = logging.getLogger(__name__)

ESM2_3B_MODEL = "esm2_t36_3B_UR50D"
DEFAULT_TOKEN_BUDGET = 2048
# The original averages residue positions 1..min(1024, length) (its truncation_seq_length) and,
# calling fair-esm's batch converter without a limit, feeds longer proteins whole.
MEAN_POSITIONS = 1024
# What torch and fair-esm raise for a file that is not an ESM-2 checkpoint.
LOAD_ERRORS = (KeyError, AttributeError, RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile)


def regression_path(checkpoint: Path) -> Path:
    """Where fair-esm's local loader looks for a checkpoint's contact-regression weights."""
    return checkpoint.with_name(checkpoint.stem + "-contact-regression.pt")


def resolve_esm_model(model: str | Path) -> Path:
    """The local `esm2_*.pt` checkpoint for `model`: a path, or a name in torch hub's checkpoint directory.

    Never reaches the network. ModelNotFoundError / ModelFormatError name the file and the fix.
    """
    text = str(model)
    looks_like_path = text.endswith(".pt") or "/" in text or Path(text).expanduser().exists()
    if looks_like_path:
        checkpoint = Path(text).expanduser()
        if not checkpoint.is_file():
            raise ModelNotFoundError(
                f"{checkpoint}: no such ESM-2 checkpoint; pass --esm-model PATH to an esm2_*.pt file"
            )
    else:
        directory = Path(torch.hub.get_dir()) / "checkpoints"
        checkpoint = directory / f"{text}.pt"
        if not checkpoint.is_file():
            raise ModelNotFoundError(
                f"ESM-2 model {text!r} is not in torch hub's checkpoint directory ({directory}), and models "
                f"are never downloaded here; copy {text}.pt and {text}-contact-regression.pt there "
                "(fair-esm saves them there on a machine with internet), or pass --esm-model PATH"
            )
    if not checkpoint.stem.startswith("esm2"):
        raise ModelFormatError(
            f"{checkpoint}: fair-esm reads a checkpoint as ESM-2 only when its file name starts with 'esm2'; "
            "keep the published name (e.g. esm2_t36_3B_UR50D.pt)"
        )
    regression = regression_path(checkpoint)
    if not regression.is_file():
        raise ModelNotFoundError(
            f"{regression}: missing; fair-esm loads the contact-regression weights from beside "
            f"{checkpoint.name}; copy {regression.name} into {checkpoint.parent}"
        )
    return checkpoint


class EsmBackend(EmbeddingBackend):
    """ESM-2 loaded once on one device; `run` embeds one protein FASTA file per call."""

    stage = "esm"

    def __init__(self, model: str | Path, device: str = "cpu", token_budget: int = DEFAULT_TOKEN_BUDGET,
                 precision: str | None = None) -> None:
        import esm

        super().__init__(device, token_budget, precision)
        checkpoint = resolve_esm_model(model)
        # The published checkpoints keep their config in an argparse.Namespace, which torch's
        # weights-only loader refuses unless it is allow-listed.
        torch.serialization.add_safe_globals([argparse.Namespace])
        try:
            self.model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(checkpoint))
        except LOAD_ERRORS as exc:
            raise ModelFormatError(
                f"{checkpoint}: not a fair-esm ESM-2 checkpoint ({type(exc).__name__}: {exc}); "
                "pass --esm-model PATH to a published esm2_*.pt file"
            ) from None
        self.model.to(self.device).eval()
        self.layer = self.model.num_layers
        self.width = self.model.embed_dim
        self.batch_converter = alphabet.get_batch_converter()
        self.residues = frozenset(token for token in alphabet.all_toks if len(token) == 1)
        logger.info("ESM-2 from %s (layer %d) on %s (%s)", checkpoint, self.layer, self.device, self.precision)

    def prepare(self, sequences: list[str]) -> tuple[list[int], EmbedBatch]:
        lengths = [len(sequence) + 2 for sequence in sequences]  # BOS and EOS
        return lengths, lambda batch: self._embed([sequences[i] for i in batch])

    def check(self, path: Path, ids: list[str], sequences: list[str]) -> None:
        """Every protein has a residue, and only residues of the ESM-2 alphabet."""
        for label, sequence in zip(ids, sequences, strict=True):
            if not sequence:
                raise FastaError(f"{path}: protein {label} is empty; ESM-2 needs at least one residue")
            unknown = set(sequence) - self.residues
            if unknown:
                raise FastaError(
                    f"{path}: protein {label} holds {''.join(sorted(unknown))!r}, not in the ESM-2 alphabet; "
                    "write unknown residues as X"
                )

    def _embed(self, batch: list[str]) -> torch.Tensor:
        """Mean of the last layer over residue positions 1..min(1024, length): no BOS, EOS or padding."""
        _labels, _strings, tokens = self.batch_converter([("", sequence) for sequence in batch])
        tokens = tokens.to(self.device)
        lengths = torch.tensor([min(len(sequence), MEAN_POSITIONS) for sequence in batch], device=self.device)
        with torch.inference_mode():
            with self.autocast():
                output = self.model(tokens, repr_layers=[self.layer])
            representations = output["representations"][self.layer].to(torch.float32)
            positions = torch.arange(tokens.shape[1], device=self.device)
            mask = (positions >= 1) & (positions <= lengths[:, None])
            weights = mask.unsqueeze(-1).to(torch.float32)
            means = (representations * weights).sum(dim=1) / weights.sum(dim=1)
        return means.cpu()
