"""The broker's leases run on the monotonic clock: a wall clock stepped backwards moves only the times people read.

The broker runs in a thread of the test process with an injected wall clock
that the test steps back an hour; its peers are raw DEALER sockets on loopback.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker import protocol
from broker.client import BrokerClient
from broker.scheduler import Scheduler
from broker.server import BrokerServer, ThroughputLog
from virnucpro.pipeline.gpu_weights import load_weight_table

HOUR = 3600.0
WORKER_TIMEOUT = 1.0
# How late a death may be declared on a loaded machine: ticks every 0.1 s, status polled every 0.05 s.
LATE = 5.0


class SteppableWallClock:
    """time.time(), until the test steps it back."""

    def __init__(self) -> None:
        self.behind = 0.0

    def __call__(self) -> float:
        return time.time() - self.behind

    def step_back(self, seconds: float) -> None:
        self.behind += seconds


@contextmanager
def broker_in_thread(directory: Path, wall_clock: SteppableWallClock) -> Iterator[BrokerServer]:
    server = BrokerServer("tcp://127.0.0.1:*", Scheduler(worker_timeout=WORKER_TIMEOUT), load_weight_table(),
                          ThroughputLog(directory / "throughput.jsonl"), heartbeat_interval=0.1,
                          wall_clock=wall_clock)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(10)


@contextmanager
def raw_worker(address: str) -> Iterator[zmq.Socket]:
    """A DEALER registered as a worker serving the synthetic stage; it says nothing unless the test makes it."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(address)
    try:
        dealer.send(protocol.encode("register", name="silent", host="test", gpu="NVIDIA GeForce RTX 3090",
                                    device="cpu", stages=["synthetic"], pid=1))
        receive(dealer, "registered")
        yield dealer
    finally:
        dealer.close(0)


def receive(dealer: zmq.Socket, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while dealer.poll(max(0.0, deadline - time.monotonic()) * 1000):
        message = protocol.decode(dealer.recv())
        if message["type"] == kind:
            return message
    raise AssertionError(f"no {kind!r} from the broker within {timeout} s")


def worker_alive(client: BrokerClient) -> bool:
    (worker,) = client.request("status")["status"]["workers"]
    return worker["alive"]


def test_a_silent_worker_is_declared_dead_on_time_after_the_wall_clock_steps_back_an_hour(tmp_path):
    wall_clock = SteppableWallClock()
    with broker_in_thread(tmp_path, wall_clock) as server, BrokerClient(server.address, insecure=True) as client:
        with raw_worker(server.address):
            silent_since = time.monotonic()
            wall_clock.step_back(HOUR)
            assert worker_alive(client)
            while worker_alive(client) and time.monotonic() - silent_since < WORKER_TIMEOUT + LATE:
                time.sleep(0.05)
            declared_after = time.monotonic() - silent_since
    assert WORKER_TIMEOUT <= declared_after < WORKER_TIMEOUT + LATE


def test_log_and_report_times_follow_the_stepped_wall_clock_and_the_makespan_stays_the_elapsed_time(tmp_path):
    wall_clock = SteppableWallClock()
    output_dir = tmp_path / "out"
    spec = {"path": str(tmp_path / "a.fa"), "output": str(output_dir / "a.npy"), "sequences": 10, "residues": 1000}
    with broker_in_thread(tmp_path, wall_clock) as server, BrokerClient(server.address, insecure=True) as client:
        with raw_worker(server.address) as worker:
            job = client.request("submit", stage="synthetic", output_dir=str(output_dir), files=[spec],
                                 weighted=False, steal=False)["job"]
            started = time.monotonic()
            worker.send(protocol.encode("request"))
            task = receive(worker, "assign")["task"]
            wall_clock.step_back(HOUR)
            worker.send(protocol.encode("done", task=task, seconds=0.5, sequences=10, residues=1000, skipped=False))
            report = None
            while report is None and time.monotonic() - started < 10.0:
                report = client.request("job", job=job)["report"]
            elapsed = time.monotonic() - started
            now = wall_clock()
    assert report is not None, "the job never finished"
    (record,) = [json.loads(line) for line in (tmp_path / "throughput.jsonl").read_text().splitlines()
                 if json.loads(line)["event"] == "task_done"]
    # Unix seconds by the stepped clock, as a log written after the step must say.
    assert now - elapsed - 1.0 <= record["time"] <= now
    assert now - elapsed - 1.0 <= report["finished"] <= now
    assert 0.0 <= report["makespan"] <= elapsed + 1.0
    assert report["finished"] - report["submitted"] == pytest.approx(report["makespan"], abs=1e-5)
