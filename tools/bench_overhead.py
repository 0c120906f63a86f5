"""Benchmark: the broker's cost per assignment, beside a raw ROUTER/DEALER round trip.

A real broker process serves 16 in-process workers on loopback. Latency is
the time from a worker's `request` to its `assign`, one request at a time
(each followed by the worker's `done`); throughput is assignments per
second with all 16 workers asking at once (each `assign` answered with
`done` and the next `request`). The same two figures are measured against a
bare ROUTER echo process, so the broker's own share is visible.

    python tools/bench_overhead.py [--seconds 5] [--json results.json]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import zmq

from broker import protocol
from virnucpro.client.local import LocalCluster, free_loopback_address

WORKERS = 16


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def connect(context: zmq.Context, address: str, n: int) -> list[zmq.Socket]:
    sockets = []
    for i in range(n):
        s = context.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, f"bench-{i:02d}".encode())
        s.connect(address)
        sockets.append(s)
    return sockets


def recv_type(sock: zmq.Socket, kind: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not sock.poll(remaining * 1000):
            raise TimeoutError(f"no {kind} from the broker")
        message = protocol.decode(sock.recv())
        if message["type"] == kind:
            return message


def measure_broker(seconds: float, root: Path) -> dict[str, float]:
    files = 100_000  # more than both phases use; the submission stays under the 16 MiB message limit
    with LocalCluster(root / "logs") as cluster:
        cluster.start_broker("--throughput-log", str(root / "throughput.jsonl"), "--worker-timeout", "600")
        context = zmq.Context.instance()
        workers = connect(context, cluster.address, WORKERS)
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
    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    router.bind(address)
    while True:
        router.send_multipart(router.recv_multipart())


def measure_raw(seconds: float) -> dict[str, float]:
    address = free_loopback_address()
    server = subprocess.Popen([sys.executable, __file__, "--echo", address])
    try:
        context = zmq.Context.instance()
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


@click.command()
@click.option("--seconds", default=5.0, show_default=True, help="Duration of each measurement.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures here.")
@click.option("--echo", default=None, hidden=True, help="Run only the echo server on this address.")
def main(seconds: float, json_path: Path | None, echo: str | None) -> None:
    """Measure broker request-to-assignment latency and throughput against a raw ZeroMQ round trip."""
    if echo:
        echo_server(echo)
        return
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as scratch:
        broker = measure_broker(seconds, Path(scratch))
    raw = measure_raw(seconds)
    click.echo(f"broker, {WORKERS} workers: request->assign p50 {broker['latency_p50_ms']:.3f} ms, "
               f"p99 {broker['latency_p99_ms']:.3f} ms; {broker['assignments_per_s']:,.0f} assignments/s")
    click.echo(f"raw ROUTER/DEALER echo: round trip p50 {raw['latency_p50_ms']:.3f} ms, "
               f"p99 {raw['latency_p99_ms']:.3f} ms; {raw['round_trips_per_s']:,.0f} round trips/s")
    if json_path:
        json_path.write_text(json.dumps({"broker": broker, "raw": raw}, indent=2) + "\n")


if __name__ == "__main__":
    main()
