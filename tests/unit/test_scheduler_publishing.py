"""Scheduler core while a worker publishes an output: the file stays in flight on it until its result comes,
and the worker runs its next file meanwhile.

The driver checks the core's invariants after every event.
"""

from __future__ import annotations

from broker.events import Revoke
from tests.support.driver import Driver, assigns, finished, log_records


def publishing(costs: tuple[int, ...] = (100, 100), **options) -> Driver:
    """`w` (1 residue/s) ran j:0 to the end at t=100 and asked for the next file naming j:0 as finishing."""
    d = Driver(**options)
    d.join("w", 1.0)
    d.submit("j", list(costs))
    assert [a.task for a in assigns(d.request("w"))] == ["j:0"]
    d.now = 100.0
    return d


def test_a_worker_finishing_a_file_gets_the_next_at_once_and_the_file_stays_in_flight_on_it():
    d = publishing()
    assert [a.task for a in assigns(d.request("w", finishing="j:0"))] == ["j:1"]
    task = d.scheduler.tasks["j:0"]
    assert task.state == "running" and task.finishing_on == {"w"} and task.running_on == frozenset()
    assert d.scheduler.workers["w"].running == "j:1"


def test_the_result_of_a_finishing_file_counts_once_it_comes():
    d = publishing()
    d.request("w", finishing="j:0")
    out = d.succeed("w", "j:0", 100.0, at=100.01)
    assert [r["file"] for r in log_records(out, "task_done")] == ["j-0.fa"]
    assert d.scheduler.tasks["j:0"].state == "done" and d.scheduler.workers["w"].finishing is None
    assert finished(d.succeed("w", "j:1", 100.0, at=200.0))


def test_a_file_being_published_is_neither_stolen_nor_backed_up():
    d = publishing(costs=(100,))
    d.request("w", finishing="j:0")
    d.join("fast", 10.0)
    assert assigns(d.request("fast")) == []
    assert assigns(d.pass_time(110.0)) == []
    assert d.scheduler.tasks["j:0"].running_on == frozenset()


def test_a_worker_that_dies_while_publishing_gives_the_file_back_as_a_death_not_an_attempt():
    d = publishing(costs=(100,))
    d.request("w", finishing="j:0")
    d.join("other", 1.0)
    out = d.left("w") + d.request("other")
    assert [a.task for a in assigns(out)] == ["j:0"]
    task = d.scheduler.tasks["j:0"]
    assert task.attempts == () and [death["worker"] for death in task.deaths] == ["w"]


def test_a_late_result_of_a_worker_taken_out_while_publishing_still_counts():
    d = publishing(costs=(100,))
    d.request("w", finishing="j:0")
    d.join("w", 1.0)  # it reconnected: its old session is over, the file goes back to the queue
    out = d.succeed("w", "j:0", 100.0)
    assert d.scheduler.tasks["j:0"].state == "done" and finished(out)


def backup_publishing() -> Driver:
    """`holder` (1 residue/s) runs j:0 from t=0; `fast` (2 residues/s) backs it up from t=10, ran its copy to the
    end at t=60 and publishes it."""
    d = Driver()
    d.join("holder", 1.0)
    d.submit("j", [100])
    d.request("holder")
    d.join("fast", 2.0, at=10.0)
    assert [a.task for a in assigns(d.request("fast"))] == ["j:0"]
    d.request("fast", finishing="j:0", at=60.0)
    return d


def test_when_the_holder_wins_the_backup_publishing_its_copy_is_revoked_and_its_result_discarded():
    d = backup_publishing()
    out = d.succeed("holder", "j:0", 70.0, at=70.0)  # the holder wins: the backup's copy was being published
    assert Revoke("fast", "j:0") in out and finished(out)
    assert d.scheduler.jobs["j"].wasted_seconds == 60.0  # what the backup ran, from t=10 to the holder's result
    d.succeed("fast", "j:0", 50.0, at=70.5)
    assert d.scheduler.counters["result of a revoked copy discarded"] == 1


def test_a_backup_that_wins_while_publishing_counts_as_a_backup_won():
    d = backup_publishing()
    out = d.succeed("fast", "j:0", 50.0, at=60.1)
    assert Revoke("holder", "j:0") in out
    assert [r["backup"] for r in log_records(out, "task_done")] == [True]
    assert d.scheduler.jobs["j"].backups_won == 1


def test_an_output_not_published_within_the_task_timeout_fails_there_and_runs_elsewhere():
    d = publishing(costs=(100,), task_timeout=30.0)
    d.request("w", finishing="j:0")
    d.join("other", 1.0)
    d.request("other")
    out = d.pass_time(131.0)
    assert Revoke("w", "j:0", abandon=True) in out
    assert [a.task for a in assigns(out) if a.worker == "other"] == ["j:0"]
    assert "output not published" in d.scheduler.tasks["j:0"].attempts[0]["reason"]


def test_a_worker_naming_a_new_finishing_file_before_the_last_ones_result_gives_the_last_back():
    d = publishing(costs=(100, 100, 100))
    d.request("w", finishing="j:0")
    d.request("w", finishing="j:1", at=200.0)  # j:0's result never came
    assert d.scheduler.counters["result lost in transit"] == 1
    assert d.scheduler.tasks["j:1"].finishing_on == {"w"}
    assert d.scheduler.tasks["j:0"].state in ("queued", "running") and "w" in d.scheduler.tasks["j:0"].lost_to


def test_a_request_naming_a_file_the_worker_no_longer_runs_only_asks_for_work():
    d = publishing()
    d.cancel("j")
    d.submit("k", [100])
    assert [a.task for a in assigns(d.request("w", finishing="j:0"))] == ["k:0"]


def test_a_worker_waiting_when_its_published_result_arrives_is_offered_work_again_at_once():
    d = Driver()
    d.join("slow", 1.0)
    d.join("fast", 1.0)
    d.submit("j", [100, 100])
    d.request("slow")
    d.request("fast")
    # Unmeasured, `fast` would need 100 s for a copy of j:0: no backup when it asks, naming j:1 as finishing.
    assert assigns(d.request("fast", finishing="j:1", at=10.0)) == []
    # Its result says 10 residues/s: j:0's holder, predicted 10 s at that scale, is late; a copy takes 10 s.
    assert [(a.worker, a.task) for a in assigns(d.succeed("fast", "j:1", 10.0, at=10.01))] == [("fast", "j:0")]
