"""Scheduler core under faults: task timeouts for files that show no progress, and stuck workers."""

from __future__ import annotations

import pytest

from broker.events import Revoke
from broker.scheduler import MIN_SYNTHETIC_TIMEOUT, MODEL_TASK_TIMEOUT, SYNTHETIC_TIMEOUT_FACTOR
from tests.support.driver import Driver, assigns, finished, of_type


def stalled_on_a(task_timeout: float = 5.0) -> Driver:
    """a runs j:0 and reports progress 0 forever; b runs j:1; a also holds j:2 and j:3 queued."""
    d = Driver(worker_timeout=100.0, task_timeout=task_timeout)
    d.join("a")
    d.join("b")
    d.submit("j", [500, 400, 300, 200], weighted=False, steal=False)  # a: 500, 200; b: 400, 300
    assert [x.task for x in assigns(d.request("a"))] == ["j:0"]
    assert [x.task for x in assigns(d.request("b"))] == ["j:1"]
    return d


def test_a_file_without_progress_for_the_task_timeout_fails_on_its_worker_and_is_abandoned():
    d = stalled_on_a(task_timeout=5.0)
    for t in (1.0, 2.0, 3.0, 4.0, 5.0):
        out = d.heartbeat("a", "j:0", at=t, progress=0) + d.heartbeat("b", "j:1", at=t, progress=int(t)) + d.tick()
        assert of_type(out, Revoke) == []
    out = d.heartbeat("a", "j:0", at=5.5, progress=0) + d.tick()
    assert Revoke("a", "j:0", abandon=True) in out
    (attempt,) = d.scheduler.tasks["j:0"].attempts
    assert attempt["worker"] == "a" and "no progress for 5 s" in attempt["reason"] and "--task-timeout" in attempt["reason"]
    assert d.scheduler.workers["a"].stuck == "j:0"


def test_progress_resets_the_task_timeout():
    d = stalled_on_a(task_timeout=5.0)
    for step in range(1, 30):
        out = d.heartbeat("a", "j:0", at=float(step), progress=step) + d.tick()
        assert of_type(out, Revoke) == []
    assert d.scheduler.workers["a"].running == "j:0"


def test_a_worker_that_reports_no_progress_at_all_is_never_timed_out():
    d = stalled_on_a(task_timeout=5.0)
    out = d.pass_time(60.0)  # heartbeats without a progress count, as an older worker sends
    assert of_type(out, Revoke) == []


def test_files_queued_behind_a_timed_out_file_go_to_the_other_workers_at_once():
    d = stalled_on_a(task_timeout=5.0)
    d.succeed("b", "j:1", 1.0, at=1.0)
    d.heartbeat("a", "j:0", at=1.0, progress=0)
    assert [x.task for x in assigns(d.request("b", at=1.0))] == ["j:2"]  # b's own queue
    d.succeed("b", "j:2", 1.0, at=2.0)
    assert assigns(d.request("b", at=2.0)) == []  # no steal: j:3 waits behind a's stuck file
    out = d.tick(at=6.0)
    # b gets the timed-out file's retry or a's queued j:3 now, and the other next.
    first = [x.task for x in assigns(out) if x.worker == "b"]
    assert len(first) == 1 and first[0] in {"j:0", "j:3"}
    assert d.scheduler.workers["a"].queue == type(d.scheduler.workers["a"].queue)()
    d.succeed("b", first[0], 1.0, at=7.0)
    (second,) = [x.task for x in assigns(d.request("b", at=7.0))]
    assert {first[0], second} == {"j:0", "j:3"}


def test_a_stuck_worker_gets_no_work_until_it_shows_it_let_go():
    d = stalled_on_a(task_timeout=5.0)
    d.heartbeat("a", "j:0", at=1.0, progress=0)
    d.tick(at=6.0)
    d.submit("k", [100, 100, 100], weighted=False, steal=True, at=6.5)
    assert all(d.scheduler.tasks[f"k:{i}"].owner != "a" for i in range(3))  # seeded on b only
    d.heartbeat("a", "j:0", at=7.0, progress=0)  # still blocked in it
    assert d.scheduler.workers["a"].stuck == "j:0"
    d.fail("a", "j:0", "revoked by the broker", at=8.0)  # it let go
    assert d.scheduler.workers["a"].stuck is None
    assert [x.task for x in assigns(d.request("a", at=8.0))][0].startswith("k:")  # by stealing from b


def test_a_file_that_times_out_on_every_try_fails_after_max_attempts_naming_the_timeout():
    d = Driver(worker_timeout=1000.0, task_timeout=5.0, max_attempts=3)
    d.join("a")
    d.join("b")
    d.submit("j", [500], steal=False)
    out = d.request("a") + d.request("b")
    reports = []
    for step in range(1, 200):
        now = float(step)
        out = []  # a revoked worker lets go at once, as a real one would, then asks again
        for worker in d.scheduler.workers.values():
            if worker.running is not None:
                out += d.heartbeat(worker.id, worker.running, at=now, progress=0)
            elif worker.stuck is not None:
                out += d.fail(worker.id, worker.stuck, "revoked by the broker", at=now) + d.request(worker.id, at=now)
        out += d.tick(at=now)
        reports += finished(out)
        if reports:
            break
    (report,) = [r.report for r in reports]
    (failure,) = report["failures"]
    assert len(failure["attempts"]) == 3 and failure["deaths"] == []
    assert all("no progress" in a["reason"] for a in failure["attempts"])


