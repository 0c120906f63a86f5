"""Scheduler core at the tail of a job: backup copies, overdue files, offers at every tick, a broker that was deaf;
and the whole policy in simulated time beside a plain pull queue.

Nobody is measured in these tests unless a test says so, so each worker runs
at its weight in residues per second: the holder, weight 1.0, is predicted
to need 100 s for a 100-residue file. The driver checks the core's
invariants after every event.
"""

from __future__ import annotations

import random

import pytest

from broker.events import Assign, Notice, Revoke
from broker.reports import makespan_lower_bound
from broker.scheduler import LATE_TOLERANCE, OVERDUE_FACTOR, OVERDUE_MARGIN
from broker.simulator import SimJob, SimWorker, pull_queue_makespan, simulate
from tests.support.driver import Driver, assigns, finished, log_records, of_type


def holder_running(cost: int = 100, *, queued: tuple[int, ...] = (), backup: bool = True, steal: bool = True,
                   max_attempts: int = 3) -> Driver:
    """`holder` (1 residue/s) starts j:0 of `cost` residues at t=0, with `queued` files behind it in its queue."""
    d = Driver(max_attempts=max_attempts)
    d.join("holder", 1.0)
    d.submit("j", [cost, *queued], steal=steal, backup=backup)
    assert [a.task for a in assigns(d.request("holder"))] == ["j:0"]
    return d


def tasks_for(out: list, worker: str) -> list[str]:
    return [a.task for a in assigns(out) if a.worker == worker]


# ------------------------------------------------------------- backup copies


def test_an_idle_worker_backs_up_a_file_it_would_finish_before_its_holder():
    d = holder_running()
    d.join("fast", 2.0, at=10.0)
    out = d.request("fast")
    # A copy takes 50 s and ends at t=60; the holder is predicted to end at t=100.
    assert assigns(out) == [Assign("fast", "j:0", "j", "synthetic", "j-0.fa", "out/j-0.npy")]
    assert any(isinstance(i, Notice) and i.text.startswith("backup copy of j-0.fa on fast") for i in out)
    assert d.scheduler.tasks["j:0"].running_on == {"holder", "fast"}
    assert d.scheduler.jobs["j"].backups == 1


@pytest.mark.parametrize("weight,at", [
    (1.0, 10.0),  # the copy would end at 110, after the holder's predicted 100
    (1.0, 0.0),  # the copy would end at 100 exactly when the holder is predicted to: not sooner
    (0.5, 0.0),  # a slower worker
])
def test_no_backup_when_the_copy_would_not_finish_before_the_holder(weight, at):
    d = holder_running()
    d.join("idle", weight, at=at)
    assert assigns(d.request("idle")) == []
    assert d.scheduler.jobs["j"].backups == 0


def test_a_holder_past_its_predicted_end_counts_as_partly_done_needing_as_long_again_as_it_ran():
    d = holder_running()
    holder = d.scheduler.workers["holder"]
    assert d.scheduler.remaining(holder, 40.0) == 60.0  # before the predicted end: what the prediction leaves
    assert d.scheduler.remaining(holder, 99.0) == 1.0
    assert d.scheduler.remaining(holder, 100.0) == 100.0  # reached it without finishing: halfway, not done
    assert d.scheduler.remaining(holder, 150.0) == 150.0


def test_a_measured_holder_is_late_only_past_its_tolerance_over_the_prediction():
    d = holder_running(100, queued=(100,))
    d.succeed("holder", "j:0", 50.0, at=50.0)  # measured: 2 residues/s
    d.request("holder")
    holder = d.scheduler.workers["holder"]
    assert LATE_TOLERANCE == 1.2
    assert d.scheduler.remaining(holder, 80.0) == 20.0  # 30 s of the predicted 50 s
    assert d.scheduler.remaining(holder, 105.0) == 0.0  # 10% over: noise, not a straggler
    assert d.scheduler.remaining(holder, 110.0) == 60.0  # 20% over: late, halfway


def test_a_late_holder_gets_a_backup_once_a_copy_would_take_less_than_it_has_run():
    d = holder_running()
    d.join("idle", 1.0, at=1.0)
    assert assigns(d.request("idle")) == []
    # The copy takes 100 s. Up to t=100 the holder is estimated to end sooner (or as soon); from t=101, later.
    assert tasks_for(d.pass_time(100.0), "idle") == []
    assert tasks_for(d.pass_time(101.0), "idle") == ["j:0"]


