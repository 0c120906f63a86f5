"""Exit codes that tell the truth, and clients that outlast a broker's absence (real processes on loopback)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import zmq

from broker import protocol
from broker.security import credentials
from tests.e2e.test_broker import make_inputs
from tests.support.cluster import VIRNUCPRO, Cluster, cluster, kill_hard
from tests.support.fasta import write_fasta
from virnucpro.stages import is_complete


def restart_broker(c: Cluster) -> None:
    c.start_broker("--throughput-log", str(c.log), "--heartbeat-interval", "0.2", "--worker-timeout", "1.5",
                   address=c.address)


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s"
        time.sleep(0.05)


def one_line(text: str) -> str:
    return " ".join(text.split())


def outputs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*_synthetic.json"))


def test_an_input_truncated_after_submission_fails_as_changed_and_embed_exits_2(tmp_path):
    files = make_inputs(tmp_path / "in", [3000, 3000, 2000])
    with cluster(tmp_path) as c:
        c.add_worker("a", 2000)
        c.wait_for_workers(1)
        embed = c.start_embed(tmp_path / "out", files)
        wait_for(lambda: c.status()["jobs"], "the job was submitted")
        # The smallest file runs last: cut it to its first 5 records, still a valid FASTA file.
        write_fasta(files[2], [100] * 5, prefix="p2_")
        _, stderr = embed.communicate(timeout=90)
    assert embed.returncode == 2, stderr
    assert f"input changed since submission: {files[2]}" in stderr
    assert outputs(tmp_path / "out") == sorted(f"{f.stem}_synthetic.json" for f in files[:2])
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert [f["file"] for f in report["failures"]] == [str(files[2])]


def test_a_job_cancelled_by_another_client_exits_3_saying_who_cancelled(tmp_path):
    files = make_inputs(tmp_path / "in", [2000] * 6)
    with cluster(tmp_path) as c:
        c.add_worker("a", 2000)
        c.wait_for_workers(1)
        embed = c.start_embed(tmp_path / "out", files)
        wait_for(lambda: c.status()["jobs"], "the job was submitted")
        job = c.status()["jobs"][0]["job"]
        with c.client() as other:
            other.request("cancel", job=job, by="alice@lab pid 42")
        _, stderr = embed.communicate(timeout=60)
    assert embed.returncode == 3, stderr
    text = one_line(stderr)
    assert f"the synthetic job {job} was cancelled by alice@lab pid 42 (key " in text
    missing = 6 - len(outputs(tmp_path / "out"))
    assert missing > 0
    assert f"{missing} of 6 outputs are missing" in text
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert report["state"] == "cancelled" and report["cancelled_by"].startswith("alice@lab pid 42")


class LyingWorker:
    """A worker speaking the real protocol that answers every assignment with `done` and writes nothing."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        keys = credentials(environment=False)
        assert keys is not None
        keys.apply(socket)
        socket.connect(self.address)
        socket.send(protocol.encode("register", name="liar", host="here", gpu="NVIDIA GeForce RTX 3090",
                                    device="cuda:0", stages=["synthetic"], pid=os.getpid()))
        beat = time.monotonic()
        while not self.stop.is_set():
            if socket.poll(100):
                message = protocol.decode(socket.recv())
                if message["type"] == "registered":
                    socket.send(protocol.encode("request"))
                elif message["type"] == "assign":
                    socket.send(protocol.encode("done", task=message["task"], seconds=0.1, sequences=10,
                                                residues=1000, skipped=False))
                    socket.send(protocol.encode("request"))
            if time.monotonic() - beat > 0.2:
                socket.send(protocol.encode("heartbeat", task=None))
                beat = time.monotonic()
        socket.close(0)

    def __enter__(self) -> LyingWorker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def test_a_worker_that_says_done_without_writing_makes_embed_exit_2_naming_the_missing_outputs(tmp_path):
    files = make_inputs(tmp_path / "in", [1000] * 3)
    with cluster(tmp_path) as c, LyingWorker(c.address):
        c.wait_for_workers(1)
        result = c.embed(tmp_path / "out", files)
    assert result.returncode == 2, result.stderr
    assert "3 files failed" in result.stderr
    for file in files:
        assert f"  {file}\n" in result.stderr
    assert one_line(result.stderr).count("is not a complete output on disk") == 3
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert (report["done"], report["failed"]) == (0, 3)