@pytest.mark.parametrize(("stage", "cost"), [("esm", 10_000), ("dnabert", 1)])
def test_model_stages_time_out_after_thirty_minutes_by_default(stage, cost):
    d = Driver()
    d.join("a", stages=(stage,))
    d.submit("j", [cost], stage=stage)
    d.request("a")
    worker, task = d.scheduler.workers["a"], d.scheduler.tasks["j:0"]
    assert d.scheduler.task_timeout_of(worker, task) == MODEL_TASK_TIMEOUT == 1800.0


def test_the_synthetic_stage_times_out_after_ten_times_its_predicted_time_by_default():
    d = Driver()
    d.join("a", weight=1.0)
    d.submit("j", [1_000, 1_000_000])
    d.request("a")
    d.succeed("a", "j:1", 10.0, at=10.0)  # measured: 100,000 residues/s
    worker = d.scheduler.workers["a"]
    assert d.scheduler.task_timeout_of(worker, d.scheduler.tasks["j:1"]) == pytest.approx(
        SYNTHETIC_TIMEOUT_FACTOR * 10.0)
    assert d.scheduler.task_timeout_of(worker, d.scheduler.tasks["j:0"]) == MIN_SYNTHETIC_TIMEOUT


# ------------------------------------------------------------ bounded state


def test_dead_workers_are_forgotten_after_forget_after_and_their_names_are_free():
    d = Driver(worker_timeout=10.0, forget_after=100.0)
    d.join("a")
    d.join("b")
    d.heartbeat("b", at=5.0)
    d.tick(at=12.0)  # a is dead
    for t in range(20, 110, 10):
        d.heartbeat("b", at=float(t))
        d.tick()
    assert "a" in d.scheduler.workers  # dead for 100 s at most: still listed
    d.heartbeat("b", at=101.0)
    d.tick(at=101.0)
    assert "a" not in d.scheduler.workers and "b" in d.scheduler.workers
    assert d.scheduler.counters["dead workers forgotten"] == 1
    d.join("c", at=102.0)
    assert d.scheduler.workers["c"].name == "c"


def test_a_dead_worker_is_kept_while_a_kept_job_counts_files_it_ran():
    d = Driver(worker_timeout=10.0, forget_after=50.0)
    d.join("a")
    d.submit("j", [100])
    d.request("a")
    d.succeed("a", "j:0", 1.0, at=1.0)
    d.tick(at=20.0)  # a is dead; job j keeps its figures
    d.tick(at=200.0)
    assert "a" in d.scheduler.workers


def test_a_forgotten_workers_late_result_is_ignored_and_the_file_runs_elsewhere():
    d = Driver(worker_timeout=10.0, forget_after=50.0)
    d.join("a")
    d.submit("j", [100])
    d.request("a")
    d.tick(at=20.0)  # a dead while running j:0, which waits for a worker
    d.tick(at=80.0)
    assert "a" not in d.scheduler.workers
    assert d.succeed("a", "j:0", 1.0, at=81.0) == []
    d.join("b", at=82.0)
    assert [x.task for x in assigns(d.request("b", at=82.0))] == ["j:0"]


def test_a_submission_past_the_queued_tasks_cap_is_refused_and_one_within_it_is_not():
    d = Driver(max_queued_tasks=10)
    d.join("a")
    d.submit("j", [100] * 6)
    assert d.scheduler.refusal(4) is None
    reason = d.scheduler.refusal(5)
    assert reason is not None and "6" in reason and "10" in reason and "--max-queued-tasks" in reason
    d.request("a")
    d.succeed("a", "j:0", 1.0, at=1.0)  # a done file no longer counts
    assert d.scheduler.refusal(5) is None


def test_a_status_page_holds_at_most_a_page_of_workers_and_jobs_with_summaries():
    from broker.reports import STATUS_PAGE

    d = Driver(worker_timeout=10.0)
    for i in range(STATUS_PAGE * 2 + 5):
        d.join(f"w{i:03d}", at=float(i) / 100)
    d.tick(at=15.0)  # all dead
    d.join("alive", at=15.0)
    for j in range(STATUS_PAGE + 3):
        d.submit(f"job{j:03d}", [100], at=15.0)
    first = d.scheduler.status(16.0)
    assert len(first["workers"]) == STATUS_PAGE and len(first["jobs"]) == STATUS_PAGE
    assert first["workers"][0]["worker"] == "alive"  # the living first, then the most recently heard
    assert first["workers"][1]["worker"] == f"w{STATUS_PAGE * 2 + 4:03d}"
    assert first["jobs"][-1]["job"] == f"job{STATUS_PAGE + 2:03d}"  # the most recent jobs
    assert first["summary"]["workers"] == STATUS_PAGE * 2 + 6 and first["summary"]["alive"] == 1
    assert first["summary"]["serving"] == {"synthetic": 1} and first["pages"] == 3
    pages = [d.scheduler.status(16.0, page)["workers"] for page in range(first["pages"])]
    assert sorted(w["worker"] for p in pages for w in p) == sorted(d.scheduler.workers[w].name for w in d.scheduler.workers)
    jobs = [j["job"] for page in range(first["pages"]) for j in d.scheduler.status(16.0, page)["jobs"]]
    assert sorted(jobs) == sorted(d.scheduler.jobs)