def test_idle_workers_are_offered_work_again_at_every_tick_and_only_a_tick_or_new_files_wake_them():
    d = holder_running()
    d.join("idle", 1.0, at=1.0)
    d.request("idle")
    d.pass_time(100.0)
    d.now = 101.0
    assert assigns(d.heartbeat("holder", "j:0")) == [] and assigns(d.heartbeat("idle")) == []
    assert tasks_for(d.tick(), "idle") == ["j:0"]


def test_a_file_gets_at_most_one_backup_copy():
    d = holder_running()
    d.join("fast1", 2.0, at=10.0)
    d.join("fast2", 4.0)
    assert tasks_for(d.request("fast1"), "fast1") == ["j:0"]
    assert assigns(d.request("fast2")) == []
    assert assigns(d.pass_time(40.0)) == []
    assert d.scheduler.tasks["j:0"].running_on == {"holder", "fast1"}
    assert d.scheduler.jobs["j"].backups == 1


def first_to_finish(worker: str, at: float) -> tuple[Driver, list, dict, dict]:
    """holder_running, `fast` (2 residues/s) backing j:0 up from t=10, and `worker` finishing its copy at `at`:
    the driver, the instructions, the task_done record and the job report."""
    d = holder_running()
    d.join("fast", 2.0, at=10.0)
    assert tasks_for(d.request("fast"), "fast") == ["j:0"]
    d.pass_time(at - 1.0)
    out = d.succeed(worker, "j:0", at - d.scheduler.workers[worker].running_since, at=at)
    (record,) = log_records(out, "task_done")
    return d, out, record, finished(out)[0].report


def test_the_backup_finishing_first_wins_the_holder_is_revoked_and_its_late_result_discarded():
    d, out, record, report = first_to_finish("fast", at=60.0)
    assert of_type(out, Revoke) == [Revoke("holder", "j:0")]
    assert record["worker"] == "fast" and record["backup"] is True and record["stolen"] is True
    assert (report["done"], report["backups"], report["backups_won"]) == (1, 1, 1)
    assert report["wasted_seconds"] == 60.0  # the holder ran from 0 to 60 for nothing
    # The holder finishes anyway before the revoke reaches it: its result is discarded, not counted twice.
    late = d.succeed("holder", "j:0", 100.0, at=100.0)
    assert log_records(late, "task_done") == [] and finished(late) == []
    assert d.scheduler.counters["result of a revoked copy discarded"] == 1
    assert d.scheduler.jobs["j"].done == 1


def test_the_holder_finishing_first_wins_and_the_backup_is_revoked_as_wasted_work():
    d, out, record, report = first_to_finish("holder", at=30.0)
    assert of_type(out, Revoke) == [Revoke("fast", "j:0")]
    assert record["worker"] == "holder" and record["backup"] is False
    assert (report["backups"], report["backups_won"], report["wasted_seconds"]) == (1, 0, 20.0)
    d.fail("fast", "j:0", "revoked by the broker", at=30.5)
    assert d.scheduler.counters["result of a revoked copy discarded"] == 1
    status = d.scheduler.status(d.now)["jobs"][0]
    assert (status["backups"], status["backups_won"], status["wasted_seconds"]) == (1, 0, 20.0)


def test_a_failed_backup_leaves_the_holder_running_and_a_dead_holder_leaves_the_file_to_its_backup():
    d = holder_running()
    d.join("fast", 2.0, at=10.0)
    d.join("fast2", 2.0)
    d.request("fast")
    d.fail("fast", "j:0", "out of memory", at=20.0)
    task = d.scheduler.tasks["j:0"]
    assert task.running_on == {"holder"} and task.state == "running" and task.backup is None
    assert [a["reason"] for a in task.attempts] == ["out of memory"]
    # Another backup may start now: fast2 runs one.
    assert tasks_for(d.request("fast2", at=21.0), "fast2") == ["j:0"]
    # The holder leaves: the file is not handed out again, its backup carries on and finishes it.
    out = d.left("holder", at=30.0)
    assert assigns(out) == [] and task.running_on == {"fast2"}
    (record,) = log_records(d.succeed("fast2", "j:0", 50.0, at=71.0), "task_done")
    assert record["worker"] == "fast2" and record["backup"] is True


