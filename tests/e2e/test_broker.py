"""The broker, workers and embed client as real processes on loopback (synthetic stage)."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from rich.console import Console

from broker.client import BrokerError
from broker.protocol import VERSION, ErrorCode
from broker.records import TaskDone, WorkerSummary
from broker.security import credentials
from tests.support.cluster import BROKER, VIRNUCPRO, cluster, free_address, kill_hard
from tests.support.fasta import write_fasta
from virnucpro.client.embed import plan_job, run_job
from virnucpro.client.jobs import JobRun
from virnucpro.pipeline.gpu_weights import GPU_WEIGHTS


def make_inputs(directory: Path, sizes: list[int], record_length: int = 100) -> list[Path]:
    """One FASTA file per size, `size` residues in records of `record_length`."""
    directory.mkdir(parents=True, exist_ok=True)
    return [
        write_fasta(directory / f"part_{i:03d}.fa", [record_length] * (size // record_length), prefix=f"p{i}_")
        for i, size in enumerate(sizes)
    ]


def outputs_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "run_report.json"}


def test_weighted_seeding_gives_each_gpu_files_in_proportion_to_its_weight(tmp_path):
    files = make_inputs(tmp_path / "in", [2000] * 20)
    with cluster(tmp_path) as c:
        c.add_worker("slow", 40000, gpu="NVIDIA GeForce RTX 3090")
        c.add_worker("fast", 40000, gpu="NVIDIA GeForce RTX 4090")
        c.wait_for_workers(2)
        result = c.embed(tmp_path / "out", files, "--weighted", "--min-workers", "2")
        assert result.returncode == 0, result.stderr
        done = c.records("task_done")
    per_worker = {name: sum(r["worker"] == name for r in done) for name in ("slow", "fast")}
    assert per_worker == {"slow": 8, "fast": 12}
    assert not any(r["stolen"] for r in done)


def test_steal_moves_files_to_the_fast_worker_and_outputs_match_a_run_without_it(tmp_path):
    sizes = [1000 + (i * 700) % 3000 for i in range(24)]
    files = make_inputs(tmp_path / "in", sizes)
    with cluster(tmp_path) as c:
        for name, speed in (("a", 6000), ("b", 6000), ("fast", 36000)):
            c.add_worker(name, speed)
        c.wait_for_workers(3)
        static = c.embed(tmp_path / "static", files, "--weighted", "--min-workers", "3")
        assert static.returncode == 0, static.stderr
        static_done = c.records("task_done")
        stealing = c.embed(tmp_path / "steal", files, "--weighted", "--steal", "--min-workers", "3")
        assert stealing.returncode == 0, stealing.stderr
        steal_done = c.records("task_done")[len(static_done):]
    static_report = json.loads((tmp_path / "static" / "run_report.json").read_text())
    steal_report = json.loads((tmp_path / "steal" / "run_report.json").read_text())
    assert static_report["steals"] == 0 and not any(r["stolen"] for r in static_done)
    assert steal_report["steals"] > 0
    assert "fast" in {r["worker"] for r in steal_done if r["stolen"]}
    assert steal_report["makespan"] < static_report["makespan"]
    # Exactly one output per input, no temporary left, byte-identical across policies.
    static_outputs, steal_outputs = outputs_of(tmp_path / "static"), outputs_of(tmp_path / "steal")
    assert sorted(static_outputs) == sorted(f"{f.stem}_synthetic.json" for f in files)
    assert static_outputs == steal_outputs
    assert sorted(r["file"] for r in steal_done) == sorted(str(f) for f in files)


def test_a_straggling_worker_is_overtaken_by_a_backup_copy_and_outputs_match_a_run_without_backups(tmp_path):
    # Both claim to be an RTX 3090, so seeding gives each one file; the straggler needs 4 s for its file,
    # the fast worker 0.2 s for a copy.
    files = make_inputs(tmp_path / "in", [4000, 4000])
    with cluster(tmp_path) as c:
        c.add_worker("straggler", 1000)
        c.add_worker("fast", 20000)
        c.wait_for_workers(2)
        backed_up = c.embed(tmp_path / "backup", files, "--weighted", "--steal", "--min-workers", "2")
        assert backed_up.returncode == 0, backed_up.stderr
        backup_done = c.records("task_done")
        jobs = {j["job"]: j for j in c.status()["jobs"]}
        plain = c.embed(tmp_path / "plain", files, "--weighted", "--steal", "--no-backup", "--min-workers", "2")
        assert plain.returncode == 0, plain.stderr
        plain_done = c.records("task_done")[len(backup_done):]
    # Each file done exactly once in the log; the straggler's file was finished by the fast worker's backup copy.
    assert sorted(r["file"] for r in backup_done) == sorted(map(str, files))
    assert [(r["worker"], r["backup"]) for r in backup_done] == [("fast", False), ("fast", True)]
    report = json.loads((tmp_path / "backup" / "run_report.json").read_text())
    assert (report["backups"], report["backups_won"], report["done"]) == (1, 1, 2)
    assert report["wasted_seconds"] > 0  # the straggler's revoked copy
    assert jobs[report["job"]]["wasted_seconds"] == report["wasted_seconds"]
    # Without backups the straggler finishes its own file; the outputs are the same bytes.
    assert sorted(r["file"] for r in plain_done) == sorted(map(str, files))
    assert not any(r["backup"] for r in plain_done) and "straggler" in {r["worker"] for r in plain_done}
    assert json.loads((tmp_path / "plain" / "run_report.json").read_text())["backups"] == 0
    assert outputs_of(tmp_path / "backup") == outputs_of(tmp_path / "plain")
    assert len(outputs_of(tmp_path / "backup")) == 2


def test_killing_a_worker_mid_job_loses_no_file(tmp_path):
    files = make_inputs(tmp_path / "in", [3000] * 12)
    with cluster(tmp_path, worker_timeout=1.0) as c:
        victim = c.add_worker("victim", 4000)
        c.add_worker("a", 4000)
        c.add_worker("b", 4000)
        c.wait_for_workers(3)
        embed = c.start_embed(tmp_path / "out", files, "--min-workers", "3")
        deadline = time.monotonic() + 20
        while not any(w["worker"] == "victim" and w["running"] for w in c.status()["workers"]):
            assert time.monotonic() < deadline, "the victim never started a file"
            time.sleep(0.05)
        kill_hard(victim)
        _, stderr = embed.communicate(timeout=60)
        assert embed.returncode == 0, stderr
        status = c.status()
        done = c.records("task_done")
    assert {w["worker"]: w["alive"] for w in status["workers"]}["victim"] is False
    assert sorted(p.name for p in (tmp_path / "out").glob("*_synthetic.json")) == sorted(
        f"{f.stem}_synthetic.json" for f in files
    )
    assert sorted(r["file"] for r in done) == sorted(str(f) for f in files)


def test_a_file_that_always_fails_is_reported_after_three_attempts_and_the_rest_complete(tmp_path):
    files = make_inputs(tmp_path / "in", [1000] * 6)
    with cluster(tmp_path) as c:
        c.add_worker("a", 20000)
        c.add_worker("b", 20000)
        c.wait_for_workers(2)
        plan = plan_job("synthetic", files, tmp_path / "out")
        files[2].unlink()  # vanishes between submission and processing, as on an unmounted share
        with c.client() as client:
            report = run_job(client, plan, weighted=True, steal=True, console=Console(file=io.StringIO()))
    assert (report["done"], report["failed"]) == (5, 1)
    [failure] = report["failures"]
    assert failure["file"] == str(files[2])
    assert len(failure["attempts"]) == 3
    assert all("file not found" in attempt["reason"] for attempt in failure["attempts"])
    assert {a["worker"] for a in failure["attempts"]} == {"a", "b"}


def test_embed_exits_2_and_lists_the_file_that_failed_with_its_reasons(tmp_path):
    files = make_inputs(tmp_path / "in", [3000, 2000, 1000])
    with cluster(tmp_path) as c:
        c.add_worker("a", 3000)
        c.wait_for_workers(1)
        embed = c.start_embed(tmp_path / "out", files)
        deadline = time.monotonic() + 20
        while not c.status()["jobs"]:
            assert time.monotonic() < deadline, "the job was never submitted"
            time.sleep(0.05)
        # The smallest file runs last: corrupt it after the client measured it.
        files[2].write_bytes(b"\x00\x01binary garbage")
        _, stderr = embed.communicate(timeout=60)
    assert embed.returncode == 2
    assert "1 files failed; the reason of each attempt:" in stderr
    listed = stderr.split("the reason of each attempt:")[1].splitlines()
    assert listed[1] == f"  {files[2]}"
    assert f"a: InputChanged: input changed since submission: {files[2]} held" in listed[2]
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert (report["done"], report["failed"]) == (2, 1)


def test_garbage_on_the_broker_port_is_dropped_and_the_next_job_runs(tmp_path):
    files = make_inputs(tmp_path / "in", [1000] * 4)
    with cluster(tmp_path) as c:
        c.add_worker("a", 20000)
        c.wait_for_workers(1)
        host, port = c.address.removeprefix("tcp://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 40)
        context = zmq.Context.instance()
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        keys = credentials()  # the user's own, which the broker admits: the garbage reaches the decoder
        assert keys is not None
        keys.apply(dealer)
        dealer.connect(c.address)
        bad_messages = [
            [b"\xc1\xc1 not msgpack"],
            [msgpack.packb([1, 2, 3])],
            [msgpack.packb({"v": 99, "type": "status"})],
            [msgpack.packb({"v": VERSION, "type": "no-such-type"})],
            [msgpack.packb({"v": VERSION, "type": "done", "task": 7})],
            [msgpack.packb({"v": VERSION, "type": "submit", "stage": "esm", "output_dir": "/tmp", "files": "x",
                            "weighted": True, "steal": True})],
            [msgpack.packb({"v": VERSION, "type": "status"}), b"extra frame"],
            [b"x" * (17 * 1024 * 1024)],
        ]
        for frames in bad_messages:
            dealer.send_multipart(frames)
        time.sleep(0.5)
        dealer.close()
        result = c.embed(tmp_path / "out", files)
        status = c.status()
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out").glob("*_synthetic.json"))) == 4
    assert status["counters"]["invalid message"] >= 6
    assert status["counters"]["malformed frames"] >= 1


def test_throughput_log_records_carry_every_field_with_correct_values(tmp_path):
    files = make_inputs(tmp_path / "in", [1500, 3000, 4500, 6000])
    with cluster(tmp_path) as c:
        c.add_worker("ampere", 30000, gpu="NVIDIA GeForce RTX 3090")
        c.add_worker("hopper", 60000, gpu="NVIDIA H100 80GB HBM3")
        c.wait_for_workers(2)
        started = time.time()
        result = c.embed(tmp_path / "out", files, "--weighted", "--steal", "--min-workers", "2")
        assert result.returncode == 0, result.stderr
        done, summaries = c.records("task_done"), c.records("worker_summary")
    assert len(done) == 4 and len(summaries) == 2
    sizes = {str(f): n for f, n in zip(files, [1500, 3000, 4500, 6000], strict=True)}
    for record in done:
        assert tuple(record) == TaskDone.keys()
        assert record["residues"] == sizes[record["file"]]
        assert record["sequences"] == sizes[record["file"]] // 100
        assert record["stage"] == "synthetic" and record["host"] == socket.gethostname()
        expected_weight = GPU_WEIGHTS["H100"] if record["worker"] == "hopper" else GPU_WEIGHTS["RTX 3090"]
        assert record["predicted_weight"] == expected_weight
        assert record["residues_per_s"] == pytest.approx(record["residues"] / record["seconds"])
        assert started <= record["time"] <= time.time()
        speed = 60000 if record["worker"] == "hopper" else 30000
        assert record["residues_per_s"] == pytest.approx(speed, rel=0.25)
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    sum_predicted = sum(s["predicted_weight"] for s in summaries)
    sum_speed = sum(s["residues_per_s"] for s in summaries)
    for summary in summaries:
        assert tuple(summary) == WorkerSummary.keys()
        mine = [r for r in done if r["worker"] == summary["worker"]]
        assert summary["files"] == len(mine)
        assert summary["residues"] == sum(r["residues"] for r in mine)
        assert summary["busy_seconds"] == pytest.approx(sum(r["seconds"] for r in mine))
        assert summary["observed_weight"] == pytest.approx(summary["residues_per_s"] * sum_predicted / sum_speed)
        row = next(w for w in report["workers"] if w["worker"] == summary["worker"])
        assert row["observed_weight"] == pytest.approx(summary["observed_weight"])


def test_resubmitting_skips_complete_outputs_and_redoes_a_truncated_one(tmp_path):
    files = make_inputs(tmp_path / "in", [1000] * 5)
    with cluster(tmp_path) as c:
        c.add_worker("a", 20000)
        c.wait_for_workers(1)
        first = c.embed(tmp_path / "out", files)
        assert first.returncode == 0, first.stderr
        truncated = tmp_path / "out" / "part_001_synthetic.json"
        truncated.write_text(truncated.read_text()[:20])
        (tmp_path / "out" / "part_003_synthetic.json").unlink()
        second = c.embed(tmp_path / "out", files)
        assert second.returncode == 0, second.stderr
        done = c.records("task_done")
    assert "3 of 5 files already have complete outputs; skipped" in second.stderr
    assert sorted(r["file"] for r in done[5:]) == [str(files[1]), str(files[3])]
    assert json.loads(truncated.read_text())["sequences"] == 10


def test_embed_without_a_reachable_broker_exits_1_naming_the_address(tmp_path):
    files = make_inputs(tmp_path / "in", [1000])
    address = free_address()
    result = subprocess.run(
        [VIRNUCPRO, "embed", "--broker", address, "--stage", "synthetic", "-o", str(tmp_path / "out"),
         "--timeout", "1", str(files[0])],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert f"no broker answered at {address} for 1 s" in " ".join(result.stderr.split())


def test_embed_with_a_bad_input_exits_1_naming_it_and_submits_nothing(tmp_path):
    files = make_inputs(tmp_path / "in", [1000])
    bad = tmp_path / "in" / "notes.txt"
    bad.write_text("not a fasta\n")
    result = subprocess.run(
        [VIRNUCPRO, "embed", "--broker", free_address(), "--stage", "synthetic", "-o", str(tmp_path / "out"),
         "--timeout", "1", str(files[0]), str(bad)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "notes.txt: not a FASTA file" in " ".join(result.stderr.split())


def test_status_json_lists_workers_jobs_and_counters(tmp_path):
    files = make_inputs(tmp_path / "in", [1000] * 2)
    with cluster(tmp_path) as c:
        c.add_worker("a", 20000, gpu="NVIDIA GeForce RTX 4090")
        c.wait_for_workers(1)
        assert c.embed(tmp_path / "out", files, "--weighted").returncode == 0
        result = subprocess.run([BROKER, "status", "--broker", c.address, "--json"],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    [worker] = status["workers"]
    assert (worker["worker"], worker["gpu"], worker["predicted_weight"]) == ("a", "NVIDIA GeForce RTX 4090", 1.5)
    assert worker["files_done"] == 2 and worker["observed_weight"] is not None
    [job] = status["jobs"]
    assert (job["state"], job["done"], job["files"]) == ("finished", 2, 2)
    assert "counters" in status and status["broker"]["address"] == c.address


def test_error_replies_carry_a_code_the_client_exposes(tmp_path):
    spec = {"path": str(tmp_path / "a.fa"), "output": "relative/a.json", "sequences": 1, "residues": 100}
    with cluster(tmp_path) as c, c.client() as client:
        with pytest.raises(BrokerError, match="unknown job 'no-such-job'") as unknown:
            client.request("job", job="no-such-job")
        with pytest.raises(BrokerError, match="is not an absolute path") as rejected:
            client.request("submit", stage="synthetic", output_dir="relative", files=[spec], weighted=False,
                           steal=False)
    assert unknown.value.code is ErrorCode.UNKNOWN_JOB
    assert rejected.value.code is ErrorCode.REJECTED_JOB


def test_a_broker_killed_mid_job_and_restarted_loses_no_finished_file(tmp_path):
    files = make_inputs(tmp_path / "in", [2000] * 10)
    with cluster(tmp_path) as c:
        c.add_worker("a", 4000)
        c.add_worker("b", 4000)
        c.wait_for_workers(2)
        embed = c.start_embed(tmp_path / "out", files, "--min-workers", "2")
        deadline = time.monotonic() + 30
        while len(c.records("task_done")) < 2:
            assert time.monotonic() < deadline, "no file finished before the broker was to be killed"
            time.sleep(0.05)
        kill_hard(c.broker.process)
        finished_before = {r["file"] for r in c.records("task_done")}
        c.start_broker("--throughput-log", str(c.log), "--heartbeat-interval", "0.2", "--worker-timeout", "1.5",
                       address=c.address)
        _, stderr = embed.communicate(timeout=90)
        done = c.records("task_done")
    assert embed.returncode == 0, stderr
    assert "submitted what is not done yet" in stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*_synthetic.json")) == sorted(
        f"{f.stem}_synthetic.json" for f in files
    )
    # Files finished before the crash were not run again after it.
    assert not finished_before & {r["file"] for r in done[len(finished_before):]}


def follow(run: JobRun, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while run.poll() and run.report is None:
        assert time.monotonic() < deadline, f"the {run.stage} job did not end within {timeout:g} s"
        time.sleep(0.1)
    return run.report


def test_a_200000_file_submission_arrives_whole_in_chunks(tmp_path):
    """Far over one frame's worth of file specs (about 24 MB packed): sent as chunks, every file held in order."""
    out = tmp_path / "out"
    specs = [{"path": f"/data/sample/work/protein/output_{i}.fa", "output": str(out / f"output_{i}_synthetic.json"),
              "sequences": 10, "residues": 1000} for i in range(200_000)]
    with cluster(tmp_path) as c, c.client(timeout=60.0) as client:
        run = JobRun(client, "synthetic", out, weighted=True, steal=True)
        run.submit(specs)
        progress = run.poll()
        assert (progress.files, progress.done, progress.amount) == (200_000, 0, 200_000_000)
        [job] = c.status()["jobs"]
        assert (job["job"], job["files"], job["residues"], job["sealed"]) == (run.job, 200_000, 200_000_000, True)
        run.cancel()
        assert client.request("job", job=run.job)["state"] == "cancelled"


