"""Benchmark: this broker beside a plain pull queue, static weighted seeding and Dask, on the same synthetic workers.

Each case is a set of files and synthetic workers of known true speeds (some
of them misnamed, so the weight table is wrong). Every system runs it with
real processes on loopback, from a fresh start each time:

- `broker`: this broker, `--weighted --steal` (backup copies on, as by default);
- `pull queue`: a minimal server speaking the worker protocol that hands each
  idle worker the largest file left (the same `virnucpro worker` processes serve it);
- `static`: this broker, `--weighted` without stealing (the seeding alone);
- `dask`: a Dask LocalCluster with one single-threaded worker process per
  synthetic worker, each file a task (largest first by priority) that does the
  synthetic stage's work at that worker's speed (`pip install -e '.[bench]'`).

The production-size case (1,760 ESM-2 files on three GPUs whose table weights
are wrong) runs in simulated time (broker.simulator for this broker's
policies, an event loop for the pull queue); Dask is not simulated.

Each run's makespan is divided by the preemptive lower bound of its case
(broker.reports.makespan_lower_bound; with a worker that changes speed, the
same bound over the work each worker can do by then). Wasted work is the
seconds spent on copies whose result was thrown away (a backup's loser).

    python tools/bench_peers.py [--repeat 3] [--case straggler ...] [--system broker ...]
                                [--json results.json] [--markdown table.md] [--update-readme README.md]
"""

from __future__ import annotations

import io
import json
import logging
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import zmq
from bench_report import machine, replace_block
from rich.console import Console
from simulate import ESM_4090_SECONDS, FILE_RESIDUES, sample_costs

from broker import protocol
from broker.reports import makespan_lower_bound
from broker.security import serve_securely, user_key_pair
from broker.simulator import SimJob, SimWorker, pull_queue_makespan, simulate
from virnucpro.backends.synthetic import SyntheticBackend
from virnucpro.client.embed import plan_job, run_job
from virnucpro.client.local import LocalCluster, free_loopback_address
from virnucpro.worker.publish import publish

RTX_3090 = "NVIDIA GeForce RTX 3090"
RECORD = 100  # residues per FASTA record of the generated inputs
SETTLE = 1.0  # seconds between runs
SYSTEMS = ("broker", "pull queue", "static", "dask")


@dataclass(frozen=True)
class PeerWorker:
    """A synthetic worker: the GPU name it reports, its true speed, and an optional speed change."""

    gpu: str
    speed: float  # residues/s
    change: tuple[float, float] | None = None  # (seconds after its first file starts, new speed)

    def worker_options(self) -> list[str]:
        options = ["--synthetic-speed", str(self.speed), "--gpu-name", self.gpu]
        if self.change is not None:
            options += ["--synthetic-speed-change", f"{self.change[0]}:{self.change[1]}"]
        return options


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    costs: tuple[int, ...]
    workers: tuple[PeerWorker, ...]
    weights: dict[str, float] = field(default_factory=dict)  # a weight table for GPUs the built-in one lacks
    simulated: bool = False  # run in simulated time only (production size)

    def bound(self) -> float:
        return lower_bound(self.costs, self.workers)


def spread(unit: int, count: int, seed: int) -> tuple[int, ...]:
    """`count` files of unit x 1..10 residues, shuffled with a fixed seed."""
    multiples = [1 + i % 10 for i in range(count)]
    random.Random(seed).shuffle(multiples)
    return tuple(unit * m for m in multiples)


def production_case() -> Case:
    """1,760 ESM-2 files (tools/simulate.py's sample) on an RTX 3090, a 4090 really 1.8 and an H100 really 3.4."""
    per_weight = FILE_RESIDUES / ESM_4090_SECONDS / 1.5
    workers = (PeerWorker("RTX 3090", per_weight), PeerWorker("RTX 4090", 1.8 * per_weight),
               PeerWorker("H100", 3.4 * per_weight))
    return Case("production", "1,760 ESM-2 files, RTX 3090 + 4090 + H100, table wrong (4090 is 1.8, H100 3.4); "
                "simulated", tuple(sample_costs(1760, seed=1)), workers, simulated=True)