def test_a_holder_that_never_received_its_file_is_offered_work_once_its_heartbeats_say_it_is_idle():
    # The assignment to the holder was lost in transit; a backup finished the file and the revoke meant nothing to
    # the holder, which will not ask again: its heartbeats saying it runs nothing put it back in line.
    d = holder_running(100, queued=(40,))
    d.join("fast", 2.0, at=1.0)
    d.request("fast")  # steals j:1 (40 residues), done at 21
    d.succeed("fast", "j:1", 20.0, at=21.0)
    assert tasks_for(d.request("fast"), "fast") == ["j:0"]  # backup: 50 s against the holder's 79 left
    d.submit("k", [10], weighted=False, steal=False, at=22.0)  # queued for the holder (the first worker)
    d.succeed("fast", "j:0", 50.0, at=71.0)  # the holder's copy is revoked
    assert assigns(d.heartbeat("holder", None, at=73.0)) == []  # within the grace: its request may be on the way
    assert tasks_for(d.heartbeat("holder", None, at=75.0), "holder") == ["k:0"]
    assert d.scheduler.counters["idle worker that never asked again"] == 1


@pytest.mark.parametrize("backup,steal", [(False, True), (True, False)])
def test_no_backup_copies_without_steal_or_with_no_backup(backup, steal):
    d = holder_running(backup=backup, steal=steal)
    d.join("fast", 10.0, at=10.0)
    d.request("fast")
    assert tasks_for(d.pass_time(400.0), "fast") == []
    assert d.scheduler.jobs["j"].backups == 0


def test_a_backup_never_takes_a_file_past_its_allowed_attempts():
    # One attempt has failed; with two allowed, a second copy failing beside the first could make three.
    d = holder_running(max_attempts=2)
    d.join("fast", 10.0)
    d.request("fast")
    d.fail("holder", "j:0", "boom", at=1.0)
    assert d.scheduler.tasks["j:0"].running_on == {"fast"}  # the retry went to the other worker
    d.join("faster", 100.0, at=2.0)
    assert assigns(d.request("faster")) == []


# ------------------------------------------------------------- overdue files


@pytest.mark.parametrize("cost,not_yet,overdue", [
    (100, 300.0, 301.0),  # 3 x 100 s = 300 s: overdue once past it (already 200 s over)
    (10, 69.0, 70.0),  # 3 x 10 s is 30 s, but it must also be 60 s over its prediction
])
def test_a_file_is_overdue_past_three_times_its_predicted_time_and_at_least_a_minute_over(cost, not_yet, overdue):
    assert (OVERDUE_FACTOR, OVERDUE_MARGIN) == (3.0, 60.0)
    d = holder_running(cost)
    notices = [i.text for i in d.pass_time(not_yet) if isinstance(i, Notice) and "overdue" in i.text]
    assert notices == [] and not d.scheduler.workers["holder"].overdue
    out = d.pass_time(overdue + 5.0)
    notices = [i.text for i in out if isinstance(i, Notice) and "overdue" in i.text]
    assert notices == [f"j-0.fa is overdue on holder: running for {overdue:.0f} s, predicted {cost} s"]
    assert d.scheduler.is_overdue(d.scheduler.workers["holder"], overdue)
    assert not d.scheduler.is_overdue(d.scheduler.workers["holder"], not_yet)
    assert d.scheduler.status(d.now)["workers"][0]["overdue"] is True


def test_an_overdue_file_gets_a_backup_from_any_idle_worker_however_slow():
    d = holder_running(10)
    d.join("slow", 0.1, at=1.0)  # a copy would take 100 s
    d.request("slow")
    assert tasks_for(d.pass_time(69.0), "slow") == []  # late, but the holder (69 s so far) still looks sooner
    assert tasks_for(d.pass_time(70.0), "slow") == ["j:0"]


def test_files_queued_behind_an_overdue_file_go_to_any_idle_worker_whatever_its_predicted_finish():
    d = holder_running(100, queued=(50,))
    d.join("slow", 0.01, at=1.0)  # 5,000 s for the 50-residue file; the holder's queue ends at 150 s
    d.request("slow")
    assert tasks_for(d.pass_time(300.0), "slow") == []
    out = d.pass_time(301.0)
    assert tasks_for(out, "slow") == ["j:1"]
    assert d.scheduler.jobs["j"].steals == 1


# ------------------------------------------------------------------ leases


def test_a_broker_that_could_not_tick_does_not_hold_its_own_deafness_against_the_workers():
    d = Driver(worker_timeout=10.0)
    d.join("a")
    d.tick(at=1.0)
    # The broker was busy (seeding a large job, say) for 11 s: no tick, no message read.
    assert d.tick(at=12.0) == []
    assert d.scheduler.workers["a"].alive
    # Its leases count from the end of the deaf spell: still silent 10 s later, the worker is dead.
    for t in range(13, 23):
        d.tick(at=float(t))
    assert d.scheduler.workers["a"].alive
    out = d.tick(at=23.0)
    assert [i.text for i in of_type(out, Notice)] == ["worker a silent for 23.0 s: declared dead"]


