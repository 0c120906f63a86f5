"""Open jobs in the scheduler core: files added after submission, sealing, and the refusals a client hears."""

from __future__ import annotations

import gc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import protocol
from broker.events import FilesAdded, JobSealed, JobSubmitted, Refused
from broker.protocol import ErrorCode
from broker.reports import job_progress
from broker.scheduler import InvariantError, Scheduler
from broker.server import file_specs
from tests.support.driver import Driver, added_specs, assigns, finished, log_records, of_type


def refusal(out: list) -> Refused:
    (refused,) = of_type(out, Refused)
    return refused


def open_job(*workers: tuple[str, float]) -> Driver:
    d = Driver()
    for name, weight in workers:
        d.join(name, weight)
    d.submit("j", [], sealed=False)
    return d


def test_an_open_job_with_every_file_done_runs_on_until_it_is_sealed():
    d = open_job(("a", 1.0))
    d.add("j", [100, 200])
    assert d.run_queue("a") == ["j:1", "j:0"]
    assert d.scheduler.jobs["j"].state == "running" and not finished(d.history)
    (ended,) = finished(d.seal("j", at=5.0))
    assert ended.report["state"] == "finished" and ended.report["done"] == 2 and ended.report["finished"] == 5.0


def test_a_sealed_job_finishes_with_its_last_file():
    d = open_job(("a", 1.0))
    d.add("j", [100])
    d.seal("j")
    (given,) = assigns(d.request("a"))
    assert finished(d.succeed("a", given.task))


def test_added_files_are_seeded_by_weight_like_submitted_ones():
    d = open_job(("slow", 1.0), ("fast", 3.0))
    d.add("j", [100] * 8)
    held = {w: len(d.scheduler.workers[w].queue) for w in ("slow", "fast")}
    assert held == {"slow": 2, "fast": 6}
    assert all(task.seeded_to == task.owner for task in d.scheduler.jobs["j"].tasks)


def test_a_file_added_to_a_running_job_is_assigned_to_a_waiting_worker_at_once():
    d = open_job(("a", 1.0))
    assert not assigns(d.request("a"))
    (given,) = assigns(d.add("j", [100]))
    assert (given.worker, given.task) == ("a", "j:0")


def test_added_files_take_the_next_indices_and_keep_their_paths():
    d = open_job(("a", 1.0))
    d.add("j", [100, 200])
    d.add("j", [300])
    tasks = d.scheduler.jobs["j"].tasks
    assert [(t.id, t.index, t.spec.path) for t in tasks] == [("j:0", 0, "j-0.fa"), ("j:1", 1, "j-1.fa"),
                                                             ("j:2", 2, "j-2.fa")]


def test_a_chunk_sent_again_after_a_lost_reply_is_not_added_twice():
    d = open_job(("a", 1.0))
    d.add("j", [100, 200])
    out = d.add("j", [100, 200], first=0)
    assert out == [] and len(d.scheduler.jobs["j"].tasks) == 2
    assert d.scheduler.counters["chunk added twice"] == 1


def test_a_chunk_naming_files_the_job_holds_otherwise_is_refused():
    d = open_job(("a", 1.0))
    d.add("j", [100, 200])
    refused = refusal(d.add("j", [999], first=1))
    assert refused.code == ErrorCode.REJECTED_JOB.value and "holds other files at 1" in refused.reason


def test_a_chunk_leaving_a_gap_is_refused_and_says_where_to_start():
    d = open_job(("a", 1.0))
    d.add("j", [100])
    refused = refusal(d.add("j", [200], first=3))
    assert "the next chunk must start at 1, not 3" in refused.reason
    assert len(d.scheduler.jobs["j"].tasks) == 1


def test_files_added_to_a_sealed_or_cancelled_job_are_refused():
    d = open_job(("a", 1.0))
    d.add("j", [100])
    d.seal("j")
    assert "is sealed; it takes no more files" in refusal(d.add("j", [200])).reason
    d.submit("k", [100], sealed=False)
    d.cancel("k")
    assert "is cancelled; it takes no more files" in refusal(d.add("k", [200])).reason


def test_adding_to_or_sealing_an_unknown_job_says_unknown_job_so_the_client_submits_again():
    d = Driver()
    assert refusal(d.add("gone", [100], first=0)).code == ErrorCode.UNKNOWN_JOB.value
    assert refusal(d.seal("gone", files=0)).code == ErrorCode.UNKNOWN_JOB.value


