"""DNABERT-S embedding of nucleotide FASTA files: mean of the last hidden state over all tokens."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from virnucpro.backends.common import EmbedBatch, EmbeddingBackend, ModelNotFoundError
from virnucpro.pipeline.fasta import FastaError

logger = logging.getLogger(__name__)

DNABERT_S_MODEL = "zhihan1996/DNABERT-S"
DEFAULT_TOKEN_BUDGET = 8192


def resolve_dnabert_model(model: str | Path) -> Path:
    """The local directory of a DNABERT-S model: `model` itself, or its snapshot in the Hugging Face cache.

    Never reaches the network. ModelNotFoundError names the model and the fix.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(
            f"{path}: is a file, not a model directory; pass --dnabert-model DIR holding config.json, "
            "the weights and the tokenizer"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(model), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        raise ModelNotFoundError(
            f"DNABERT-S model {str(model)!r} is neither a local directory nor in the Hugging Face cache, "
            "and models are never downloaded here; copy it to this machine "
            f"(e.g. `huggingface-cli download {DNABERT_S_MODEL}` where there is internet) "
            "and pass --dnabert-model PATH"
        ) from None


class DnabertBackend(EmbeddingBackend):
    """DNABERT-S loaded once on one device; `run` embeds one nucleotide FASTA file per call."""

    stage = "dnabert"

    def __init__(self, model: str | Path, device: str = "cpu", token_budget: int = DEFAULT_TOKEN_BUDGET,
                 precision: str | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        super().__init__(device, token_budget, precision)
        directory = resolve_dnabert_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True, local_files_only=True)
        self.model = AutoModel.from_pretrained(directory, trust_remote_code=True, local_files_only=True)
        self.model.to(self.device).eval()
        self.width = self.model.config.hidden_size
        # Padding positions are masked out, so any id works when the tokenizer names no pad token.
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        logger.info("DNABERT-S from %s on %s (%s)", directory, self.device, self.precision)

    def check(self, path: Path, ids: list[str], sequences: list[str]) -> None:
        """Every sequence has a base (the tokenizer maps any other character to [UNK], as DNABERT-S's own)."""
        for label, sequence in zip(ids, sequences, strict=True):
            if not sequence:
                raise FastaError(f"{path}: sequence {label} is empty; DNABERT-S needs at least one base")

    def prepare(self, sequences: list[str]) -> tuple[list[int], EmbedBatch]:
        token_ids: list[list[int]] = (
            self.tokenizer(sequences, add_special_tokens=True)["input_ids"] if sequences else []
        )
        return [len(tokens) for tokens in token_ids], lambda batch: self._embed([token_ids[i] for i in batch])

    def _embed(self, batch: list[list[int]]) -> torch.Tensor:
        """Mask-weighted mean of the last hidden state over [CLS], the sequence and [SEP]."""
        longest = max(len(tokens) for tokens in batch)
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, tokens in enumerate(batch):
            input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        input_ids = input_ids.to(self.device)
        mask = mask.to(self.device)
        with torch.inference_mode():
            with self.autocast():
                hidden = self.model(input_ids=input_ids, attention_mask=mask)[0]
            # Pooled in fp32 whatever the forward ran in, so bf16 rounding does not add up over tokens.
            weights = mask.unsqueeze(-1).to(torch.float32)
            means = (hidden.to(torch.float32) * weights).sum(dim=1) / weights.sum(dim=1)
        return means.cpu()