def test_an_open_job_takes_files_until_sealed_and_survives_a_broker_restart(tmp_path):
    files = make_inputs(tmp_path / "in", [2000] * 6)
    first, later = plan_job("synthetic", files[:4], tmp_path / "out"), plan_job("synthetic", files[4:], tmp_path / "out")
    with cluster(tmp_path) as c:
        c.add_worker("a", 4000)
        c.wait_for_workers(1)
        with c.client(timeout=2.0) as client:
            run = JobRun(client, "synthetic", first.output_dir, weighted=False, steal=False)
            run.submit(first.todo, open=True)
            deadline = time.monotonic() + 60
            while run.poll().done < 4:
                assert time.monotonic() < deadline, "the open job's first files did not finish"
                time.sleep(0.1)
            assert run.report is None  # every file is done, but it is not sealed
            kill_hard(c.broker.process)
            c.start_broker("--throughput-log", str(c.log), "--heartbeat-interval", "0.2", "--worker-timeout",
                           "1.5", address=c.address)
            run.add(later.todo)  # the restarted broker does not know the job: it is submitted again, open
            assert len(run.ids) == 2
            run.seal()
            report = follow(run)
        done = c.records("task_done")
    assert report["state"] == "finished" and report["files"] == 2  # the four finished before were not sent again
    assert sorted(p.name for p in (tmp_path / "out").glob("*_synthetic.json")) == sorted(
        f"{f.stem}_synthetic.json" for f in files)
    assert len(done) == 6 and len({r["file"] for r in done}) == 6
