"""DNABERT-S embedding of nucleotide FASTA files: mean of the last hidden state over all tokens."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from virnucpro.backends.common import (
    ModelNotFoundError,
    check_token_budget,
    embed_in_batches,
    precision,
    read_records,
    resolve_device,
)

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


class DnabertBackend:
    """DNABERT-S loaded once on one device; `run` embeds one nucleotide FASTA file per call."""

    stage = "dnabert"

    def __init__(self, model: str | Path, device: str = "cpu", token_budget: int = DEFAULT_TOKEN_BUDGET) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.device = resolve_device(device)
        self.token_budget = check_token_budget(token_budget)
        directory = resolve_dnabert_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True, local_files_only=True)
        self.model = AutoModel.from_pretrained(directory, trust_remote_code=True, local_files_only=True)
        self.model.to(self.device).eval()
        # Padding positions are masked out, so any id works when the tokenizer names no pad token.
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        logger.info("DNABERT-S from %s on %s", directory, self.device)

    def run(
        self, input_path: Path, output_path: Path, should_stop: Callable[[], bool] = lambda: False
    ) -> tuple[int, int]:
        """Embed every record of the FASTA input_path and torch.save the result to output_path.

        Returns (sequences, residues). Raises Cancelled, writing nothing, when
        should_stop() turns True between batches.
        """
        started = time.monotonic()
        ids, sequences = read_records(input_path)
        token_ids: list[list[int]] = (
            self.tokenizer(sequences, add_special_tokens=True)["input_ids"] if sequences else []
        )
        features = embed_in_batches(
            [len(tokens) for tokens in token_ids],
            self.token_budget,
            lambda batch: self._embed([token_ids[i] for i in batch]),
            should_stop,
        )
        data = [
            {"label": label, "mean_representation": feature.tolist()} for label, feature in zip(ids, features, strict=True)
        ]
        torch.save({"nucleotide": ids, "data": data}, output_path)
        logger.debug("%s: %d sequences in %.2f s", input_path, len(ids), time.monotonic() - started)
        return len(ids), sum(len(sequence) for sequence in sequences)

    def _embed(self, batch: list[list[int]]) -> torch.Tensor:
        """Mask-weighted mean of the last hidden state over [CLS], the sequence and [SEP]."""
        width = max(len(tokens) for tokens in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, tokens in enumerate(batch):
            input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        input_ids = input_ids.to(self.device)
        mask = mask.to(self.device)
        with torch.inference_mode():
            with precision(self.device):
                hidden = self.model(input_ids=input_ids, attention_mask=mask)[0]
            # Pooled in fp32 whatever the forward ran in, so bf16 rounding does not add up over tokens.
            weights = mask.unsqueeze(-1).to(torch.float32)
            means = (hidden.to(torch.float32) * weights).sum(dim=1) / weights.sum(dim=1)
        return means.cpu()
