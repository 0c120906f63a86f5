"""The Slurm kit (examples/slurm) submitted with the real sbatch to a one-node Slurm started for these tests.

The node declares two GPUs; the workers stand in for them on the CPU
($VIRNUCPRO_STAND_IN_GPUS) with the tiny models, and every prediction is
compared byte for byte with a `virnucpro predict` run outside Slurm.
Skipped, with the reason, where Slurm is not installed (.ci/run installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.client import BrokerClient
from broker.security import SECRET_ENV, SERVER_KEY_ENV
from tests.support.slurm import SlurmCluster, unavailable
from virnucpro.client.local import free_loopback_address
from virnucpro.worker.gpus import STAND_IN_ENV

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "examples" / "slurm"
VIRNUCPRO = Path(sys.executable).with_name("virnucpro")
RESULTS = ("prediction_results.txt", "prediction_results_highestscore.csv")
PREDICT = ["--models", "tiny", "--expected-length", "500", "--sequences-per-file", "6", "--timeout", "120"]
RUN_TIMEOUT = 300  # one whole run on a loaded 2-core machine, Slurm's scheduling included
WORKER_TIMEOUT = 60  # the head's broker: a worker seen leaving sooner said goodbye


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What the jobs run with: this install first on PATH, the tiny models, stand-in GPUs, a private state."""
    home = tmp_path_factory.mktemp("home")
    from virnucpro.backends.tiny import ensure_tiny_models

    ensure_tiny_models(home / "cache" / "virnucpro" / "tiny-models")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("VIRNUCPRO_", "SLURM_"))
                   and k != "CUDA_VISIBLE_DEVICES"}
    environment.update(
        PATH=f"{VIRNUCPRO.parent}{os.pathsep}{environment['PATH']}", HOME=str(home),
        XDG_CACHE_HOME=str(home / "cache"), XDG_STATE_HOME=str(home / "state"), COLUMNS="160",
        VIRNUCPRO_WORKER_OPTIONS="--models tiny", VIRNUCPRO_PREDICT_OPTIONS=" ".join(PREDICT),
        **{STAND_IN_ENV: "2"},
    )
    return environment


@pytest.fixture(scope="module")
def reads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("input") / "reads.fa"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_example_reads.py"), str(path), "--reads", "60"],
                   check=True, capture_output=True, timeout=60)
    return path


@pytest.fixture(scope="module")
def expected(env: dict[str, str], reads: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The predictions of a run on this machine without Slurm."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = subprocess.run([str(VIRNUCPRO), "predict", str(reads), "-o", str(out), "--workers", "2", *PREDICT],
                            env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    return results(out)


def results(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in RESULTS}


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s"
        time.sleep(0.2)


def test_one_node_script_runs_broker_a_worker_per_gpu_and_predict_in_one_job(slurm, env, reads, expected, tmp_path):
    job = slurm.sbatch(KIT / "one-node.sbatch", str(reads), str(tmp_path / "out"), env=env, cwd=tmp_path,
                       options=("--gpus-per-node=2", "--cpus-per-task=2", f"--output={tmp_path / 'job.out'}"))
    ended = slurm.wait_ended(job, RUN_TIMEOUT)
    log = (tmp_path / "job.out").read_text()
    assert (ended["JobState"], ended["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert results(tmp_path / "out") == expected
    for gpu in (0, 1):  # one worker per GPU the job was given, its lines prefixed with its name
        assert f"{slurm.node}:cuda:{gpu}: " in log
    assert "stopping 2 worker(s)" in log


def test_a_requeued_worker_job_hands_its_files_to_the_other_and_the_run_finishes(
        slurm, env, reads, expected, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    head_env = {
        **env, "VIRNUCPRO_RUN_DIR": str(run_dir), "VIRNUCPRO_PORT": free_loopback_address().rsplit(":", 1)[1],
        # Two one-GPU worker jobs, so that one can be requeued while the other goes on.
        "VIRNUCPRO_WORKER_SBATCH_OPTIONS": f"--array=1-2 --nodes=1 --gpus-per-node=1 --cpus-per-task=1 "
                                           f"--output={tmp_path}/workers-%A_%a.out",
        "VIRNUCPRO_BROKER_OPTIONS": f"--worker-timeout {WORKER_TIMEOUT} --throughput-log {tmp_path / 'log.jsonl'}",
    }
    head = slurm.sbatch(KIT / "head.sbatch", str(reads), str(tmp_path / "out"), env=head_env, cwd=tmp_path,
                        options=("--cpus-per-task=1", f"--output={tmp_path / 'head.out'}"))
    wait_until(lambda: (run_dir / "address").exists() or slurm.ended(head), 60,
               "the head job published its broker's address")
    address = (run_dir / "address").read_text().strip()
    monkeypatch.setenv(SECRET_ENV, str(run_dir / "keys" / "client.key_secret"))
    monkeypatch.setenv(SERVER_KEY_ENV, str(run_dir / "keys" / "broker.key"))

    def workers() -> list[dict]:
        with BrokerClient(address, timeout=5.0) as client:
            return client.request("status")["status"]["workers"]

    def both_hold_files() -> bool:
        living = [w for w in workers() if w["alive"]]
        return len(living) == 2 and all(w["running"] or w["queue"] for w in living)

    wait_until(both_hold_files, 120, "both worker jobs' workers held files")
    worker_job = next(line.split("workers in job ")[1].split(",")[0]
                      for line in (tmp_path / "head.out").read_text().splitlines() if "workers in job " in line)
    slurm.requeue(f"{worker_job}_1")
    wait_until(lambda: sum(w["alive"] for w in workers()) == 1, WORKER_TIMEOUT / 2,
               "the requeued job's worker said goodbye to the broker")
    left_at = time.time()
    [survivor] = [w["worker"] for w in workers() if w["alive"]]
    wait_until(lambda: slurm.job(f"{worker_job}_1")["JobState"] == "PENDING", 30,
               "the requeued job waited in the queue to run again")

    ended = slurm.wait_ended(head, RUN_TIMEOUT)
    log = (tmp_path / "head.out").read_text()
    assert (ended["JobState"], ended["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert results(tmp_path / "out") == expected
    done = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    after = {r["worker"] for r in done if r["event"] == "task_done" and r["time"] > left_at}
    assert after == {survivor}, "a file was reported done by a worker that had left"
    # The head cancelled its worker jobs and deleted the secret keys on the way out.
    wait_until(lambda: not [j for j in slurm.jobs() if j.startswith(worker_job)], 30, "the worker jobs ended")
    assert not list((run_dir / "keys").glob("*.key_secret")) and not (run_dir / "address").exists()
