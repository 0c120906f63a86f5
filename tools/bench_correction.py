"""Benchmark: how well work stealing corrects a wrong weight, with real broker and synthetic workers.

Three workers all claim to be an RTX 3090 (weight 1.0) but run at 2000, 2000
and 6000 residues/s. Sixty files whose sizes differ up to tenfold are run
twice on one broker: `--weighted` alone (the static split) and
`--weighted --steal`. Each makespan is divided by the lower bound
max(total / sum of speeds, largest file / fastest speed).

    python tools/bench_correction.py [--unit 600] [--json results.json] [--throughput-log LOG]
"""

from __future__ import annotations

import io
import json
import random
import tempfile
from pathlib import Path

import click
from rich.console import Console

from broker.reports import makespan_lower_bound
from virnucpro.client.embed import plan_job, run_job
from virnucpro.client.local import LocalCluster

SPEEDS = (2000.0, 2000.0, 6000.0)
GPU = "NVIDIA GeForce RTX 3090"
RECORD = 100


def write_inputs(directory: Path, unit: int, count: int = 60, seed: int = 11) -> list[Path]:
    """`count` FASTA files of unit x 1..10 residues, shuffled with a fixed seed."""
    rng = random.Random(seed)
    multiples = [1 + i % 10 for i in range(count)]
    rng.shuffle(multiples)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, multiple in enumerate(multiples):
        path = directory / f"file_{i:03d}.fa"
        records = multiple * unit // RECORD
        path.write_text("".join(f">f{i}_{r}\n{'ACGT' * (RECORD // 4)}\n" for r in range(records)))
        paths.append(path)
    return paths


def run(unit: int, log: Path | None = None) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-correction-") as scratch:
        root = Path(scratch)
        files = write_inputs(root / "inputs", unit)
        with LocalCluster(root / "logs") as cluster:
            cluster.start_broker("--throughput-log", str(log or root / "throughput.jsonl"))
            for n, speed in enumerate(SPEEDS):
                cluster.start_worker(f"w{n}-{speed:.0f}", "--synthetic-speed", str(speed), "--gpu-name", GPU)
            cluster.wait_for_workers(len(SPEEDS), "synthetic", timeout=30)
            console = Console(stderr=True)
            with cluster.client() as client:
                for label, steal in (("weighted", False), ("weighted+steal", True)):
                    plan = plan_job("synthetic", files, root / label)
                    costs = [f["residues"] for f in plan.todo]
                    report = run_job(client, plan, weighted=True, steal=steal, console=console, label=label)
                    simple = max(sum(costs) / sum(SPEEDS), max(costs) / max(SPEEDS))
                    results[label] = {
                        "makespan_s": report["makespan"],
                        "lower_bound_s": simple,
                        "ratio": report["makespan"] / simple,
                        "preemptive_bound_s": makespan_lower_bound(costs, SPEEDS),
                        "steals": report["steals"],
                    }
    return results


@click.command()
@click.option("--unit", default=600, show_default=True, help="Residues of the smallest file.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures here.")
@click.option("--throughput-log", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Keep the broker's throughput log here (for tools/plot_timeline.py).")
def main(unit: int, json_path: Path | None, throughput_log: Path | None) -> None:
    """Run the wrong-weight correction benchmark and print makespan / lower bound per policy."""
    results = run(unit, throughput_log.resolve() if throughput_log else None)
    out = io.StringIO()
    for label, figures in results.items():
        out.write(f"{label:16s} makespan {figures['makespan_s']:6.2f} s  lower bound {figures['lower_bound_s']:6.2f} s  "
                  f"ratio {figures['ratio']:.3f}  steals {figures['steals']}\n")
    click.echo(out.getvalue(), nl=False)
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
