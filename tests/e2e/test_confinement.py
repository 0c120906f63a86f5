"""Confined outputs and the sweep, with the real broker, workers and clients.

A worker writes only the output it derives from the job's directory, the
stage and the input's name; a directory no worker may write in is refused
where the job is made. What a worker killed mid-file leaves behind is
removed by the next job's planning, or by the next worker's start, and
what a live worker is writing never is.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from broker.client import BrokerError
from broker.protocol import ErrorCode
from tests.support.cluster import VIRNUCPRO, kill_hard
from tests.support.fasta import write_fasta
from virnucpro.client.embed import plan_job
from virnucpro.client.local import LocalCluster
from virnucpro.scratch import LOCK_SUFFIX, TASK, WORK


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return found


def words(text: str) -> str:
    """`text` with line breaks as spaces: the console wraps long messages."""
    return " ".join(text.split())


def scratch_dirs(directory: Path, prefix: str) -> set[Path]:
    return {p for p in directory.glob(f"{prefix}*") if p.is_dir()} if directory.is_dir() else set()


def embed_argv(address: str, output_dir: Path, files: list[Path], *flags: str) -> list[str]:
    return [VIRNUCPRO, "embed", "--broker", address, "--stage", "synthetic", "-o", str(output_dir), "--timeout", "60",
            *flags, *map(str, files)]


@contextmanager
def broker_here(tmp_path: Path, *options: str) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path / "logs") as cluster:
        cluster.start_broker("--throughput-log", str(tmp_path / "log.jsonl"), *options)
        yield cluster


# A broker whose workers are dead after 2 s of silence, so that a killed worker's file moves on quickly.
SHORT_LEASES = ("--worker-timeout", "2", "--heartbeat-interval", "0.2")


def test_an_input_named_bashrc_cannot_make_the_worker_write_bashrc(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    bashrc = write_fasta(home / ".bashrc", [40])
    honest = write_fasta(home / "reads.fa", [40])
    with broker_here(tmp_path, "--max-attempts", "1") as running:
        running.start_worker("w", "--synthetic-speed", "1e6")
        running.wait_for_workers(1, "synthetic", timeout=30)
        spec = {"sequences": 1, "residues": 40}
        with running.client(timeout=10) as client:
            job = client.request("submit", stage="synthetic", output_dir=str(home), weighted=False, steal=False, files=[
                {**spec, "path": str(bashrc), "output": str(home / ".bashrc")},  # what a hostile client would send
                {**spec, "path": str(honest), "output": str(home / "reads_synthetic.json")},
            ])["job"]
            report = wait_for(lambda: client.request("job", job=job)["report"], 30, "the job's end")
    assert isinstance(report, dict)
    assert bashrc.read_text().startswith(">")  # the input itself, untouched
    [failure] = report["failures"]
    assert failure["file"] == str(bashrc)
    assert f"the broker names the output '{home / '.bashrc'}', but a synthetic task of '{bashrc}' writes " \
           f"'{home / '.bashrc_synthetic.json'}'" in failure["attempts"][0]["reason"]
    assert sorted(p.name for p in home.iterdir()) == [".bashrc", "reads.fa", "reads_synthetic.json"]


def test_a_root_or_control_character_output_directory_is_refused_by_client_and_broker(tmp_path: Path) -> None:
    reads = write_fasta(tmp_path / "reads.fa", [40])
    spec = {"path": str(reads), "sequences": 1, "residues": 40}
    reasons = {}
    with broker_here(tmp_path) as running:
        running.start_worker("w", "--synthetic-speed", "1e6")
        running.wait_for_workers(1, "synthetic", timeout=30)
        to_root = subprocess.run(embed_argv(running.address, Path("/"), [reads]), capture_output=True, text=True,
                                 timeout=60)
        escaped = subprocess.run(embed_argv(running.address, tmp_path / "out\x1b[2J", [reads]), capture_output=True,
                                 text=True, timeout=60)
        with running.client(timeout=10) as client:
            for output_dir in ("/", "relative/out", str(tmp_path / "o\x00ut"), str(tmp_path / "o\nut")):
                with pytest.raises(BrokerError) as refused:
                    client.request("submit", stage="synthetic", output_dir=output_dir, weighted=False, steal=False,
                                   files=[{**spec, "output": output_dir.rstrip("/") + "/reads_synthetic.json"}])
                assert refused.value.code is ErrorCode.REJECTED_JOB
                reasons[output_dir] = str(refused.value)
    assert to_root.returncode == 1 and "output directory '/' is the root of the file system" in words(to_root.stderr)
    assert escaped.returncode == 1 and "holds the control character '\\x1b'" in words(escaped.stderr)
    assert not (tmp_path / "out\x1b[2J").exists()
    assert "is the root of the file system" in reasons["/"]
    assert "is not an absolute path" in reasons["relative/out"]
    assert "control character '\\x00'" in reasons[str(tmp_path / "o\x00ut")]
    assert "control character '\\n'" in reasons[str(tmp_path / "o\nut")]


def test_a_killed_workers_scratch_is_removed_by_the_next_jobs_planning_and_a_live_one_never(tmp_path: Path) -> None:
    out = tmp_path / "out"
    slow = write_fasta(tmp_path / "slow.fa", [100] * 8)  # 800 residues: 4 s at 200 residues/s
    later = write_fasta(tmp_path / "later.fa", [40])
    with broker_here(tmp_path, *SHORT_LEASES) as running:
        first = running.start_worker("first", "--synthetic-speed", "200")
        running.wait_for_workers(1, "synthetic", timeout=30)
        job = subprocess.Popen(embed_argv(running.address, out, [slow]), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        try:
            [dead] = wait_for(lambda: scratch_dirs(out, WORK), 30, "the first worker's scratch")
            kill_hard(first.process)  # while it writes slow.fa's output
            running.start_worker("second", "--synthetic-speed", "200")
            # The broker hands slow.fa to the second worker once the first one's lease runs out.
            [live] = wait_for(lambda: scratch_dirs(out, WORK) - {dead}, 30, "the second worker's scratch")
            assert dead.exists()
            swept = plan_job("synthetic", [later], out).swept
            assert not dead.exists() and not Path(f"{dead}{LOCK_SUFFIX}").exists()
            assert live.exists() and Path(f"{live}{LOCK_SUFFIX}").exists()
            _, stderr = job.communicate(timeout=120)
        finally:
            if job.poll() is None:
                job.kill()
    assert swept == [Path(f"{dead}{LOCK_SUFFIX}")]
    assert job.returncode == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["run_report.json", "slow_synthetic.json"]


def test_a_killed_workers_task_directory_is_removed_when_the_next_worker_starts(tmp_path: Path) -> None:
    temporary = tmp_path / "worker-tmp"
    temporary.mkdir()
    env = {"TMPDIR": str(temporary)}
    slow = write_fasta(tmp_path / "slow.fa", [100] * 8)
    with broker_here(tmp_path, *SHORT_LEASES) as running:
        first = running.start_worker("first", "--synthetic-speed", "200", env=env)
        running.wait_for_workers(1, "synthetic", timeout=30)
        job = subprocess.Popen(embed_argv(running.address, tmp_path / "out", [slow], "--transfer", "always"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            [dead] = wait_for(lambda: scratch_dirs(temporary, TASK), 30, "the first worker's task directory")
            kill_hard(first.process)  # while its file runs in the task directory
            assert dead.exists()
            second = running.start_worker("second", "--synthetic-speed", "200", env=env)
            wait_for(lambda: not dead.exists(), 30, "the second worker to remove the first one's task directory")
            _, stderr = job.communicate(timeout=120)
        finally:
            if job.poll() is None:
                job.kill()
    assert job.returncode == 0, stderr
    assert f"removed {dead}{LOCK_SUFFIX}, left by a worker that was killed" in second.log.read_text()
    assert list(temporary.iterdir()) == []
