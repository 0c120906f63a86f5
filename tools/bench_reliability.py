"""Benchmark: no file lost or written twice while workers are killed (-9) and restarted mid-job.

A real broker and four synthetic workers run one job; every few seconds a
random worker is killed with SIGKILL and a new one started in its place.
Afterwards every input must have exactly one complete output whose content
matches a clean run, and the throughput log exactly one task_done per file.

    python tools/bench_reliability.py [--files 120] [--kills 8] [--json results.json]
"""

from __future__ import annotations

import json
import random
import signal
import tempfile
import threading
import time
from pathlib import Path

import click
from rich.console import Console

from virnucpro.backends.synthetic import SyntheticBackend
from virnucpro.client.embed import plan_job, run_job
from virnucpro.client.local import LocalCluster
from virnucpro.stages import is_complete

SPEED = 4000.0
WORKERS = 4


def write_inputs(directory: Path, count: int, seed: int) -> list[Path]:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"file_{i:03d}.fa"
        path.write_text("".join(f">f{i}_{r}\n{''.join(rng.choice('ACGT') for _ in range(100))}\n"
                                for r in range(rng.randint(5, 40))))
        paths.append(path)
    return paths


def run(files: int, kills: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as scratch:
        root = Path(scratch)
        inputs = write_inputs(root / "inputs", files, seed)
        out = root / "out"
        with LocalCluster(root / "logs") as cluster:
            cluster.start_broker("--throughput-log", str(root / "throughput.jsonl"),
                                 "--heartbeat-interval", "0.25", "--worker-timeout", "1.5")
            for n in range(WORKERS):
                cluster.start_worker(f"w{n}", "--synthetic-speed", str(SPEED))
            cluster.wait_for_workers(WORKERS, "synthetic", timeout=30)
            done = threading.Event()
            killed: list[str] = []

            def chaos() -> None:
                generation = WORKERS
                while len(killed) < kills and not done.wait(rng.uniform(0.5, 2.0)):
                    victim = rng.choice(sorted(n for n, c in cluster.workers.items() if c.process.poll() is None))
                    cluster.workers[victim].process.send_signal(signal.SIGKILL)
                    killed.append(victim)
                    cluster.start_worker(f"w{generation}", "--synthetic-speed", str(SPEED))
                    generation += 1

            plan = plan_job("synthetic", inputs, out)
            chaos_thread = threading.Thread(target=chaos)
            started = time.monotonic()
            chaos_thread.start()
            try:
                with cluster.client() as client:
                    report = run_job(client, plan, weighted=True, steal=True, console=Console(stderr=True))
            finally:
                done.set()
                chaos_thread.join()
            elapsed = time.monotonic() - started
        records = [json.loads(line) for line in (root / "throughput.jsonl").read_text().splitlines()]
        task_done = [r for r in records if r["event"] == "task_done"]
        outputs = sorted(out.glob("*_synthetic.json"))
        reference = SyntheticBackend(1e12)
        mismatched = 0
        for path in inputs:
            output = out / f"{path.stem}_synthetic.json"
            expected = root / "expected.json"
            reference.run(path, expected)
            if not is_complete(output) or output.read_bytes() != expected.read_bytes():
                mismatched += 1
        # Killed workers leave their scratch (what they were writing); the next job's planning removes it.
        killed_scratch = len(plan_job("synthetic", inputs, out).swept)
        leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    return {
        "files": files, "workers": WORKERS, "kills": len(killed), "seconds": round(elapsed, 1),
        "done": report["done"], "failed": report["failed"],
        "outputs": len(outputs), "wrong_or_missing_outputs": mismatched,
        "scratch_swept_by_next_plan": killed_scratch, "temporary_files_left": len(leftovers),
        "task_done_records": len(task_done), "distinct_files_logged": len({r["file"] for r in task_done}),
        "steals": report["steals"],
    }


@click.command()
@click.option("--files", default=120, show_default=True, help="Files in the job.")
@click.option("--kills", default=8, show_default=True, help="Workers to kill -9 during the job.")
@click.option("--seed", default=5, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(files: int, kills: int, seed: int, json_path: Path | None) -> None:
    """Kill workers during a job and check that every output exists exactly once and is right."""
    results = run(files, kills, seed)
    for key, value in results.items():
        click.echo(f"{key:28s} {value}")
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