# ------------------------------------------------------------ in simulated time

SPREAD = [250 * (1 + i % 10) for i in range(60)]  # 60 files of 250 to 2,500 residues
random.Random(11).shuffle(SPREAD)
OVERHEAD = 0.01  # seconds a worker loses per file (publishing, the round trip)


def sim_worker(name: str, speed: float, weight: float = 1.0, slows: tuple[float, float] | None = None) -> SimWorker:
    return SimWorker(name, weight, speed, overhead=OVERHEAD, slows=slows)


CASES = {
    "three named RTX 3090, true speeds 2000/2000/6000": (
        SPREAD, [sim_worker("a", 2000), sim_worker("b", 2000), sim_worker("fast", 6000)]),
    "a straggler ten times slower than its weight says": (
        [10_000, 10_000], [sim_worker("straggler", 1000), sim_worker("fast", 10_000)]),
    "9 large files on speeds 1:2:4 seeded by weights 1:2:3.3": (
        [11000, 9000, 6000, 5000, 12000, 4000, 8000, 10000, 7000],
        [sim_worker("x1", 2000, 1.0), sim_worker("x2", 4000, 2.0), sim_worker("x4", 8000, 3.3)]),
    "four equal workers, one slowing to a third halfway": (
        SPREAD, [sim_worker(f"w{n}", 3000) for n in range(3)] + [sim_worker("slows", 3000, slows=(3.44, 1000))]),
}


@pytest.mark.parametrize("case", CASES)
def test_in_simulated_time_the_broker_is_never_more_than_2_percent_behind_a_pull_queue_and_beats_static_seeding(case):
    costs, workers = CASES[case]
    runs = {steal: simulate(workers, [SimJob("j", costs, weighted=True, steal=steal)], validate=True)
            for steal in (True, False)}
    broker, static = (runs[steal].reports["j"]["makespan"] for steal in (True, False))
    assert runs[True].reports["j"]["done"] == len(costs)
    assert broker <= 1.02 * pull_queue_makespan(costs, workers)
    assert broker < static


def test_in_simulated_time_a_backup_copy_takes_the_straggler_case_within_1_3_of_the_bound():
    costs, workers = CASES["a straggler ten times slower than its weight says"]
    result = simulate(workers, [SimJob("j", costs, weighted=True, steal=True)], validate=True)
    report = result.reports["j"]
    assert report["makespan"] <= 1.3 * makespan_lower_bound(costs, [w.speed for w in workers])
    assert (report["backups"], report["backups_won"]) == (1, 1)
    assert [(r.worker, r.backup) for r in result.task_done] == [("fast", False), ("fast", True)]


# ------------------------------------------------------------------- swaps


def measured_pair() -> Driver:
    """`slow` (1 residue/s) and `fast` (4 residues/s), both named weight 1.0 and measured on a first job; both
    waiting at t=100."""
    d = Driver()
    d.join("slow", 1.0)
    d.join("fast", 1.0)
    d.submit("m", [100, 100])
    ran = {a.worker: a.task for a in assigns(d.request("slow") + d.request("fast"))}
    d.succeed("fast", ran["fast"], 25.0, at=25.0)
    d.request("fast")
    d.succeed("slow", ran["slow"], 100.0, at=100.0)
    d.request("slow")
    return d


def test_a_slow_worker_gives_its_large_file_to_a_faster_one_for_its_smaller_one_when_both_then_end_sooner():
    d = measured_pair()
    out = d.submit("j", [100, 80, 60, 40])  # the table says equal: j:0 (100) and j:3 are seeded to slow
    given = {a.worker: d.cost(a.task) for a in assigns(out)}
    # slow would end at 200 with its 100; taking fast's 60 instead it ends at 160, and fast ends the 100 at 145.
    assert given == {"fast": 80, "slow": 60}
    assert [d.cost(key[-1]) for key in d.scheduler.workers["fast"].queue] == [100]
    assert d.scheduler.jobs["j"].steals == 1


def test_no_swap_while_the_faster_worker_has_more_queued_than_the_slow_one_can_save():
    d = measured_pair()
    # Seeded evenly by the table: fast's queue of 15s ends at 160, after slow's 20 (120); swapping slow's 20 for a 15
    # would end fast at 161.25.
    out = d.submit("j", [20] + [15] * 30)
    assert {a.worker: d.cost(a.task) for a in assigns(out)} == {"fast": 15, "slow": 20}
    assert d.scheduler.jobs["j"].steals == 0