def test_a_seal_counting_other_files_than_the_job_holds_is_refused_and_the_job_stays_open():
    d = open_job(("a", 1.0))
    d.add("j", [100, 200])
    refused = refusal(d.seal("j", files=3))
    assert "holds 2 files but the client sent 3; not sealed" in refused.reason
    assert not d.scheduler.jobs["j"].sealed


def test_sealing_twice_changes_nothing():
    d = open_job(("a", 1.0))
    assert finished(d.seal("j"))
    assert d.seal("j") == []


def test_an_empty_job_ends_when_sealed_and_a_sealed_submission_of_no_files_ends_at_once():
    d = open_job(("a", 1.0))
    (ended,) = finished(d.seal("j"))
    assert ended.report["files"] == 0
    (ended,) = finished(d.submit("nothing-left", []))
    assert ended.report["state"] == "finished"


def test_a_job_may_not_grow_past_its_file_limit():
    d = Driver(max_job_files=5)
    d.submit("j", [100] * 3, sealed=False)
    refused = refusal(d.add("j", [100] * 3))
    assert refused.code == ErrorCode.REJECTED_JOB.value and "would hold 6 files, more than the 5" in refused.reason
    assert len(d.scheduler.jobs["j"].tasks) == 3
    assert not of_type(d.add("j", [100] * 2), Refused)


def test_a_classify_tasks_time_leaves_the_workers_observed_speed_as_it_is():
    d = Driver()
    d.join("gpu", stages=("esm", "classify"))
    d.submit("emb", [1000], stage="esm")
    (given,) = assigns(d.request("gpu"))
    d.succeed("gpu", given.task, 1.0)
    d.submit("cls", [10_000], stage="classify")
    (given,) = assigns(d.request("gpu"))
    out = d.succeed("gpu", given.task, 0.5)
    assert d.scheduler.workers["gpu"].speed == 1000.0
    assert log_records(out, "task_done")[0]["residues"] == 10_000


def test_a_classify_tasks_files_travel_in_its_assignment():
    d = Driver()
    d.join("w", stages=("classify",))
    d.scheduler.handle(JobSubmitted("c", "classify", "/out", (), True, True, 0.0, sealed=False))
    specs = file_specs([{"path": "/w/dnabert/output_1_DNABERT_S.pt", "paired": "/w/esm/output_1_ESM.pt",
                         "output": "/out/output_1_predictions.tsv", "sequences": 7, "residues": 7}])
    d.scheduler.handle(FilesAdded("c", 0, specs, 0.0))
    (given,) = assigns(d.request("w"))
    assert (given.path, given.paired, given.output) == (
        "/w/dnabert/output_1_DNABERT_S.pt", "/w/esm/output_1_ESM.pt", "/out/output_1_predictions.tsv")


def test_validate_names_a_job_finished_before_it_was_sealed():
    d = open_job(("a", 1.0))
    d.add("j", [100])
    d.run_queue("a")
    job = d.scheduler.jobs["j"]
    job.state, job.finished = "finished", d.now
    with pytest.raises(InvariantError, match="job j finished before it was sealed"):
        d.scheduler.validate()


def test_validate_names_a_job_whose_files_are_out_of_order_or_miscounted():
    d = open_job(("a", 1.0))
    d.add("j", [100, 200])
    job = d.scheduler.jobs["j"]
    job.tasks.reverse()
    with pytest.raises(InvariantError, match="task order: task j:1"):
        d.scheduler.validate()
    job.tasks.reverse()
    job.residues += 1
    with pytest.raises(InvariantError, match="job residues: job j counts 301"):
        d.scheduler.validate()