CASES: dict[str, Case] = {case.key: case for case in (
    Case("mixed", "60 files of 250-2,500 residues, 3 workers named RTX 3090, true speeds 2000/2000/6000",
         spread(250, 60, seed=11), (PeerWorker(RTX_3090, 2000), PeerWorker(RTX_3090, 2000), PeerWorker(RTX_3090, 6000))),
    Case("straggler", "straggler: speeds 1,000 and 10,000, two files of 10,000 residues",
         (10_000, 10_000), (PeerWorker(RTX_3090, 1000), PeerWorker(RTX_3090, 10_000))),
    Case("few-large", "9 files of 4,000-12,000 residues on 3 workers at 1:2:4 (weights 1:2:3.3)",
         tuple(random.Random(9).sample(range(4000, 12_001, 1000), 9)),
         (PeerWorker("bench 1x", 2000), PeerWorker("bench 2x", 4000), PeerWorker("bench 3.3x", 8000)),
         weights={"bench 1x": 1.0, "bench 2x": 2.0, "bench 3.3x": 3.3}),
    Case("slowdown", "4 equal workers (3,000 residues/s), 60 files of 250-2,500 residues; one slows to a third "
         "halfway", spread(250, 60, seed=11),
         (PeerWorker(RTX_3090, 3000), PeerWorker(RTX_3090, 3000), PeerWorker(RTX_3090, 3000),
          PeerWorker(RTX_3090, 3000, change=(sum(spread(250, 60, seed=11)) / 12_000 / 2, 1000)))),
    production_case(),
)}


def lower_bound(costs: Sequence[int], workers: Sequence[PeerWorker]) -> float:
    """The preemptive lower bound; with a speed change, the least t by which each k largest files fit the work
    the k fastest workers can do (the fastest at each moment) by t, found by bisection."""
    if all(w.change is None for w in workers):
        return makespan_lower_bound(costs, [w.speed for w in workers])
    largest = sorted(costs, reverse=True)
    prefixes = [sum(largest[:k]) for k in range(1, len(largest) + 1)]

    def feasible(t: float) -> bool:
        # The speeds are constant between the change times: integrate the k fastest over each stretch.
        times = sorted({0.0, t, *(min(t, w.change[0]) for w in workers if w.change)})
        capacity = [0.0] * len(workers)
        for start, end in zip(times, times[1:], strict=False):
            speeds = sorted((w.change[1] if w.change and start >= w.change[0] else w.speed for w in workers),
                            reverse=True)
            running = 0.0
            for k, speed in enumerate(speeds):
                running += speed
                capacity[k] += running * (end - start)
        top = capacity[-1]
        return all(work <= (capacity[k] if k < len(capacity) else top) for k, work in enumerate(prefixes))

    low, high = 0.0, sum(costs) / min(min(w.speed, w.change[1] if w.change else w.speed) for w in workers)
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if feasible(middle) else (middle, high)
    return high


