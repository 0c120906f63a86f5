"""Benchmark: the scheduler at scale (seeding, a whole simulated run, each assignment) and a real broker seeding.

In the core, no sockets: `--workers` GPUs (RTX 3090, 4090, A100 and H100 in
turn, true speeds as the table says) and `--files` ESM-2 files of
tools/simulate.py's sample:

- seeding: the time of the one event that packs the job onto the waiting workers;
- the whole run through broker.simulator, heartbeats and ticks every
  `--heartbeat` seconds; its wall time, and each assignment decision (a
  worker's request answered with a file) timed on its own: median and p99.

A real broker (`--real-workers` simulated worker connections in this process,
heartbeating every second, `--real-files` files submitted at once): how long
the submission takes to be accepted, the longest a worker waited for a
heartbeat's answer and a status request for its reply while the broker
seeded, and whether any worker was declared dead or told to register again.

    python tools/bench_seeding.py [--workers 1000] [--files 200000] [--real-workers 256] [--real-files 100000]
                                  [--json results.json] [--update-readme README.md]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click
import zmq
from bench_report import machine, replace_block
from simulate import ESM_4090_SECONDS, FILE_RESIDUES, sample_costs

from broker import protocol
from broker.events import Assign, Event, JobSubmitted, WorkerJoined, WorkRequested
from broker.reports import makespan_lower_bound
from broker.scheduler import Scheduler
from broker.security import credentials
from broker.simulator import STAGE, SimJob, SimWorker, file_specs, simulate
from virnucpro.client.local import LocalCluster
from virnucpro.pipeline.gpu_weights import load_weight_table

GPUS = ("RTX 3090", "RTX 4090", "A100", "H100")


def sim_workers(count: int) -> list[SimWorker]:
    table = load_weight_table()
    per_weight = FILE_RESIDUES / ESM_4090_SECONDS / 1.5
    return [SimWorker(f"gpu{n:04d}", table.lookup(GPUS[n % len(GPUS)]), table.lookup(GPUS[n % len(GPUS)]) * per_weight)
            for n in range(count)]


def measure_seeding(workers: list[SimWorker], files: int) -> dict[str, float]:
    """Seconds (wall and CPU) of the event that seeds `files` onto `workers`, all registered and waiting."""
    scheduler = Scheduler()
    for w in workers:
        scheduler.handle(WorkerJoined(w.id, w.id, "sim", f"GPU-{w.id}", w.weight, w.stages, 0.0))
        scheduler.handle(WorkRequested(w.id, 0.0))
    event = JobSubmitted("job", STAGE, "out/job", file_specs(sample_costs(files, seed=1), "job-"), True, True, 0.0)
    started, cpu = time.perf_counter(), time.process_time()
    out = scheduler.handle(event)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert sum(isinstance(i, Assign) for i in out) == len(workers)
    return {"wall_s": elapsed, "cpu_s": cpu}


class TimedScheduler(Scheduler):
    """A Scheduler that times each request it answers with a file."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.decisions: list[float] = []

    def handle(self, event: Event) -> list[Any]:
        if not isinstance(event, WorkRequested):
            return super().handle(event)
        started = time.perf_counter()
        out = super().handle(event)
        elapsed = time.perf_counter() - started
        if any(isinstance(i, Assign) for i in out):
            self.decisions.append(elapsed)
        return out


def measure_simulation(workers: list[SimWorker], files: int, heartbeat: float) -> dict[str, float]:
    costs = sample_costs(files, seed=1)
    scheduler = TimedScheduler(worker_timeout=max(10.0, 3 * heartbeat))
    started, cpu = time.perf_counter(), time.process_time()
    result = simulate(workers, [SimJob("job", costs, weighted=True, steal=True)], heartbeat_interval=heartbeat,
                      scheduler=scheduler, horizon=10 * sum(costs) / sum(w.speed for w in workers))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    report = result.reports["job"]
    decisions = sorted(scheduler.decisions)
    return {
        "wall_s": elapsed, "cpu_s": cpu, "makespan_ratio": report["makespan"] / makespan_lower_bound(costs, [w.speed for w in workers]),
        "decision_median_us": statistics.median(decisions) * 1e6,
        "decision_p99_us": decisions[int(0.99 * (len(decisions) - 1))] * 1e6, "decisions": len(decisions),
        "done": report["done"],
    }


