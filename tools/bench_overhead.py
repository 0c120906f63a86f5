"""Benchmark: the broker's cost per assignment beside a raw ROUTER/DEALER round trip, and a worker's gap between files.

A real broker process serves 16 in-process workers on loopback, encrypted
and authenticated as by default (CURVE with the user's own key). Latency is
the time from a worker's `request` to its `assign`, one request at a time
(each followed by the worker's `done`); throughput is assignments per
second with all 16 workers asking at once (each `assign` answered with
`done` and the next `request`). The same two figures are measured against a
bare ROUTER echo process, so the broker's own share is visible.

The file gap is what a real worker loses between files: one synthetic
worker process runs many tiny files (1 ms each by default), and from the
broker's throughput log a file's start is its `time` minus its `seconds`
and its gap is that start minus the previous file's `time`. It holds the
worker's request and the round trip to the next assignment; the output is
published while the next file runs, and a file's `time` is when its output
was durable, so each gap also carries the difference between two files'
publishing times (its percentiles spread both ways; the mean, the whole
span less the files' own seconds over the gaps, does not).

    python tools/bench_overhead.py [--seconds 5] [--gap-files 200] [--json results.json]
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import zmq

from broker import protocol
from broker.security import Credentials, credentials
from virnucpro.client.embed import plan_job
from virnucpro.client.local import LocalCluster, free_loopback_address

WORKERS = 16
GAP_RESIDUES = 100  # per file
GAP_SPEED = 100_000.0  # residues per second: each file takes 1 ms


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def connect(context: zmq.Context, address: str, n: int, keys: Credentials | None = None) -> list[zmq.Socket]:
    """`n` DEALERs on `address`, with `keys` for a broker that admits them (the echo server is plain)."""
    sockets = []
    for i in range(n):
        s = context.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, f"bench-{i:02d}".encode())
        if keys is not None:
            keys.apply(s)
        s.connect(address)
        sockets.append(s)
    return sockets


def recv_type(sock: zmq.Socket, kind: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not sock.poll(int(remaining * 1000)):
            raise TimeoutError(f"no {kind} from the broker")
        message = protocol.decode(sock.recv())
        if message["type"] == kind:
            return message


def measure_broker(seconds: float, root: Path) -> dict[str, float]:
    files = 100_000  # more than both phases use; the submission stays under the 16 MiB message limit
    with LocalCluster(root / "logs") as cluster:
        cluster.start_broker("--throughput-log", str(root / "throughput.jsonl"), "--worker-timeout", "600")
        context: zmq.Context = zmq.Context.instance()
        workers = connect(context, cluster.address, WORKERS, credentials(environment=False))
        with cluster.client(timeout=30) as client:
            client.wait_until_up(30)
            for i, s in enumerate(workers):
                s.send(protocol.encode("register", name=f"bench-{i:02d}", host="bench", gpu="NVIDIA GeForce RTX 3090",
                                       device="cpu", stages=["synthetic"], pid=0))
                recv_type(s, "registered")
            out = root / "out"
            specs = [{"path": f"/nonexistent/f{i}.fa", "output": str(out / f"f{i}.json"), "sequences": 1,
                      "residues": 1000 + i % 977} for i in range(files)]
            client.request("submit", stage="synthetic", output_dir=str(out), files=specs, weighted=True,
                           steal=True, timeout=60)

        latencies = []
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            s = workers[i % WORKERS]
            started = time.perf_counter()
            s.send(protocol.encode("request"))
            task = recv_type(s, "assign")["task"]
            latencies.append(time.perf_counter() - started)
            s.send(protocol.encode("done", task=task, seconds=0.001, sequences=1, residues=1000, skipped=False))
            i += 1

        poller = zmq.Poller()
        for s in workers:
            poller.register(s, zmq.POLLIN)
            s.send(protocol.encode("request"))
        assignments = 0
        started = time.perf_counter()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for s, _ in poller.poll(1000):
                message = protocol.decode(s.recv())
                if message["type"] != "assign":
                    continue
                assignments += 1
                s.send(protocol.encode("done", task=message["task"], seconds=0.001, sequences=1, residues=1000,
                                       skipped=False))
                s.send(protocol.encode("request"))
        elapsed = time.perf_counter() - started
        for s in workers:
            s.close(0)
    return {
        "latency_p50_ms": percentile(latencies, 0.50) * 1e3,
        "latency_p99_ms": percentile(latencies, 0.99) * 1e3,
        "latency_samples": len(latencies),
        "assignments_per_s": assignments / elapsed,
    }


def echo_server(address: str) -> None:
    """A ROUTER that answers every frame with itself: the floor under any broker."""
    context: zmq.Context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    router.bind(address)
    while True:
        router.send_multipart(router.recv_multipart())


def measure_raw(seconds: float) -> dict[str, float]:
    address = free_loopback_address()
    server = subprocess.Popen([sys.executable, __file__, "--echo", address])
    try:
        context: zmq.Context = zmq.Context.instance()
        sockets = connect(context, address, WORKERS)
        payload = protocol.encode("request")
        for s in sockets:  # wait until the echo server answers
            for _ in range(100):
                s.send(payload)
                if s.poll(100):
                    s.recv()
                    break
        latencies = []
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            s = sockets[i % WORKERS]
            started = time.perf_counter()
            s.send(payload)
            s.recv()
            latencies.append(time.perf_counter() - started)
            i += 1
        poller = zmq.Poller()
        for s in sockets:
            poller.register(s, zmq.POLLIN)
            s.send(payload)
        trips = 0
        started = time.perf_counter()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for s, _ in poller.poll(1000):
                s.recv()
                trips += 1
                s.send(payload)
        elapsed = time.perf_counter() - started
        for s in sockets:
            s.close(0)
    finally:
        server.kill()
        server.wait()
    return {
        "latency_p50_ms": percentile(latencies, 0.50) * 1e3,
        "latency_p99_ms": percentile(latencies, 0.99) * 1e3,
        "round_trips_per_s": trips / elapsed,
    }


def measure_file_gaps(files: int, root: Path) -> dict[str, float]:
    """Gaps between consecutive files of one synthetic worker process, from the throughput log."""
    inputs = root / "inputs"
    inputs.mkdir()
    paths = []
    for i in range(files):
        path = inputs / f"f{i:05d}.fa"
        path.write_text(f">r{i}\n" + "ACGT" * (GAP_RESIDUES // 4) + "\n")
        paths.append(path)
    log = root / "throughput.jsonl"
    with LocalCluster(root / "logs") as cluster:
        cluster.start_broker("--throughput-log", str(log))
        cluster.start_worker("gap", "--synthetic-speed", str(GAP_SPEED))
        cluster.wait_for_workers(1, "synthetic", 60)
        plan = plan_job("synthetic", paths, root / "out")
        with cluster.client(timeout=30) as client:
            job = client.request("submit", stage="synthetic", output_dir=str(plan.output_dir), files=plan.todo,
                                 weighted=False, steal=False)["job"]
            deadline = time.monotonic() + 60 + files * 0.5
            while client.request("job", job=job)["report"] is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job} did not finish; see the logs in {root / 'logs'}")
                time.sleep(0.1)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    done = sorted((r for r in records if r["event"] == "task_done" and r["job"] == job), key=lambda r: r["time"])
    if len(done) != files:
        raise RuntimeError(f"{len(done)} of {files} files were logged done")
    gaps = [(r["time"] - r["seconds"]) - previous["time"] for previous, r in itertools.pairwise(done)]
    span = done[-1]["time"] - (done[0]["time"] - done[0]["seconds"])
    return {
        "gap_mean_ms": (span - sum(r["seconds"] for r in done)) / (files - 1) * 1e3,
        "files": files,
        "file_seconds": GAP_RESIDUES / GAP_SPEED,
        "gap_p50_ms": percentile(gaps, 0.50) * 1e3,
        "gap_p90_ms": percentile(gaps, 0.90) * 1e3,
        "gap_p99_ms": percentile(gaps, 0.99) * 1e3,
        "gap_max_ms": max(gaps) * 1e3,
    }


@click.command()
@click.option("--seconds", default=5.0, show_default=True, help="Duration of each measurement.")
@click.option("--gap-files", default=200, show_default=True, type=click.IntRange(min=2),
              help="Files run by the worker whose gap between files is measured.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures here.")
@click.option("--echo", default=None, hidden=True, help="Run only the echo server on this address.")
def main(seconds: float, gap_files: int, json_path: Path | None, echo: str | None) -> None:
    """Measure broker request-to-assignment latency and throughput against a raw ZeroMQ round trip,
    and a worker's gap between consecutive files."""
    if echo:
        echo_server(echo)
        return
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as scratch:
        broker = measure_broker(seconds, Path(scratch))
    raw = measure_raw(seconds)
    with tempfile.TemporaryDirectory(prefix="bench-gap-") as scratch:
        gap = measure_file_gaps(gap_files, Path(scratch))
    click.echo(f"broker, {WORKERS} workers: request->assign p50 {broker['latency_p50_ms']:.3f} ms, "
               f"p99 {broker['latency_p99_ms']:.3f} ms; {broker['assignments_per_s']:,.0f} assignments/s")
    click.echo(f"raw ROUTER/DEALER echo: round trip p50 {raw['latency_p50_ms']:.3f} ms, "
               f"p99 {raw['latency_p99_ms']:.3f} ms; {raw['round_trips_per_s']:,.0f} round trips/s")
    click.echo(f"worker, {gap['files']} files of {gap['file_seconds'] * 1e3:g} ms: gap between files "
               f"mean {gap['gap_mean_ms']:.3f} ms, p50 {gap['gap_p50_ms']:.3f} ms, p90 {gap['gap_p90_ms']:.3f} ms, "
               f"p99 {gap['gap_p99_ms']:.3f} ms, max {gap['gap_max_ms']:.3f} ms")
    if json_path:
        json_path.write_text(json.dumps({"broker": broker, "raw": raw, "file_gap": gap}, indent=2) + "\n")


if __name__ == "__main__":
    main()
