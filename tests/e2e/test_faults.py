"""Faults end to end: a file whose read never returns, with the real broker and workers on loopback."""

from __future__ import annotations

import io
import os
import time

from rich.console import Console

from tests.e2e.test_broker import make_inputs
from tests.support.cluster import cluster
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