# ----------------------------------------------------------- a real broker


class FakeWorkers:
    """`count` worker connections in one thread: they register, heartbeat every second, and hold what they get.

    Each heartbeat names the file it holds, as a real worker's does, so
    the broker sees busy workers, never lost assignments. Records how long each
    heartbeat waited for its `ack`, and every `reregister`.
    """

    def __init__(self, address: str, count: int) -> None:
        self.context = zmq.Context()
        self.sockets = []
        keys = credentials(environment=False)  # the user's own, which the broker started here admits
        for n in range(count):
            socket = self.context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.ROUTING_ID, f"fake-{n:04d}".encode())
            if keys is not None:
                keys.apply(socket)
            socket.connect(address)
            self.sockets.append(socket)
        self.holding: list[str | None] = [None] * count
        self.sent_at: list[float | None] = [None] * count
        self.ack_waits: list[float] = []
        self.reregistered = 0
        self.registered = 0
        self.stop = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        for n, socket in enumerate(self.sockets):
            poller.register(socket, zmq.POLLIN)
            socket.send(protocol.encode("register", name=f"fake-{n:04d}", host="bench", gpu="NVIDIA GeForce RTX 3090",
                                        device="cpu", stages=[STAGE], pid=0))
        index = {socket: n for n, socket in enumerate(self.sockets)}
        next_beat = time.monotonic() + 1.0
        while not self.stop.is_set():
            for socket, _ in poller.poll(20):
                n = index[socket]
                message = protocol.decode(socket.recv())
                kind = message["type"]
                if kind == "registered":
                    self.registered += 1
                    socket.send(protocol.encode("request"))
                elif kind == "assign":
                    self.holding[n] = message["task"]
                elif kind == "ack":
                    sent = self.sent_at[n]
                    if sent is not None:
                        self.ack_waits.append(time.monotonic() - sent)
                        self.sent_at[n] = None
                elif kind == "reregister":
                    self.reregistered += 1
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + 1.0
                for n, socket in enumerate(self.sockets):
                    if self.sent_at[n] is None:  # one heartbeat in flight at a time: its wait is the broker's delay
                        self.sent_at[n] = now
                        socket.send(protocol.encode("heartbeat", task=self.holding[n]))
        pending = [now - sent for sent in self.sent_at if sent is not None]
        self.ack_waits.extend(pending)  # unanswered at the end: waited at least this long
        for socket in self.sockets:
            socket.close(0)
        self.context.term()


def measure_real_broker(workers: int, files: int, root: Path) -> dict[str, Any]:
    with LocalCluster(root / "logs") as cluster:
        cluster.start_broker("--throughput-log", str(root / "throughput.jsonl"))
        fake = FakeWorkers(cluster.address, workers)
        thread = threading.Thread(target=fake.run, daemon=True)
        thread.start()
        try:
            with cluster.client(timeout=120) as client:
                deadline = time.monotonic() + 60
                while fake.registered < workers and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(2.0)  # a couple of heartbeats answered before the submission
                out = root / "out"
                specs = [{"path": f"/bench/in/f{i:06d}.fa", "output": str(out / f"f{i:06d}.json"), "sequences": c // 51,
                          "residues": c} for i, c in enumerate(sample_costs(files, seed=1))]
                status_waits: list[float] = []
                submitted = threading.Event()

                def probe() -> None:
                    with cluster.client(timeout=120) as prober:
                        while not submitted.is_set():
                            started = time.monotonic()
                            prober.request("status")
                            status_waits.append(time.monotonic() - started)
                            time.sleep(0.1)

                prober = threading.Thread(target=probe, daemon=True)
                started = time.monotonic()
                prober.start()
                client.request("submit", stage=STAGE, output_dir=str(out), files=specs, weighted=True, steal=True)
                accepted = time.monotonic() - started
                time.sleep(3.0)  # heartbeats and status answered after the seeding, too
                submitted.set()
                prober.join(120)
                status = client.request("status")["status"]
        finally:
            fake.stop.set()
            thread.join(30)
    return {
        "workers": workers, "files": files, "submit_accepted_s": accepted,
        "heartbeat_wait_max_s": max(fake.ack_waits), "heartbeat_wait_median_s": statistics.median(fake.ack_waits),
        "status_wait_max_s": max(status_waits), "status_requests": len(status_waits),
        # The status lists a page of workers; its summary counts them all.
        "alive_after": status["summary"]["alive"], "reregistered": fake.reregistered,
    }


