"""Merge of DNABERT-S and ESM-2 features per file: pairs files by their number k, rows by id."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from virnucpro.atomic import atomic_write

logger = logging.getLogger(__name__)

DNABERT_NAME = re.compile(r"^output_(\d+)_DNABERT_S\.pt$")
ESM_NAME = re.compile(r"^output_(\d+)_ESM\.pt$")
MERGED_NAME = re.compile(r"^output_(\d+)_merged\.pt$")


class MergeError(ValueError):
    """Feature files that cannot be merged; the message names the file and the fix."""


def file_number(path: str | Path, pattern: re.Pattern[str]) -> int:
    """k of `output_k_...`; MergeError when the name does not follow `pattern`."""
    match = pattern.match(Path(path).name)
    if match is None:
        raise MergeError(
            f"{path}: the name does not match {pattern.pattern}; keep the names the embed stage writes"
        )
    return int(match.group(1))


def merged_path(output_dir: str | Path, k: int) -> Path:
    return Path(output_dir) / f"output_{k}_merged.pt"


def pair_by_number(
    dnabert_paths: Iterable[str | Path], esm_paths: Iterable[str | Path]
) -> list[tuple[int, Path, Path]]:
    """(k, DNABERT file, ESM file) for every k, sorted by k; MergeError on a k missing or repeated on one side."""
    sides: list[dict[int, Path]] = []
    for paths, pattern in ((dnabert_paths, DNABERT_NAME), (esm_paths, ESM_NAME)):
        by_number: dict[int, Path] = {}
        for path in map(Path, paths):
            k = file_number(path, pattern)
            if k in by_number:
                raise MergeError(f"{path}: file {k} given twice (also {by_number[k]}); give each file once")
            by_number[k] = path
        sides.append(by_number)
    dnabert, esm = sides
    for k in sorted(dnabert.keys() ^ esm.keys()):
        if k in dnabert:
            raise MergeError(f"{dnabert[k]}: has no partner output_{k}_ESM.pt; embed protein file {k} first")
        raise MergeError(f"{esm[k]}: has no partner output_{k}_DNABERT_S.pt; embed nucleotide file {k} first")
    return [(k, dnabert[k], esm[k]) for k in sorted(dnabert)]


def load_feature_dict(
    path: Path, keys: tuple[str, str], error: type[ValueError] = MergeError, remedy: str = "embed"
) -> dict[str, Any]:
    """A torch-saved dict holding `keys`; `error` names the file and says to `remedy` it again."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise error(f"{path}: file not found; {remedy} it first") from None
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise error(
            f"{path}: not a readable feature file ({type(exc).__name__}: {exc}); {remedy} it again"
        ) from None
    if not isinstance(content, dict) or not all(key in content for key in keys):
        raise error(f"{path}: lacks the keys {keys}; {remedy} it again with this version")
    return content


def _load(path: Path, keys: tuple[str, str]) -> dict[str, Any]:
    content = load_feature_dict(path, keys)
    if len(content[keys[0]]) != len(content[keys[1]]):
        ids, features = len(content[keys[0]]), len(content[keys[1]])
        raise MergeError(f"{path}: {ids} ids but {features} features; embed it again")
    return content


def merge_pair(dnabert_path: str | Path, esm_path: str | Path, output_path: str | Path) -> int:
    """Write `output_path` = {'ids': [...], 'data': FloatTensor[N, D]}; return N.

    Rows follow the DNABERT-S file's order and keep only ids that have both
    features; each row is the DNABERT-S feature then the ESM-2 feature, and
    `ids` names exactly those rows. The output appears atomically.
    """
    dnabert_path, esm_path, output_path = Path(dnabert_path), Path(esm_path), Path(output_path)
    nucleotide = _load(dnabert_path, ("nucleotide", "data"))
    protein = _load(esm_path, ("proteins", "data"))
    proteins = dict(zip(protein["proteins"], protein["data"], strict=True))
    ids: list[str] = []
    rows: list[torch.Tensor] = []
    missing = 0
    for label, entry in zip(nucleotide["nucleotide"], nucleotide["data"], strict=True):
        if label not in proteins:
            missing += 1
            continue
        dna = torch.as_tensor(entry["mean_representation"], dtype=torch.float32)
        rows.append(torch.cat((dna, torch.as_tensor(proteins[label], dtype=torch.float32))))
        ids.append(label)
    if missing:
        logger.warning(
            "%s: %d ids have no ESM-2 feature in %s and are left out", dnabert_path.name, missing, esm_path.name
        )
    if rows and len({row.shape for row in rows}) != 1:
        raise MergeError(
            f"{dnabert_path} + {esm_path}: features of different lengths; embed both with one model each"
        )
    data = torch.stack(rows) if rows else torch.empty(0, 0)
    _save_atomically({"ids": ids, "data": data}, output_path)
    return len(ids)


def merge_files(
    dnabert_paths: Iterable[str | Path], esm_paths: Iterable[str | Path], output_dir: str | Path
) -> list[Path]:
    """Merge every pair of `output_k_DNABERT_S.pt` / `output_k_ESM.pt` into `output_k_merged.pt`.

    Files are paired by k in their names, never by position in the lists.
    Returns the merged paths in order of k.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    outputs = []
    for k, dnabert_path, esm_path in pair_by_number(dnabert_paths, esm_paths):
        output = merged_path(output_dir, k)
        rows = merge_pair(dnabert_path, esm_path, output)
        logger.debug("%s: %d rows", output.name, rows)
        outputs.append(output)
    return outputs


def _save_atomically(content: dict[str, Any], path: Path) -> None:
    with atomic_write(path, "wb") as handle:
        torch.save(content, handle)
