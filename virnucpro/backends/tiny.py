"""The `--models tiny` set: small seeded DNABERT-S, ESM-2 and classifier checkpoints in the real formats.

Nothing is downloaded. Each model is built from a fixed seed and saved in the
format its real counterpart ships in, so the tiny set goes through exactly the
loading code users' models do: a transformers directory with a tokenizer.json,
a fair-esm `esm2_*.pt` with its contact-regression file, and a whole pickled
`__main__.MLPClassifier`. Features are 768 (DNABERT-S width) + 128 columns.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from virnucpro.atomic import atomic_write
from virnucpro.pipeline.classifier import MLPClassifier, classifier_bytes

if TYPE_CHECKING:
    from esm.model.esm2 import ESM2
    from tokenizers import Tokenizer
    from transformers import BertModel

SEED = 1997
DNABERT_DIR = "dnabert-s-tiny"
ESM_FILE = "esm2_t2_tiny.pt"
ESM_REGRESSION_FILE = "esm2_t2_tiny-contact-regression.pt"
CLASSIFIER_FILE = "tiny_model.pth"

DNABERT_HIDDEN = 768  # as DNABERT-S, so nucleotide features keep their real width
ESM_LAYERS = 2
ESM_DIM = 128  # ESM-2 3B's 2560 would make a 300 MB file that embeds slowly on a CPU
FEATURE_DIM = DNABERT_HIDDEN + ESM_DIM

SPECIAL_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")  # DNABERT-S's ids 0-4
MAX_TOKENS = 1024


@dataclass(frozen=True)
class TinyModels:
    """Where ensure_tiny_models put the three tiny checkpoints."""

    dnabert_dir: Path
    esm_path: Path
    classifier_path: Path


def build_tiny_tokenizer() -> Tokenizer:
    """A BPE tokenizer over bases with DNABERT-S's special tokens: 1-, 2- and 4-mer tokens, [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, models, processors

    pairs = ["".join(p) for p in itertools.product("ACGT", repeat=2)]
    quads = ["".join(p) for p in itertools.product("ACGT", repeat=4)]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *"ACGTN", *pairs, *quads])}
    # Fixed merges instead of a trained BPE: same tokens every time, about 2.4 bases per token.
    merges = [(pair[0], pair[1]) for pair in pairs] + [(quad[:2], quad[2:]) for quad in quads]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]"))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tokenizer


def build_tiny_dnabert() -> BertModel:
    """The tiny DNABERT-S stand-in: a one-layer BERT of width 768, weights from SEED."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=build_tiny_tokenizer().get_vocab_size(),
        hidden_size=DNABERT_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=MAX_TOKENS,
        pad_token_id=SPECIAL_TOKENS.index("[PAD]"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return BertModel(config).eval()


def build_tiny_esm() -> ESM2:
    """The tiny ESM-2: two layers of width 128 with ESM-2's alphabet, weights from SEED."""
    from esm.data import Alphabet
    from esm.model.esm2 import ESM2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = ESM2(
            num_layers=ESM_LAYERS,
            embed_dim=ESM_DIM,
            attention_heads=4,
            alphabet=Alphabet.from_architecture("ESM-1b"),
            token_dropout=True,
        )
    return model.eval()


def build_tiny_classifier() -> MLPClassifier:
    """The VirNucPro MLP for the tiny features (768 + 128 inputs), weights from SEED."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return MLPClassifier(FEATURE_DIM).eval()


def ensure_tiny_models(directory: str | Path) -> TinyModels:
    """Create the tiny checkpoints in `directory` unless they are there already; return their paths.

    Each checkpoint is written under a temporary name and renamed into place,
    so concurrent callers each end with a complete set and readers never see
    half a file. The weights come from a fixed seed: with the same torch and
    transformers versions every call writes the same bytes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    models = TinyModels(directory / DNABERT_DIR, directory / ESM_FILE, directory / CLASSIFIER_FILE)
    if not models.dnabert_dir.is_dir():
        _publish_directory(models.dnabert_dir, _write_tiny_dnabert)
    # The regression file first: fair-esm cannot load the checkpoint without it beside.
    regression = directory / ESM_REGRESSION_FILE
    if not regression.is_file() or not models.esm_path.is_file():
        checkpoint, regression_data = _tiny_esm_bytes()
        _publish_file(regression, regression_data)
        _publish_file(models.esm_path, checkpoint)
    if not models.classifier_path.is_file():
        _publish_file(models.classifier_path, classifier_bytes(build_tiny_classifier()))
    return models


def _write_tiny_dnabert(directory: Path) -> None:
    write_dnabert_directory(directory, build_tiny_dnabert())


def write_dnabert_directory(directory: Path, model: BertModel) -> None:
    """A transformers model directory holding `model` and the tiny tokenizer, as DNABERT-S ships."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a progress bar per saved file is noise in every first run
    model.save_pretrained(directory)
    build_tiny_tokenizer().save(str(directory / "tokenizer.json"))
    # As DNABERT-S's own tokenizer_config: AutoTokenizer then reads tokenizer.json as is.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "mask_token": "[MASK]",
        "model_max_length": MAX_TOKENS,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _tiny_esm_bytes() -> tuple[bytes, bytes]:
    return esm_checkpoint_bytes(build_tiny_esm())


def esm_checkpoint_bytes(model: ESM2) -> tuple[bytes, bytes]:
    """(checkpoint, contact regression) of `model` as fair-esm publishes them for ESM-2."""
    state = model.state_dict()
    regression_keys = [key for key in state if key.startswith("contact_head.regression.")]
    cfg = argparse.Namespace(
        encoder_layers=model.num_layers, encoder_embed_dim=model.embed_dim,
        encoder_attention_heads=model.attention_heads, token_dropout=model.token_dropout,
    )
    checkpoint = {
        # fair-esm strips this prefix, which the published checkpoints carry from fairseq.
        "model": {
            f"encoder.sentence_encoder.{key}": value for key, value in state.items() if key not in regression_keys
        },
        "cfg": {"model": cfg},
    }
    regression = {"model": {key: state[key] for key in regression_keys}}
    return _torch_bytes(checkpoint), _torch_bytes(regression)


def _torch_bytes(content: object) -> bytes:
    # Saved to memory: torch names the archive inside the file after the file, and temporary names vary.
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


def _publish_file(path: Path, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def _publish_directory(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        temporary.mkdir()
        write(temporary)
        try:
            os.rename(temporary, path)
        except OSError:
            if not path.is_dir():
                raise
            # Another process renamed its identical copy into place first.
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
