"""Merge of the DNABERT-S and ESM-2 features of file pair k: the same ids, side by side, DNABERT-S first."""

from __future__ import annotations

from pathlib import Path

import torch

from virnucpro.pipeline.features import Features, load_features

REMEDY = "embed it again"


class MergeError(ValueError):
    """Feature files that cannot be merged; the message names both files and the fix."""


def merged_path(output_dir: str | Path, k: int) -> Path:
    """Where the merged features of file pair k are kept when asked (`--keep-features`)."""
    return Path(output_dir) / f"output_{k}_merged.pt"


def merge_features(dnabert_path: str | Path, esm_path: str | Path) -> Features:
    """Row i = DNABERT-S feature i then ESM-2 feature i, for the ids both files hold in the same order.

    The split writes the same ids in the same order to file k of the
    nucleotide and the protein set, so anything else means a file from
    another run or an edited one: MergeError names both files, and no row
    is dropped or reordered to make them fit.
    """
    dnabert = load_features(dnabert_path, "dnabert", REMEDY)
    esm = load_features(esm_path, "esm", REMEDY)
    if dnabert.ids != esm.ids:
        raise MergeError(f"{dnabert_path} and {esm_path}: {_first_difference(dnabert.ids, esm.ids)}; file k of "
                         "both sets must hold the same ids in the same order, as the split writes them; "
                         "embed both files of the pair again from the same split")
    precision = dnabert.precision if dnabert.precision == esm.precision else f"{dnabert.precision}+{esm.precision}"
    return Features("merged", precision, dnabert.ids, torch.cat((dnabert.data, esm.data), dim=1))


def _first_difference(dnabert_ids: list[str], esm_ids: list[str]) -> str:
    for row, (dna, protein) in enumerate(zip(dnabert_ids, esm_ids, strict=False), start=1):
        if dna != protein:
            return f"row {row} is {dna!r} in the first and {protein!r} in the second"
    return f"the first holds {len(dnabert_ids)} ids, the second {len(esm_ids)}"