def write_inputs(directory: Path, costs: Sequence[int]) -> list[Path]:
    """One FASTA file per cost, of records of up to RECORD residues."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, cost in enumerate(costs):
        path = directory / f"file_{i:03d}.fa"
        lengths = [RECORD] * (cost // RECORD) + ([cost % RECORD] if cost % RECORD else [])
        path.write_text("".join(f">f{i}_{r}\n{('ACGT' * RECORD)[:n]}\n" for r, n in enumerate(lengths)))
        paths.append(path)
    return paths


@dataclass
class Run:
    makespan: float
    wasted: float = 0.0
    outputs: dict[str, bytes] = field(default_factory=dict)


def read_outputs(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.json")) if p.name != "run_report.json"}


# ----------------------------------------------------------------- this broker


def run_broker(case: Case, files: list[Path], root: Path, *, steal: bool) -> Run:
    """One job through this broker with `--weighted` (and `--steal`), from a fresh broker and workers."""
    with LocalCluster(root / "logs") as cluster:
        options = ["--throughput-log", str(root / "throughput.jsonl")]
        if case.weights:
            table = root / "weights.toml"
            table.write_text("[weights]\n" + "".join(f'"{name}" = {w}\n' for name, w in case.weights.items()))
            options += ["--gpu-weights", str(table)]
        cluster.start_broker(*options)
        for n, worker in enumerate(case.workers):
            cluster.start_worker(f"w{n}", *worker.worker_options())
        cluster.wait_for_workers(len(case.workers), "synthetic", timeout=60)
        plan = plan_job("synthetic", files, root / "out")
        with cluster.client() as client:
            report = run_job(client, plan, weighted=True, steal=steal, console=Console(file=io.StringIO()),
                             transfer="never")  # a shared file system, as for the other systems
    if report["done"] != len(files):
        raise RuntimeError(f"{case.key}: the broker finished {report['done']} of {len(files)} files")
    return Run(report["makespan"], report.get("wasted_seconds", 0.0), read_outputs(root / "out"))


# ------------------------------------------------------------------ pull queue


class PullQueue:
    """A plain pull queue speaking the worker protocol: each idle worker gets the largest file left.

    It starts handing out files once `expected` workers have registered and
    asked for work, and times the job from that moment to the last `done`.
    """

    def __init__(self, files: list[dict[str, Any]], expected: int, output_dir: Path) -> None:
        self.todo = sorted(files, key=lambda f: (-f["residues"], f["path"]))
        self.output_dir = str(output_dir)
        self.expected = expected
        self.address = free_loopback_address()
        self.started = 0.0
        self.finished: float | None = None
        self.error: str | None = None
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # The workers connect with the user's own key, as to a broker started here: serve with it too.
        keys = user_key_pair()
        self._authenticator = serve_securely(self._context, self._socket, keys, [keys.name])
        self._socket.bind(self.address)

    def serve(self, stop: threading.Event) -> None:
        idle: list[bytes] = []
        registered: set[bytes] = set()
        running: set[str] = set()  # tasks handed out and not yet reported
        left = len(self.todo)
        try:
            while not stop.is_set() and self.finished is None:
                if not self._socket.poll(100):
                    continue
                identity, frame = self._socket.recv_multipart()
                message = protocol.decode(frame)
                kind = message["type"]
                if kind == "register":
                    registered.add(identity)
                    self._send(identity, "registered", worker=identity.hex(), name=message["name"], weight=1.0,
                               heartbeat_interval=1.0)
                elif kind == "heartbeat":
                    self._send(identity, "ack")
                elif kind == "request":  # it may still publish the file it names as finishing: its done follows
                    idle.append(identity)
                elif kind == "done":
                    running.remove(message["task"])
                    left -= 1
                    if left == 0:
                        self.finished = time.monotonic()
                elif kind == "failed":
                    self.error = f"a worker failed {message['task']}: {message['reason']}"
                    return
                if not self.started and len(registered) >= self.expected and len(idle) >= self.expected:
                    self.started = time.monotonic()
                while self.started and idle and self.todo:
                    worker, spec = idle.pop(0), self.todo.pop(0)
                    running.add(spec["path"])
                    self._send(worker, "assign", task=spec["path"], job="pull", stage="synthetic",
                               path=spec["path"], output_dir=self.output_dir, output=spec["output"])
        finally:
            self._socket.close(0)
            self._authenticator.stop()
            self._context.term()

    def _send(self, identity: bytes, kind: str, **fields: Any) -> None:
        self._socket.send_multipart([identity, protocol.encode(kind, **fields)])


def run_pull_queue(case: Case, files: list[Path], root: Path) -> Run:
    plan = plan_job("synthetic", files, root / "out")
    server = PullQueue(plan.todo, len(case.workers), plan.output_dir)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    cluster = LocalCluster(root / "logs")
    cluster.address = server.address
    try:
        for n, worker in enumerate(case.workers):
            cluster.start_worker(f"w{n}", *worker.worker_options())
        deadline = time.monotonic() + 120 + 10 * case.bound()
        while server.finished is None and server.error is None:
            problem = cluster.failure()
            if problem or time.monotonic() > deadline:
                raise RuntimeError(f"{case.key}: the pull queue did not finish: {problem or 'timed out'}")
            time.sleep(0.05)
    finally:
        stop.set()
        cluster.close()
        thread.join(5)
    if server.error:
        raise RuntimeError(f"{case.key}: {server.error}")
    assert server.finished is not None
    return Run(server.finished - server.started, 0.0, read_outputs(root / "out"))


# ------------------------------------------------------------------------ Dask

def dask_task(path: str, output: str, workers: dict[str, PeerWorker]) -> tuple[float, float]:
    """Run one file on the Dask worker this task landed on, at that worker's speed; (start, end) Unix seconds.

    The worker keeps its synthetic device between tasks, so a speed change
    counts from its first file, as `virnucpro worker` counts it.
    """
    from distributed import get_worker

    worker = get_worker()
    name = str(worker.name)
    kept = vars(worker)
    if "bench_device" not in kept:
        kept["bench_device"] = SyntheticBackend(workers[name].speed, workers[name].change)
    backend = kept["bench_device"]
    start = time.time()
    final = Path(output)
    temporary = final.with_name(f".{final.name}.{name}.tmp")
    try:
        backend.run(Path(path), temporary)
        publish(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    return start, time.time()


def dask_missing() -> str | None:
    try:
        import distributed  # noqa: F401
    except ImportError:
        return "Dask is not installed: pip install -e '.[bench]' (or pip install 'dask[distributed]')"
    return None


def run_dask(case: Case, files: list[Path], root: Path) -> Run:
    from distributed import Client
    from distributed import LocalCluster as DaskCluster

    plan = plan_job("synthetic", files, root / "out")
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    workers = {str(n): worker for n, worker in enumerate(case.workers)}
    with DaskCluster(n_workers=len(workers), threads_per_worker=1, processes=True, dashboard_address=None,
                     silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.wait_for_workers(len(workers))
        client.run(lambda: None)  # every worker up and answering before the clock starts
        started = time.time()
        futures = [client.submit(dask_task, f["path"], f["output"], workers, priority=f["residues"], pure=False)
                   for f in plan.todo]
        ends = [end for _, end in client.gather(futures)]
    return Run(max(ends) - started, 0.0, read_outputs(root / "out"))


# ------------------------------------------------------------------ simulation


def run_simulated(case: Case, system: str) -> Run | None:
    speeds = [w.speed for w in case.workers]
    if system == "pull queue":
        return Run(pull_queue_makespan(case.costs, [SimWorker(f"gpu{n}", 1.0, speed) for n, speed in enumerate(speeds)]))
    if system == "dask":
        return None
    from virnucpro.pipeline.gpu_weights import load_weight_table

    table = load_weight_table()
    workers = [SimWorker(f"gpu{n}", table.lookup(w.gpu), w.speed) for n, w in enumerate(case.workers)]
    result = simulate(workers, [SimJob("job", case.costs, weighted=True, steal=system == "broker")],
                      horizon=100 * sum(case.costs) / max(speeds))
    report = result.reports["job"]
    return Run(report["makespan"], report.get("wasted_seconds", 0.0))


# ---------------------------------------------------------------------- driver


def run_one(case: Case, system: str) -> Run | None:
    if case.simulated:
        return run_simulated(case, system)
    with tempfile.TemporaryDirectory(prefix=f"bench-peers-{case.key}-") as scratch:
        root = Path(scratch)
        files = write_inputs(root / "inputs", case.costs)
        if system == "broker":
            return run_broker(case, files, root, steal=True)
        if system == "static":
            return run_broker(case, files, root, steal=False)
        if system == "pull queue":
            return run_pull_queue(case, files, root)
        return run_dask(case, files, root)


def summarize(case: Case, runs: list[Run]) -> dict[str, Any]:
    bound = case.bound()
    ratios = sorted(r.makespan / bound for r in runs)
    return {"ratio_median": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
            "makespan_median_s": statistics.median(r.makespan for r in runs),
            "wasted_median_s": statistics.median(r.wasted for r in runs), "runs": len(runs)}


def markdown(results: dict[str, Any]) -> str:
    systems = results["systems"]
    header = "| case | bound | " + " | ".join(systems) + " |"
    lines = [header, "|" + "---|" * (len(systems) + 2)]
    for case in results["cases"].values():
        cells = []
        for system in systems:
            row = case["systems"].get(system)
            if row is None:
                cells.append("n/a")
                continue
            cell = f"{row['ratio_median']:.3f}"
            if row["runs"] > 1:
                cell += f" ({row['ratio_min']:.3f}-{row['ratio_max']:.3f})"
            if row["wasted_median_s"] > 0:
                cell += f", {row['wasted_median_s']:.2f} s wasted"
            cells.append(cell)
        bound = case["bound_s"]
        bound_text = f"{bound:.2f} s" if bound < 600 else f"{bound / 3600:.2f} h"
        lines.append(f"| {case['title']} | {bound_text} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--repeat", default=3, show_default=True, help="Runs per case and system (real processes).")
@click.option("--case", "cases", multiple=True, type=click.Choice(sorted(CASES)), help="Only these cases.")
@click.option("--system", "systems", multiple=True, type=click.Choice(SYSTEMS), help="Only these systems.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--update-readme", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Replace the bench_peers table of this README.")
def main(repeat: int, cases: tuple[str, ...], systems: tuple[str, ...], json_path: Path | None,
         markdown_path: Path | None, update_readme: Path | None) -> None:
    """Run each case through each system and print makespan / lower bound (median and range) and wasted work."""
    chosen = [CASES[key] for key in (cases or CASES)]
    systems = systems or SYSTEMS
    missing = dask_missing() if "dask" in systems else None
    if missing:
        click.echo(missing, err=True)
        systems = tuple(s for s in systems if s != "dask")
    results: dict[str, Any] = {"machine": machine(), "repeat": repeat, "systems": list(systems), "cases": {}}
    runs: dict[tuple[str, str], list[Run]] = {}
    for rep in range(repeat):
        for case in chosen:
            if case.simulated and rep > 0:
                continue  # simulated time is deterministic: one run says it all
            # Each repetition starts with another system, so none always runs just after Dask's cluster
            # winds down (or any other stray load); a pause lets the previous run's processes exit.
            for system in systems[rep % len(systems):] + systems[:rep % len(systems)]:
                if not case.simulated:
                    time.sleep(SETTLE)
                run = run_one(case, system)
                if run is None:
                    continue
                runs.setdefault((case.key, system), []).append(run)
                click.echo(f"{case.key:10s} {system:10s} run {rep + 1}: makespan {run.makespan:8.2f} s, "
                           f"ratio {run.makespan / case.bound():.3f}, wasted {run.wasted:.2f} s", err=True)
    for case in chosen:
        outputs = [r.outputs for s in systems for r in runs.get((case.key, s), []) if r.outputs]
        if any(o != outputs[0] for o in outputs):
            raise click.ClickException(f"{case.key}: the systems' outputs differ; they must be byte-identical")
        results["cases"][case.key] = {
            "title": case.title, "bound_s": case.bound(),
            "systems": {s: summarize(case, runs[(case.key, s)]) for s in systems if (case.key, s) in runs},
        }
    table = markdown(results)
    click.echo(f"\nmakespan / lower bound, median of {repeat} (range); {results['machine']}\n\n{table}")
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    if markdown_path:
        markdown_path.write_text(table)
    if update_readme:
        replace_block(update_readme, "bench_peers", f"Makespan / lower bound, median of {repeat} (range), on "
                      f"{results['machine']}:\n\n{table}")


if __name__ == "__main__":
    main()
