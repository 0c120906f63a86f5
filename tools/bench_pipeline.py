"""Benchmark: merge + classify of feature file pairs at the real widths (768 + 2,560), in frames per second.

Each pair is one DNABERT-S file and one ESM-2 file of random features, as
the embedding stages write them, with the split's ids (`read<i>_chunk_1F1`);
the classifier is the published architecture, MLPClassifier(3328), with
seeded random weights. A pair is timed from reading its two files to its
prediction rows on disk (classify_pair). It runs once per `--processes N`,
N processes side by side with the same threads each (cores / the largest
N), to show how it scales with workers, and once as one process using every
core; then the final two files are assembled from the per-pair files of
the first run (assemble_predictions), timed on its own.

    python tools/bench_pipeline.py [--frames 10000] [--pairs 2] [--processes 2] [--json results.json]
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import torch

from virnucpro.pipeline.classifier import INPUT_DIM, MLPClassifier, classifier_bytes
from virnucpro.pipeline.features import save_features
from virnucpro.pipeline.outputs import assemble_predictions, classify_pair, pair_predictions_path

DNABERT_DIM = 768
ESM_DIM = INPUT_DIM - DNABERT_DIM
SEED = 1997


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_pair(directory: Path, k: int, frames: int) -> tuple[Path, Path]:
    """output_k_DNABERT_S.pt and output_k_ESM.pt of `frames` random rows, in the format the backends write."""
    generator = torch.Generator().manual_seed(SEED + k)
    ids = [f"read{k}_{i}_chunk_1F1" for i in range(frames)]
    dna = torch.rand(frames, DNABERT_DIM, generator=generator)
    protein = torch.rand(frames, ESM_DIM, generator=generator)
    dnabert, esm = directory / f"output_{k}_DNABERT_S.pt", directory / f"output_{k}_ESM.pt"
    save_features(dnabert, "dnabert", ids, dna, "fp32")
    save_features(esm, "esm", ids, protein, "fp32")
    return dnabert, esm


def process_pairs(job: tuple[list[tuple[int, str, str]], str, str, int]) -> float:
    """Merge and classify every pair of `job` in this process; its wall seconds."""
    pairs, classifier_path, out_dir, threads = job
    torch.set_num_threads(threads)
    classifier = torch.load(classifier_path, weights_only=False)
    started = time.perf_counter()
    for k, dnabert, esm in pairs:
        classify_pair(dnabert, esm, classifier, pair_predictions_path(out_dir, k))
    return time.perf_counter() - started


def timed(pairs: list[tuple[int, str, str]], processes: int, threads: int, classifier: Path, root: Path,
          frames: int) -> dict[str, Any]:
    """`processes` processes of `threads` threads, each given its own pairs; frames/s over the slowest."""
    jobs = []
    for n in range(processes):
        out = root / f"out-{processes}x{threads}-{n}"
        out.mkdir()
        jobs.append((pairs[n::processes], str(classifier), str(out), threads))
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        seconds = pool.map(process_pairs, jobs)
    wall = time.perf_counter() - started
    total = frames * len(pairs)
    return {"processes": processes, "threads_each": threads, "pairs": len(pairs), "frames": total,
            "wall_s": wall, "busy_s": seconds, "frames_per_s": total / max(seconds),
            "ms_per_frame_per_process": 1000 * sum(seconds) / total}


def run(frames: int, pairs_each: int, process_counts: list[int]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as scratch:
        root = Path(scratch)
        classifier = root / "classifier.pth"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            classifier.write_bytes(classifier_bytes(MLPClassifier(INPUT_DIM).eval()))
        inputs = root / "features"
        inputs.mkdir()
        most = max(process_counts) * pairs_each
        pairs = []
        for k in range(1, most + 1):
            dnabert, esm = write_pair(inputs, k, frames)
            pairs.append((k, str(dnabert), str(esm)))
        results: dict[str, Any] = {"frames_per_pair": frames, "cores": cores(), "torch": torch.__version__,
                                   "runs": []}
        threads = max(1, cores() // max(process_counts))
        shapes = [(processes, threads) for processes in process_counts]
        if (1, cores()) not in shapes:
            shapes.append((1, cores()))
        for processes, threads_each in shapes:
            results["runs"].append(timed(pairs[: processes * pairs_each], processes, threads_each, classifier, root,
                                         frames))
        first, first_threads = shapes[0]
        per_pair = [pair_predictions_path(root / f"out-{first}x{first_threads}-{n % first}", k)
                    for n, (k, _, _) in enumerate(pairs[: first * pairs_each])]
        started = time.perf_counter()
        written = assemble_predictions(per_pair, root / "assembled")
        seconds = time.perf_counter() - started
        results["assemble"] = {"pairs": len(per_pair), "frames": written.frames, "seconds": seconds,
                               "frames_per_s": written.frames / seconds}
    return results


@click.command()
@click.option("--frames", default=10000, show_default=True, help="Frames per file pair (the split's file size).")
@click.option("--pairs", "pairs_each", default=2, show_default=True, help="File pairs per process.")
@click.option("--processes", default="1,2", show_default=True, help="Comma-separated process counts to time.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(frames: int, pairs_each: int, processes: str, json_path: Path | None) -> None:
    """Time merge + classify per file pair and the assembly; print frames/s (and write them as JSON)."""
    results = run(frames, pairs_each, [int(p) for p in processes.split(",")])
    for row in results["runs"]:
        click.echo(f"{row['processes']} process(es) x {row['threads_each']} thread(s): {row['frames']:,} frames, "
                   f"{row['frames_per_s']:,.0f} frames/s ({row['ms_per_frame_per_process']:.3f} ms per frame "
                   "per process)")
    assembled = results["assemble"]
    click.echo(f"assembling both prediction files from {assembled['pairs']} pairs: "
               f"{assembled['frames_per_s']:,.0f} frames/s")
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