def test_embed_waits_out_a_broker_down_for_20_s_within_its_timeout_and_completes(tmp_path):
    files = make_inputs(tmp_path / "in", [2000] * 8)
    with cluster(tmp_path) as c:
        c.add_worker("a", 4000)
        c.add_worker("b", 4000)
        c.wait_for_workers(2)
        embed = c.start_embed(tmp_path / "out", files, "--timeout", "60")
        wait_for(lambda: c.records("task_done"), "a file finished")
        kill_hard(c.broker.process)
        time.sleep(20)
        assert embed.poll() is None, "embed gave up while the broker was down"
        restart_broker(c)
        _, stderr = embed.communicate(timeout=120)
    assert embed.returncode == 0, stderr
    assert outputs(tmp_path / "out") == sorted(f"{f.stem}_synthetic.json" for f in files)


def test_a_broker_killed_and_restarted_12_times_during_one_job_lets_it_complete(tmp_path):
    files = make_inputs(tmp_path / "in", [1000] * 30)
    restarts = 12
    with cluster(tmp_path) as c:
        c.add_worker("a", 500)
        c.wait_for_workers(1)
        embed = c.start_embed(tmp_path / "out", files, "--timeout", "60")
        for _ in range(restarts):
            # Each time the client has submitted the job again to the new broker, kill that broker too.
            wait_for(lambda: c.status()["jobs"] or embed.poll() is not None, "the job was submitted", 90)
            assert embed.poll() is None, f"the job ended before the broker was killed again: {embed.communicate()}"
            kill_hard(c.broker.process)
            restart_broker(c)
        _, stderr = embed.communicate(timeout=180)
    assert embed.returncode == 0, stderr
    assert one_line(stderr).count("submitted what is not done yet") == restarts
    assert outputs(tmp_path / "out") == sorted(f"{f.stem}_synthetic.json" for f in files)


def test_a_job_whose_outputs_all_finished_while_the_broker_was_down_exits_0_without_resubmitting(tmp_path):
    files = make_inputs(tmp_path / "in", [2000, 2000])
    with cluster(tmp_path) as c:
        c.add_worker("a", 1000)
        c.wait_for_workers(1)
        embed = c.start_embed(tmp_path / "out", files, "--timeout", "60")
        wait_for(lambda: c.records("task_done") and c.status()["workers"][0]["running"], "the second file started")
        kill_hard(c.broker.process)  # the worker finishes the second file unheard
        wait_for(lambda: len(outputs(tmp_path / "out")) == 2, "the worker wrote the second output")
        restart_broker(c)
        _, stderr = embed.communicate(timeout=90)
        jobs = c.status()["jobs"]
    assert embed.returncode == 0, stderr
    assert "every output is complete on disk, so the job is finished here" in one_line(stderr)
    assert jobs == []
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert (report["done"], report["failed"]) == (2, 0) and report["finished_here"]


def unwritable_directory(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (for root, one in sysfs, which nobody writes)."""
    if os.geteuid() == 0:
        return Path("/sys/kernel")
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    return directory


def test_embed_into_an_unwritable_output_directory_exits_1_naming_it_and_submits_nothing(tmp_path):
    files = make_inputs(tmp_path / "in", [1000])
    out = unwritable_directory(tmp_path)
    with cluster(tmp_path) as c:
        c.add_worker("a", 20000)
        c.wait_for_workers(1)
        result = c.embed(out, files)
        jobs = c.status()["jobs"]
    assert result.returncode == 1
    assert f"error: {out}: the output directory is not writable" in one_line(result.stderr)
    assert "Traceback" not in result.stderr
    assert jobs == []


def test_predict_into_an_unwritable_output_directory_exits_1_naming_it(tmp_path):
    sample = write_fasta(tmp_path / "sample.fa", [600, 700])
    out = unwritable_directory(tmp_path) / "run"
    result = subprocess.run([VIRNUCPRO, "predict", str(sample), "-o", str(out), "--models", "tiny", "--workers", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"{out}" in one_line(result.stderr) and "not writable" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def small_disk(tmp_path):
    """An output directory on a 64 KiB tmpfs, which a few outputs fill."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    out = tmp_path / "small"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(out)], check=True)
    yield out
    subprocess.run(["umount", "-l", str(out)], check=False)


def test_a_disk_that_fills_mid_job_gives_every_reason_and_no_traceback_and_never_exit_0(tmp_path, small_disk):
    files = make_inputs(tmp_path / "in", [4000] * 30)
    with cluster(tmp_path) as c:
        c.add_worker("a", 40000)
        c.wait_for_workers(1)
        result = c.embed(small_disk, files)
    assert result.returncode == 2, result.stderr
    assert "No space left on device" in result.stderr
    assert "Traceback" not in result.stderr
    written = [p for p in small_disk.glob("*_synthetic.json")]
    assert 0 < len(written) < len(files)
    assert all(is_complete(p) for p in written)
