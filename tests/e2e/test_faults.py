"""Faults and hostile input end to end, with the real broker and workers on loopback: a read that never
returns, malformed and refused requests, floods of registrations, dead workers."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time

import msgpack
import zmq
from rich.console import Console

from broker.protocol import VERSION
from broker.security import credentials
from tests.e2e.test_broker import make_inputs
from tests.support.cluster import BROKER, cluster, kill_hard
from virnucpro.client.embed import plan_job, run_job


def test_a_fifo_nobody_writes_fails_on_the_task_timeout_while_every_other_file_finishes(tmp_path):
    files = make_inputs(tmp_path / "in", [3000] * 8)
    with cluster(tmp_path, broker_options=("--task-timeout", "2")) as c:
        workers = [c.add_worker("a", 20000), c.add_worker("b", 20000)]
        c.wait_for_workers(2)
        plan = plan_job("synthetic", files, tmp_path / "out")
        hung = files[0]  # the largest-first queue order puts it first on its worker, with files behind it
        hung.unlink()
        os.mkfifo(hung)  # its read blocks in open(): no batch ever starts, nothing checks for a revoke
        # Its fingerprint would refuse the FIFO before the read (its size is 0 now); without one the read hangs,
        # as on a dead network mount that still answers stat from its cache.
        del next(spec for spec in plan.todo if spec["path"] == str(hung))["fingerprint"]
        started = time.monotonic()
        with c.client() as client:
            report = run_job(client, plan, weighted=True, steal=False, console=Console(file=io.StringIO()))
        elapsed = time.monotonic() - started
        # Each worker stuck in the FIFO restarts itself (same process, fresh registration) and serves again.
        deadline = time.monotonic() + 30
        while sorted(w["alive"] for w in c.status()["workers"]) != [False] * 3 + [True] * 2:
            assert time.monotonic() < deadline, c.status()["workers"]
            time.sleep(0.1)
        assert all(worker.poll() is None for worker in workers)
        logs = "".join(child.log.read_text() for child in c.workers.values())
    assert (report["done"], report["failed"]) == (7, 1)
    (failure,) = report["failures"]
    assert failure["file"] == str(hung)
    assert len(failure["attempts"]) == 3 and failure["deaths"] == []
    assert all("no progress for 2 s" in a["reason"] and "--task-timeout" in a["reason"] for a in failure["attempts"])
    assert sorted(p.name for p in (tmp_path / "out").glob("*_synthetic.json")) == sorted(
        f"{f.stem}_synthetic.json" for f in files[1:]
    )
    assert elapsed < 60, f"the job took {elapsed:.0f} s"
    assert logs.count("restarting this worker") == 3


def request_raw(address: str, frames: list[bytes], timeout: float = 10.0) -> dict | None:
    """Send `frames` from a fresh DEALER and return the decoded reply, or None if none came within `timeout`."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    keys = credentials()  # the user's own, which the broker admits: what is sent reaches the decoder
    assert keys is not None
    keys.apply(dealer)
    try:
        dealer.connect(address)
        dealer.send_multipart(frames)
        if not dealer.poll(int(timeout * 1000)):
            return None
        return msgpack.unpackb(dealer.recv(), raw=False)
    finally:
        dealer.close(0)


def test_every_malformed_or_refused_request_gets_an_error_reply_naming_the_problem(tmp_path):
    spec = {"path": str(tmp_path / "a.fa"), "output": str(tmp_path / "out" / "a.json"), "sequences": 1,
            "residues": 100}
    cases = [
        ([b"\xc1\xc1 not msgpack"], "undecodable"),
        ([msgpack.packb([1, 2, 3])], "not a map"),
        ([msgpack.packb({"v": 99, "type": "status"})], "version"),
        ([msgpack.packb({"v": VERSION, "type": "no-such-type"})], "unknown message type"),
        ([msgpack.packb({"v": VERSION, "type": "ack"})], "sent by the broker"),
        ([msgpack.packb({"v": VERSION, "type": "submit", "stage": "esm", "output_dir": "/tmp", "files": "x",
                         "weighted": True, "steal": True})], "files"),
        ([msgpack.packb({"v": VERSION, "type": "status"}), b"extra frame"], "one frame"),
        ([msgpack.packb([None] * 300_000)], "max_array_len"),
        ([msgpack.packb({"v": VERSION, "type": "register", "name": "n" * 600, "host": "h", "gpu": "g", "device": "d",
                         "stages": ["synthetic"], "pid": 1})], "at most 512"),
        ([msgpack.packb({"v": VERSION, "type": "submit", "stage": "synthetic", "output_dir": str(tmp_path / "out"),
                         "files": [spec] * 4, "weighted": False, "steal": False})], "--max-queued-tasks"),
        ([b"x" * (17 * 1024 * 1024)], "oversized"),
    ]
    with cluster(tmp_path, broker_options=("--max-queued-tasks", "3")) as c:
        replies = [request_raw(c.address, frames) for frames, _ in cases]
        with c.client() as client:  # a normal client is still served
            assert client.request("status")["status"]["summary"]["workers"] == 0
    for (frames, expected), reply in zip(cases, replies, strict=True):
        assert reply is not None, f"no answer to {frames[0][:40]!r}"
        assert reply["type"] == "error" and expected in reply["reason"], (expected, reply)
    assert [r["code"] for r in replies[:-2]] == ["invalid_message"] * (len(cases) - 2)
    assert replies[-2]["code"] == "refused"


def test_fifteen_hundred_registrations_with_long_names_leave_a_small_status_and_a_working_broker(tmp_path):
    files = make_inputs(tmp_path / "in", [1000] * 3)
    with cluster(tmp_path) as c:
        for i in range(1500):  # each from its own connection, registered once and never heard from again
            name = f"{i:04d}" + "n" * 508
            registered = request_raw(c.address, [msgpack.packb({
                "v": VERSION, "type": "register", "name": name, "host": "h" * 512, "gpu": "g" * 512, "device": "d" * 512,
                "stages": ["synthetic"], "pid": i})])
            assert registered is not None and registered["type"] == "registered"
        c.add_worker("real", 20000)
        deadline = time.monotonic() + 60
        while (summary := c.status()["summary"])["workers"] < 1501:
            assert time.monotonic() < deadline, summary
            time.sleep(0.2)
        reply = request_raw(c.address, [msgpack.packb({"v": VERSION, "type": "status"})])
        size = len(msgpack.packb(reply))
        result = c.embed(tmp_path / "out", files)
        every = subprocess.run([BROKER, "status", "--broker", c.address, "--all", "--json"], capture_output=True,
                               text=True, timeout=60)
    assert size < 200_000, size
    assert result.returncode == 0, result.stderr
    assert every.returncode == 0, every.stderr
    listed = json.loads(every.stdout)["workers"]
    assert len(listed) == 1501 and len({w["worker"] for w in listed}) == 1501


def test_dead_workers_are_forgotten_after_forget_after(tmp_path):
    with cluster(tmp_path, broker_options=("--forget-after", "1")) as c:
        victim = c.add_worker("victim", 20000)
        c.add_worker("a", 20000)
        c.wait_for_workers(2)
        kill_hard(victim)
        deadline = time.monotonic() + 30
        while [w["worker"] for w in c.status()["workers"]] != ["a"]:
            assert time.monotonic() < deadline, c.status()["workers"]
            time.sleep(0.2)
        status = c.status()
    assert status["counters"]["dead workers forgotten"] == 1
    assert status["summary"]["workers"] == 1