# ------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_files_added_in_any_order_with_results_between_end_each_job_once_after_its_seal(data):
    """Chunks (some sent twice), results, deaths and seals interleaved; the driver validates after each event."""
    d = Driver(worker_timeout=5.0)
    d.join("w0")
    d.join("w1", 1.5)
    sent = {"j0": 0, "j1": 0}
    for job in sent:
        d.submit(job, [], sealed=False)
    for _ in range(data.draw(st.integers(1, 40))):
        d.now += data.draw(st.sampled_from([0.0, 0.5, 6.0]))
        kind = data.draw(st.sampled_from(["add", "again", "request", "succeed", "seal", "tick", "join"]))
        job = data.draw(st.sampled_from(sorted(sent)))
        worker = data.draw(st.sampled_from(["w0", "w1"]))
        if kind == "add":
            if not d.scheduler.jobs[job].sealed:
                costs = data.draw(st.lists(st.integers(1, 500), min_size=1, max_size=4))
                d.add(job, costs)
                sent[job] += len(costs)
        elif kind == "again":
            if sent[job]:
                first = data.draw(st.integers(0, sent[job] - 1))
                resent = tuple(t.spec for t in d.scheduler.jobs[job].tasks[first:])
                assert not of_type(d.scheduler.handle(FilesAdded(job, first, resent, d.now)), Refused)
                d.scheduler.validate()
        elif kind == "seal":
            d.seal(job)
        elif kind == "succeed":
            running = d.scheduler.workers[worker].running
            if running is not None:
                d.succeed(worker, running)
        elif kind == "join":
            d.join(worker, 1.0)
        else:
            getattr(d, kind)(*([] if kind == "tick" else [worker]))
    for job in sent:
        d.seal(job)
    for worker in ("w0", "w1"):
        d.join(worker, 1.0)
    d.now += 1.0
    for worker in ("w0", "w1"):
        d.run_queue(worker)
    ended = [f.job for f in finished(d.history)]
    assert sorted(ended) == ["j0", "j1"]
    for job, count in sent.items():
        assert [t.spec.path for t in d.scheduler.jobs[job].tasks] == [f"{job}-{i}.fa" for i in range(count)]


def test_a_million_file_submission_travels_in_chunks_under_the_frame_limit_and_is_held_once_in_order():
    """Through the protocol and the scheduler core: every chunk a valid message far under the frame limit."""
    total = protocol.MAX_JOB_FILES
    # Files of one size, as the split makes them.
    files = ({"path": f"/data/run/work/protein/output_{i}.fa", "output": f"/data/run/work/esm/output_{i}_ESM.pt",
              "sequences": 10, "residues": 5000} for i in range(total))
    scheduler = Scheduler()
    scheduler.handle(JobSubmitted("big", "esm", "/data/run/work/esm", (), True, True, 0.0, sealed=False))
    largest = sent = 0
    # The collector would rescan the million live tasks many times over; this checks counts, not speed.
    gc.disable()
    try:
        for chunk in protocol.file_chunks(files):
            frame = protocol.encode("add", job="big", first=sent, files=chunk)
            largest = max(largest, len(frame))
            message = protocol.decode(frame)
            assert scheduler.handle(FilesAdded("big", message["first"], file_specs(message["files"]), 1.0))
            sent += len(chunk)
        job = scheduler.jobs["big"]
        assert sent == len(job.tasks) == total == len(scheduler.unowned)
        assert job.tasks[123_456].spec.path == "/data/run/work/protein/output_123456.fa"
        assert largest < protocol.MAX_MESSAGE_BYTES // 2
        refused = refusal(scheduler.handle(FilesAdded("big", total, added_specs("big", [1], total), 2.0)))
        assert "more than the 1,000,000 a job may hold" in refused.reason
        assert scheduler.handle(JobSealed("big", total, 3.0)) == []
        assert scheduler.jobs["big"].sealed
    finally:
        gc.enable()


# ---------------------------------------------------------------- progress


def test_progress_estimates_a_job_behind_an_older_one_from_the_residues_ahead_of_it():
    d = Driver()
    d.join("w", stages=("dnabert", "esm", "classify"))
    d.submit("warm", [1000], stage="esm")
    (given,) = assigns(d.request("w"))
    d.succeed("w", given.task, 1.0)  # 1000 residues/s
    d.submit("dna", [4000, 2000], stage="dnabert")
    d.submit("prot", [3000], stage="esm")
    d.submit("cls", [500], stage="classify")
    jobs = d.scheduler.jobs
    assert job_progress(d.scheduler, jobs["dna"])["eta_seconds"] == 6.0
    assert job_progress(d.scheduler, jobs["prot"])["eta_seconds"] == 9.0  # the DNABERT-S files run first
    assert job_progress(d.scheduler, jobs["cls"])["eta_seconds"] is None  # frames, on the CPU: not this speed
    progress = job_progress(d.scheduler, jobs["dna"])
    assert (progress["files"], progress["residues"], progress["running"], progress["sealed"]) == (2, 6000, 0, True)
