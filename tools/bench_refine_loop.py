"""Benchmark: the weight-refinement loop (run, refine, run again) with real broker and synthetic workers.

Three workers report real GPU names, but their true speeds follow
3090 = 1.0, 4090 = 1.8, H100 = 3.6 (x 2000 residues/s), while the built-in
table says 1.0, 1.5, 2.5. Run 1 seeds with the built-in table
(`--weighted`, no stealing, so the seeding alone decides the makespan);
`virnucpro weights refine` fits a table to its throughput log; run 2 seeds
with the refined table. Each makespan is divided by the lower bound.

    python tools/bench_refine_loop.py [--unit 600] [--json results.json]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import click
from bench_correction import write_inputs
from rich.console import Console

from virnucpro.client.embed import plan_job, run_job
from virnucpro.client.local import LocalCluster
from virnucpro.pipeline.gpu_weights import load_weight_table
from virnucpro.weights.logs import read_throughput_logs
from virnucpro.weights.refine import refine_weights, write_weight_file

BASE = 2000.0
WORKERS = (("NVIDIA GeForce RTX 3090", 1.0), ("NVIDIA GeForce RTX 4090", 1.8), ("NVIDIA H100 80GB HBM3", 3.6))


def one_run(root: Path, label: str, files: list[Path], log: Path, weights: Path | None) -> dict[str, float]:
    with LocalCluster(root / f"logs-{label}") as cluster:
        cluster.start_broker("--throughput-log", str(log), *(["--gpu-weights", str(weights)] if weights else []))
        for n, (gpu, speed) in enumerate(WORKERS):
            cluster.start_worker(f"w{n}", "--synthetic-speed", str(BASE * speed), "--gpu-name", gpu)
        cluster.wait_for_workers(len(WORKERS), "synthetic", timeout=30)
        plan = plan_job("synthetic", files, root / label)
        with cluster.client() as client:
            report = run_job(client, plan, weighted=True, steal=False, console=Console(stderr=True), label=label)
    return {"makespan_s": report["makespan"], "lower_bound_s": report["lower_bound"],
            "ratio": report["makespan"] / report["lower_bound"]}


def run(unit: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-refine-") as scratch:
        root = Path(scratch)
        files = write_inputs(root / "inputs", unit)
        log = root / "throughput.jsonl"
        before = one_run(root, "built-in", files, log, None)
        refinement = refine_weights(read_throughput_logs([log]), load_weight_table(None))
        refined = root / "refined.toml"
        write_weight_file(refined, refinement.weights)
        after = one_run(root, "refined", files, root / "throughput-2.jsonl", refined)
        table = load_weight_table(refined)
        return {
            "built_in": before,
            "refined": after,
            "refined_weights": {gpu: table.lookup(gpu) for gpu, _ in WORKERS},
            "true_weights": {gpu: speed for gpu, speed in WORKERS},
        }


@click.command()
@click.option("--unit", default=600, show_default=True, help="Residues of the smallest file.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(unit: int, json_path: Path | None) -> None:
    """Run, refine the weights from the log, run again; print both makespans against the lower bound."""
    results = run(unit)
    for label in ("built_in", "refined"):
        r = results[label]
        click.echo(f"{label:9s} makespan {r['makespan_s']:6.2f} s  lower bound {r['lower_bound_s']:6.2f} s  "
                   f"ratio {r['ratio']:.3f}")
    for gpu, weight in results["refined_weights"].items():
        click.echo(f"{gpu:26s} refined {weight:.2f}  true {results['true_weights'][gpu]:.2f}")
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
