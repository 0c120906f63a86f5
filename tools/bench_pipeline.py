"""Benchmark: merge + classify of feature file pairs at the real widths (768 + 2,560), in frames per second.

Each pair is one DNABERT-S file and one ESM-2 file of random features, as
the embedding stages write them, with the split's ids (`read<i>_chunk_1F1`);
the classifier is the published architecture, MLPClassifier(3328), with
seeded random weights. A pair is timed from reading its two files to its
prediction rows on disk. It runs once in a single process (torch using
every core) and once per `--processes N` with N processes side by side
(each with cores / N threads), to show how it scales with workers.

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
from virnucpro.pipeline.merge import merge_pair
from virnucpro.pipeline.outputs import write_predictions

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
    data = [{"label": label, "mean_representation": row.tolist()} for label, row in zip(ids, dna, strict=True)]
    torch.save({"nucleotide": ids, "data": data}, dnabert)
    torch.save({"proteins": ids, "data": [row.clone() for row in protein]}, esm)
    return dnabert, esm


def process_pairs(job: tuple[list[tuple[int, str, str]], str, str, int]) -> float:
    """Merge and classify every pair of `job` in this process; its wall seconds."""
    pairs, classifier_path, out_dir, threads = job
    torch.set_num_threads(threads)
    classifier = torch.load(classifier_path, weights_only=False)
    started = time.perf_counter()
    for k, dnabert, esm in pairs:
        merged = Path(out_dir) / f"output_{k}_merged.pt"
        merge_pair(dnabert, esm, merged)
        write_predictions([merged], classifier, Path(out_dir) / f"pair_{k}")
    return time.perf_counter() - started


def timed(pairs: list[tuple[int, str, str]], processes: int, classifier: Path, root: Path,
          frames: int) -> dict[str, Any]:
    """`processes` processes, each given its own pairs; frames/s over the wall time of all of them."""
    threads = max(1, cores() // processes)
    jobs = []
    for n in range(processes):
        out = root / f"out-{processes}-{n}"
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
        for processes in process_counts:
            results["runs"].append(timed(pairs[: processes * pairs_each], processes, classifier, root, frames))
    return results


@click.command()
@click.option("--frames", default=10000, show_default=True, help="Frames per file pair (the split's file size).")
@click.option("--pairs", "pairs_each", default=2, show_default=True, help="File pairs per process.")
@click.option("--processes", default="1,2", show_default=True, help="Comma-separated process counts to time.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(frames: int, pairs_each: int, processes: str, json_path: Path | None) -> None:
    """Time merge + classify per file pair; print frames/s (and write them as JSON)."""
    results = run(frames, pairs_each, [int(p) for p in processes.split(",")])
    for row in results["runs"]:
        click.echo(f"{row['processes']} process(es) x {row['threads_each']} thread(s): {row['frames']:,} frames, "
                   f"{row['frames_per_s']:,.0f} frames/s ({row['ms_per_frame_per_process']:.3f} ms per frame "
                   "per process)")
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
