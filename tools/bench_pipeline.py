"""Benchmark: merge + classify per file pair at the real widths, and `predict` end to end with the tiny models.

Part one (always): merge + classify of feature file pairs at the real widths (768 + 2,560), in frames/s.

Each pair is one DNABERT-S file and one ESM-2 file of random features, as
the embedding stages write them, with the split's ids (`read<i>_chunk_1F1`);
the classifier is the published architecture, MLPClassifier(3328), with
seeded random weights. A pair is timed from reading its two files to its
prediction rows on disk (classify_pair). It runs once per `--processes N`,
N processes side by side with the same threads each (cores / the largest
N), to show how it scales with workers, and once as one process using every
core; then the final two files are assembled from the per-pair files of
the first run (assemble_predictions), timed on its own.

Part two (--end-to-end N): `virnucpro predict` on N generated reads
(tools/make_example_reads.py) with the tiny models and 2 CPU workers, as a
user runs it: its wall time, and how much of it falls after the last
embedding finished (the last DNABERT-S or ESM-2 `task_done` in a throughput
log of its own), which is what classification adds to the run. Run it as
`--predict-command "python -m virnucpro.cli"` with another checkout on
PYTHONPATH to measure that version the same way.

    python tools/bench_pipeline.py [--frames 10000] [--pairs 2] [--processes 2] [--json results.json]
    python tools/bench_pipeline.py --end-to-end 50000 --skip-pairs [--json results.json]
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shlex
import subprocess
import sys
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


EMBEDDING_STAGES = ("dnabert", "esm")


def after_last_embedding(throughput_log: Path, ended: float) -> dict[str, Any]:
    """When the last embedding file of the log finished (Unix s), and the seconds from then to `ended`."""
    times = [record["time"] for record in map(json.loads, throughput_log.read_text().splitlines())
             if record.get("event") == "task_done" and record.get("stage") in EMBEDDING_STAGES]
    last = max(times)
    return {"last_embedding_unix": last, "after_last_embedding_s": ended - last}


def end_to_end(reads: int, workers: int, predict_command: list[str], root: Path) -> dict[str, Any]:
    """Run predict on `reads` generated reads; its wall time and the share after the last embedding."""
    fasta = root / "reads.fa"
    subprocess.run([sys.executable, str(Path(__file__).with_name("make_example_reads.py")), str(fasta),
                    "--reads", str(reads)], check=True, capture_output=True)
    log = root / "throughput.jsonl"
    out = root / "predictions"
    argv = [*predict_command, "predict", str(fasta), "-o", str(out), "--models", "tiny", "--workers", str(workers),
            "--throughput-log", str(log)]
    started = time.time()
    run = subprocess.run(argv, capture_output=True, text=True)
    ended = time.time()
    if run.returncode != 0:
        raise click.ClickException(f"predict exited with {run.returncode}:\n{run.stderr[-3000:]}")
    result: dict[str, Any] = {"reads": reads, "workers": workers, "command": argv, "wall_s": ended - started,
                              **after_last_embedding(log, ended)}
    result["after_share"] = result["after_last_embedding_s"] / result["wall_s"]
    summary = out / "summary.json"
    if summary.exists():  # versions before the classify stage wrote none
        result["summary"] = json.loads(summary.read_text())
    return result


@click.command()
@click.option("--frames", default=10000, show_default=True, help="Frames per file pair (the split's file size).")
@click.option("--pairs", "pairs_each", default=2, show_default=True, help="File pairs per process.")
@click.option("--processes", default="1,2", show_default=True, help="Comma-separated process counts to time.")
@click.option("--skip-pairs", is_flag=True, help="Leave out part one (merge + classify per pair).")
@click.option("--end-to-end", "reads", type=click.IntRange(min=1), default=None, metavar="N",
              help="Also run `virnucpro predict` on N generated reads with the tiny models (part two).")
@click.option("--workers", default=2, show_default=True, help="CPU workers predict starts in part two.")
@click.option("--predict-command", default=None, metavar="CMD",
              help="How to run virnucpro in part two [default: the `virnucpro` beside this Python].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(frames: int, pairs_each: int, processes: str, skip_pairs: bool, reads: int | None, workers: int,
         predict_command: str | None, json_path: Path | None) -> None:
    """Time merge + classify per file pair and the assembly, and predict end to end; print (and write JSON)."""
    results: dict[str, Any] = {}
    if not skip_pairs:
        results = run(frames, pairs_each, [int(p) for p in processes.split(",")])
        for row in results["runs"]:
            click.echo(f"{row['processes']} process(es) x {row['threads_each']} thread(s): {row['frames']:,} frames, "
                       f"{row['frames_per_s']:,.0f} frames/s ({row['ms_per_frame_per_process']:.3f} ms per frame "
                       "per process)")
        assembled = results["assemble"]
        click.echo(f"assembling both prediction files from {assembled['pairs']} pairs: "
                   f"{assembled['frames_per_s']:,.0f} frames/s")
    if reads is not None:
        command = shlex.split(predict_command) if predict_command else [str(Path(sys.executable).with_name("virnucpro"))]
        with tempfile.TemporaryDirectory(prefix="bench-predict-") as scratch:
            e2e = results["end_to_end"] = end_to_end(reads, workers, command, Path(scratch))
        click.echo(f"predict on {reads:,} reads, {workers} CPU workers: {e2e['wall_s']:.1f} s, of which "
                   f"{e2e['after_last_embedding_s']:.1f} s ({e2e['after_share']:.1%}) after the last embedding")
        if "summary" in e2e:
            click.echo("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in e2e["summary"]["stage_seconds"].items()))
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