def markdown(results: dict[str, Any]) -> str:
    core, real = results["core"], results.get("real")
    lines = [
        "| measure | figure |", "|---|---|",
        f"| seeding {core['files']:,} files onto {core['workers']:,} waiting workers (one event) | "
        f"{core['seeding']['wall_s']:.2f} s ({core['seeding']['cpu_s']:.2f} s of CPU) |",
        f"| the whole simulated run (heartbeats every {core['heartbeat_s']:g} s) | {core['simulation']['wall_s']:.1f} s "
        f"({core['simulation']['cpu_s']:.1f} s of CPU), makespan / bound {core['simulation']['makespan_ratio']:.3f} |",
        f"| one assignment decision (request answered with a file), median / p99 | "
        f"{core['simulation']['decision_median_us']:.1f} / {core['simulation']['decision_p99_us']:.1f} µs |",
    ]
    if real:
        lines += [
            f"| real broker: {real['files']:,} files submitted beside {real['workers']} heartbeating workers, "
            f"accepted after | {real['submit_accepted_s']:.2f} s |",
            f"| real broker: longest wait for a heartbeat's answer / a status reply meanwhile | "
            f"{real['heartbeat_wait_max_s']:.2f} / {real['status_wait_max_s']:.2f} s |",
            f"| real broker: workers declared dead or told to register again | "
            f"{real['workers'] - real['alive_after']} / {real['reregistered']} |",
        ]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--workers", default=1000, show_default=True)
@click.option("--files", default=200_000, show_default=True)
@click.option("--heartbeat", default=1.0, show_default=True, help="Simulated heartbeat and tick interval, seconds.")
@click.option("--real-workers", default=256, show_default=True, help="0: skip the real broker.")
@click.option("--real-files", default=100_000, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--update-readme", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Replace the bench_seeding table of this README.")
def main(workers: int, files: int, heartbeat: float, real_workers: int, real_files: int, json_path: Path | None,
         update_readme: Path | None) -> None:
    """Time seeding, a whole simulated run and each assignment at scale, and a real broker seeding a large job."""
    started_on = machine()
    fleet = sim_workers(workers)
    core: dict[str, Any] = {"workers": workers, "files": files, "heartbeat_s": heartbeat}
    core["seeding"] = measure_seeding(fleet, files)
    click.echo(f"seeding {files:,} files onto {workers:,} workers: {json.dumps(core['seeding'])}", err=True)
    core["simulation"] = measure_simulation(fleet, files, heartbeat)
    click.echo(f"whole simulation: {json.dumps(core['simulation'])}", err=True)
    results: dict[str, Any] = {"machine": started_on, "core": core}
    if real_workers:
        with tempfile.TemporaryDirectory(prefix="bench-seeding-") as scratch:
            results["real"] = measure_real_broker(real_workers, real_files, Path(scratch))
        click.echo(f"real broker: {json.dumps(results['real'])}", err=True)
    table = markdown(results)
    click.echo(table)
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    if update_readme:
        replace_block(update_readme, "bench_seeding", f"On {results['machine']}:\n\n{table}")


if __name__ == "__main__":
    main()
