"""Worker session core: registration, heartbeats, broker silence, assignments and revokes, with a fake clock."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import protocol
from virnucpro.worker.session import (
    ABANDON_GRACE,
    MAX_REASON,
    REGISTER_RETRY,
    UNSENT_RETRY,
    CancelTask,
    Connected,
    Log,
    MessageReceived,
    Reconnect,
    Restart,
    Send,
    SendFailed,
    SendHeartbeat,
    StartTask,
    StopRequested,
    TaskCancelled,
    TaskComputed,
    TaskDone,
    TaskFailed,
    Tick,
    WorkerSession,
)

REGISTER = {"name": "node1:cuda:0", "host": "node1", "gpu": "NVIDIA A100-SXM4-80GB", "device": "cuda:0",
            "stages": ["dnabert", "esm"], "pid": 4242}
BROKER_TIMEOUT = 10.0


def message(kind: str, **fields: Any) -> dict[str, Any]:
    """A broker message as the shell hands it over: decoded and validated by the protocol."""
    return protocol.decode(protocol.encode(kind, **fields))


def assignment(task: str) -> dict[str, Any]:
    return {"task": task, "job": "j", "stage": "esm", "path": f"/in/{task}.fa", "output_dir": "/out",
            "output": f"/out/{task}_ESM.pt"}


class Worker:
    """A session, a fake clock set by hand, and everything it asked for."""

    def __init__(self) -> None:
        self.session = WorkerSession(REGISTER, broker_timeout=BROKER_TIMEOUT, address="tcp://head:5555")
        self.now = 0.0

    def feed(self, event: Any) -> list[Any]:
        out = self.session.handle(event)
        for instruction in out:
            if isinstance(instruction, Send):  # what the session sends must be what the broker accepts
                protocol.decode(protocol.encode(instruction.kind, **instruction.fields))
        return out

    def at(self, now: float) -> Worker:
        self.now = now
        return self

    def connect(self) -> list[Any]:
        return self.feed(Connected(self.now))

    def hear(self, kind: str, **fields: Any) -> list[Any]:
        return self.feed(MessageReceived(message(kind, **fields), self.now))

    def tick(self) -> list[Any]:
        return self.feed(Tick(self.now))

    def registered(self, interval: float = 1.0) -> list[Any]:
        return self.hear("registered", worker="ab", name=REGISTER["name"], weight=1.2, heartbeat_interval=interval)

    def assign(self, task: str) -> list[Any]:
        return self.hear("assign", **assignment(task))

    def done(self, task: str) -> list[Any]:
        return self.feed(TaskDone(task, seconds=0.5, sequences=3, residues=900, skipped=False, now=self.now))


def sends(out: list[Any]) -> list[str]:
    return [i.kind for i in out if isinstance(i, Send)]


def not_logs(out: list[Any]) -> list[Any]:
    return [i for i in out if not isinstance(i, Log)]


def ready_worker(interval: float = 1.0) -> Worker:
    """Connected and registered at t=0, its first heartbeat sent."""
    w = Worker()
    w.connect()
    w.registered(interval)
    w.tick()
    return w


# ------------------------------------------------------------ registration


def test_a_connected_worker_registers_at_once_with_its_identity():
    w = Worker()
    assert w.connect() == [Send("register", REGISTER)]


def test_an_unanswered_register_is_sent_again_after_a_second_and_not_before():
    w = Worker()
    w.connect()
    assert w.at(REGISTER_RETRY - 0.01).tick() == []
    assert sends(w.at(REGISTER_RETRY).tick()) == ["register"]
    assert w.at(REGISTER_RETRY + 0.5).tick() == []
    assert sends(w.at(2 * REGISTER_RETRY).tick()) == ["register"]


def test_a_register_the_socket_would_not_take_is_sent_again_soon():
    w = Worker()
    w.connect()
    w.feed(SendFailed("register", w.now))
    assert w.session.deadline() == pytest.approx(UNSENT_RETRY)
    assert sends(w.at(UNSENT_RETRY).tick()) == ["register"]


def test_registration_stops_the_retries_and_an_idle_worker_asks_for_work():
    w = Worker()
    w.connect()
    out = w.at(0.2).registered()
    assert sends(out) == ["request"]
    assert "register" not in sends(w.at(5.0).tick())


def test_a_worker_still_running_a_file_when_it_registers_does_not_ask_for_work():
    w = ready_worker()
    w.assign("t1")
    w.feed(Connected(w.now))  # a reconnect while t1 runs
    assert sends(w.registered()) == []


def test_waiting_for_the_broker_is_logged_once():
    w = Worker()
    w.connect()
    logs = []
    for second in range(1, 8):
        logs += [i for i in w.at(float(second)).tick() if isinstance(i, Log)]
    assert [log.text for log in logs] == ["waiting for the broker at tcp://head:5555"]


def test_reregister_sends_register_again_and_retries_until_answered():
    w = ready_worker()
    assert sends(w.at(3.0).hear("reregister")) == ["register"]
    assert not any(isinstance(i, SendHeartbeat) for i in w.at(3.5).tick())
    assert sends(w.at(3.0 + REGISTER_RETRY).tick()) == ["register"]
    assert sends(w.at(4.2).registered()) == ["request"]


# -------------------------------------------------------------- heartbeats


def test_heartbeats_follow_the_brokers_interval_and_name_the_running_task():
    w = Worker()
    w.connect()
    w.registered(interval=0.25)
    assert w.tick() == [SendHeartbeat(None)]
    w.at(0.1).assign("t1")
    assert w.at(0.2).tick() == []
    assert w.at(0.25).tick() == [SendHeartbeat("t1")]
    assert w.at(0.49).tick() == []
    assert w.at(0.5).tick() == [SendHeartbeat("t1")]
    w.at(0.6).done("t1")
    assert w.at(0.75).tick() == [SendHeartbeat(None)]


def test_no_heartbeats_before_registration():
    w = Worker()
    w.connect()
    assert not any(isinstance(i, SendHeartbeat) for t in range(1, 20) for i in w.at(t / 4).tick())


def test_the_deadline_is_the_next_timer():
    w = Worker()
    assert w.session.deadline() == math.inf  # nothing to do before the first connection
    w.at(5.0).connect()
    assert w.session.deadline() == 5.0 + REGISTER_RETRY
    w.at(5.1).registered(interval=0.5)
    w.tick()
    assert w.session.deadline() == pytest.approx(5.6)  # the next heartbeat
    w.session.heartbeat_interval = 60.0
    assert w.session.deadline() == pytest.approx(5.1 + BROKER_TIMEOUT)  # the broker's silence comes first


# -------------------------------------------------------------- reconnects


def test_a_broker_silent_for_the_timeout_means_reconnect_then_register_again():
    w = ready_worker()
    assert Reconnect() not in w.at(BROKER_TIMEOUT - 0.01).tick()
    out = w.at(BROKER_TIMEOUT).tick()
    assert not_logs(out) == [Reconnect()]
    assert any(isinstance(i, Log) and i.level == logging.WARNING and "silent" in i.text for i in out)
    assert w.session.deadline() == math.inf  # nothing is sent on the dropped connection
    assert w.connect() == [Send("register", REGISTER)]


def test_any_message_from_the_broker_keeps_the_connection():
    w = ready_worker()
    for t in range(1, 30):
        w.at(float(t)).hear("ack")
        assert Reconnect() not in w.tick()


def test_a_running_file_survives_a_reconnect_and_is_reported_after_it():
    w = ready_worker()
    w.assign("t1")
    w.at(BROKER_TIMEOUT).tick()
    w.connect()
    assert sends(w.at(BROKER_TIMEOUT + 0.1).registered()) == []
    assert sends(w.at(BROKER_TIMEOUT + 0.2).done("t1")) == ["done", "request"]


# ------------------------------------------------------------------- tasks


def test_an_assignment_starts_its_file():
    w = ready_worker()
    assert w.assign("t1") == [StartTask(assignment("t1"))]
    assert w.session.task == "t1"


def test_a_classify_assignment_carries_its_paired_input_and_the_jobs_classifier_to_the_task():
    w = ready_worker()
    pair = {**assignment("c:0"), "stage": "classify", "path": "/w/dnabert/output_1_DNABERT_S.pt",
            "paired": "/w/esm/output_1_ESM.pt", "output": "/w/classify/output_1_predictions.tsv",
            "classifier": {"path": "/models/500_model.pth", "sha256": "0f" * 32}}
    assert w.hear("assign", **pair) == [StartTask(pair)]


def test_an_assignment_while_a_file_runs_is_ignored():
    w = ready_worker()
    w.assign("t1")
    out = w.assign("t2")
    assert not_logs(out) == []
    assert w.session.task == "t1"


def test_a_finished_file_is_reported_and_the_next_asked_for_in_the_same_step():
    w = ready_worker()
    w.assign("t1")
    out = w.done("t1")
    assert out == [Send("done", {"task": "t1", "seconds": 0.5, "sequences": 3, "residues": 900, "skipped": False}),
                   Send("request")]
    assert w.session.task is None


def test_a_failed_file_is_reported_with_its_reason_and_the_next_asked_for():
    w = ready_worker()
    w.assign("t1")
    out = w.feed(TaskFailed("t1", "ValueError: " + "x" * 5000, w.now))
    assert sends(out) == ["failed", "request"]
    failed = next(i for i in out if isinstance(i, Send) and i.kind == "failed")
    assert failed.fields["reason"].startswith("ValueError: x") and len(failed.fields["reason"]) == MAX_REASON
    assert any(isinstance(i, Log) and i.text.startswith("/in/t1.fa failed: ValueError") for i in out)


def test_an_empty_failure_reason_still_says_something():
    w = ready_worker()
    w.assign("t1")
    assert Send("failed", {"task": "t1", "reason": "error"}) in w.feed(TaskFailed("t1", "", w.now))


def test_a_file_ending_while_unregistered_is_reported_without_asking_for_more():
    w = ready_worker()
    w.assign("t1")
    w.hear("reregister")
    assert sends(w.done("t1")) == ["done"]


def test_an_end_for_a_task_that_is_not_running_is_a_shell_error():
    w = ready_worker()
    w.assign("t1")
    with pytest.raises(ValueError, match="t2"):
        w.done("t2")


# -------------------------------------------------------------- publishing


def computed(w: Worker, task: str) -> list[Any]:
    return w.feed(TaskComputed(task, w.now))


def publishing_t1(then: str | None = None) -> Worker:
    """A ready worker that ran t1 to the end and publishes its output; `then`: the file assigned next."""
    w = ready_worker()
    w.assign("t1")
    computed(w, "t1")
    if then is not None:
        w.assign(then)
    return w


def test_a_file_run_to_the_end_asks_for_the_next_at_once_naming_it_and_its_result_follows_alone():
    w = ready_worker()
    w.assign("t1")
    assert computed(w, "t1") == [Send("request", {"finishing": "t1"})]
    assert w.session.task is None and w.session.reported_task is None
    assert sends(w.done("t1")) == ["done"]  # the request is already out


def test_the_next_file_runs_while_the_previous_output_is_published():
    w = publishing_t1()
    assert w.assign("t2") == [StartTask(assignment("t2"))]
    assert sends(w.done("t1")) == ["done"]
    assert sends(w.done("t2")) == ["done", "request"]


def test_a_file_ending_while_the_previous_output_is_published_waits_unannounced_for_that_result():
    w = publishing_t1(then="t2")
    assert computed(w, "t2") == []  # the broker must hear t1's result before the request that names t2
    assert w.session.reported_task == "t2"  # heartbeats still name it: the broker takes it to be running
    w.at(1.0)
    assert w.tick() == [SendHeartbeat("t2")]
    out = w.done("t1")
    assert out == [Send("done", {"task": "t1", "seconds": 0.5, "sequences": 3, "residues": 900, "skipped": False}),
                   Send("request", {"finishing": "t2"})]


def test_an_output_that_cannot_be_published_fails_its_file_without_a_second_request():
    w = publishing_t1()
    assert sends(w.feed(TaskFailed("t1", "OSError: [Errno 28] No space left on device", w.now))) == ["failed"]


def test_a_revoke_of_a_file_being_published_cancels_nothing():
    w = publishing_t1(then="t2")
    assert not_logs(w.hear("revoke", task="t1")) == []
    assert sends(w.done("t1")) == ["done"]


def test_an_abandoned_output_still_unpublished_after_the_grace_makes_the_worker_restart():
    w = publishing_t1()
    assert not_logs(w.at(2.0).hear("revoke", task="t1", abandon=True)) == []
    w.at(2.0 + ABANDON_GRACE - 0.1).hear("ack")
    assert Restart() not in w.tick()
    assert Restart() in w.at(2.0 + ABANDON_GRACE).tick()


def test_after_registering_again_the_worker_asks_plainly_and_still_reports_the_output_being_published():
    w = publishing_t1()
    w.hear("reregister")
    assert sends(w.registered()) == ["request"]
    assert sends(w.done("t1")) == ["done"]


def test_a_file_handed_out_again_while_its_output_is_published_is_answered_by_that_result():
    w = publishing_t1()
    w.hear("reregister")
    w.registered()
    assert not_logs(w.assign("t1")) == []
    assert sends(w.done("t1")) == ["done", "request"]


def test_stopping_while_an_output_is_published_says_bye_only_after_its_result():
    w = publishing_t1(then="t2")
    assert w.feed(StopRequested(w.now)) == [CancelTask("t2")]
    assert sends(w.done("t1")) == ["done", "bye"]


# ----------------------------------------------------------------- revokes


def test_a_revoke_cancels_the_matching_task():
    w = ready_worker()
    w.assign("t1")
    assert not_logs(w.hear("revoke", task="t1")) == [CancelTask("t1")]


def test_a_revoke_of_another_task_changes_nothing():
    w = ready_worker()
    w.assign("t1")
    assert w.hear("revoke", task="t9") == []
    assert Worker().hear("revoke", task="t9") == []  # nor when nothing runs


def test_a_revoked_task_is_reported_failed_revoked_by_the_broker_then_the_next_asked_for():
    w = ready_worker()
    w.assign("t1")
    w.hear("revoke", task="t1")
    out = w.feed(TaskCancelled("t1", w.now))
    assert out == [Send("failed", {"task": "t1", "reason": "revoked by the broker"}), Send("request")]


def test_a_revoked_task_that_had_already_published_is_reported_done():
    w = ready_worker()
    w.assign("t1")
    w.hear("revoke", task="t1")
    assert sends(w.done("t1")) == ["done", "request"]


def test_a_revoked_task_still_stopping_holds_off_the_next_assignment():
    w = ready_worker()
    w.assign("t1")
    w.hear("revoke", task="t1")
    assert not any(isinstance(i, StartTask) for i in w.assign("t2"))


# -------------------------------------------------------------------- stop


def test_stopping_cancels_the_running_file_and_says_bye():
    w = ready_worker()
    w.assign("t1")
    assert w.feed(StopRequested(w.now)) == [CancelTask("t1"), Send("bye")]


def test_stopping_before_registration_sends_nothing():
    w = Worker()
    w.connect()
    assert w.feed(StopRequested(w.now)) == []


# ---------------------------------------------------------------- property

broker_messages = st.one_of(
    st.builds(lambda t: ("assign", assignment(t)), st.sampled_from(["t1", "t2", "t3"])),
    st.builds(lambda t, a: ("revoke", {"task": t, "abandon": a}), st.sampled_from(["t1", "t2", "t3"]), st.booleans()),
    st.just(("registered", {"worker": "ab", "name": "n", "weight": 1.0, "heartbeat_interval": 0.5})),
    st.just(("reregister", {})),
    st.just(("ack", {})),
)
steps = st.lists(st.one_of(
    st.tuples(st.just("message"), broker_messages),
    st.tuples(st.just("wait"), st.floats(0.0, 12.0)),
    st.tuples(st.just("end"), st.sampled_from(["done", "failed", "cancelled", "computed"])),
    st.tuples(st.just("published"), st.sampled_from(["done", "failed"])),
    st.tuples(st.just("unsent"), st.sampled_from(["register", "heartbeat", "done", "request"])),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_whatever_the_broker_says_one_file_runs_at_a_time_and_no_timer_is_left_overdue(script):
    """Also: every request leaves with nothing running, and at most one file named as finishing awaits its result."""
    w = Worker()
    w.connect()
    running: str | None = None
    publishing: list[str] = []
    announced: set[str] = set()
    for step, value in script:
        if step == "message":
            out = w.hear(value[0], **value[1])
        elif step == "wait":
            w.now += value
            out = w.tick()
            if Reconnect() in out:
                out += w.connect()
        elif step == "end" and running is not None:
            if value == "computed":
                out = w.feed(TaskComputed(running, w.now))
                publishing.append(running)
            elif value == "done":
                out = w.feed(TaskDone(running, 0.1, 1, 10, False, w.now))
            elif value == "failed":
                out = w.feed(TaskFailed(running, "RuntimeError: boom", w.now))
            else:
                out = w.feed(TaskCancelled(running, w.now))
            running = None
        elif step == "published" and publishing:
            task = publishing.pop(0)
            if value == "done":
                out = w.feed(TaskDone(task, 0.1, 1, 10, False, w.now))
            else:
                out = w.feed(TaskFailed(task, "OSError: disk full", w.now))
        elif step == "unsent":
            out = w.feed(SendFailed(value, w.now))
        else:
            continue
        for instruction in out:
            if isinstance(instruction, StartTask):
                assert running is None, "a second file started while one runs"
                running = instruction.assignment["task"]
            if isinstance(instruction, CancelTask):
                assert instruction.task == running
            if isinstance(instruction, Send) and instruction.kind in ("done", "failed"):
                announced.discard(instruction.fields["task"])
            if isinstance(instruction, Send) and instruction.kind == "request":
                assert running is None, "asked for work while a file runs"
                if "finishing" in instruction.fields:
                    assert not announced & set(publishing), "named a second file before the first one's result"
                    announced.add(instruction.fields["finishing"])
        assert w.session.task == running
        assert [a["task"] for a in w.session.publishing] == publishing
        if Restart() in out:
            assert out[-1] == Restart()  # the shell replaces the process: nothing may follow
            return
        w.tick()
        assert w.session.deadline() > w.now, "a timer is still due after a tick: the shell would spin"


# ----------------------------------------------------------------- abandon


def test_an_abandoned_task_that_stops_in_time_is_reported_revoked_and_the_worker_carries_on():
    w = ready_worker()
    w.assign("t1")
    assert CancelTask("t1") in w.hear("revoke", task="t1", abandon=True)
    out = w.at(ABANDON_GRACE - 1).feed(TaskCancelled("t1", w.now))
    assert sends(out) == ["failed", "request"]
    w.at(ABANDON_GRACE + 1)
    assert Restart() not in w.tick()


def test_an_abandoned_task_still_running_after_the_grace_makes_the_worker_say_bye_and_restart():
    w = ready_worker()
    w.assign("t1")
    w.at(3.0).hear("revoke", task="t1", abandon=True)
    assert w.session.deadline() <= 3.0 + ABANDON_GRACE
    w.at(3.0 + ABANDON_GRACE - 0.1).hear("ack")
    assert Restart() not in w.tick()
    out = w.at(3.0 + ABANDON_GRACE).tick()
    assert not_logs(out) == [Send("bye"), Restart()]
    assert any(isinstance(i, Log) and "restarting" in i.text for i in out)


def test_a_plain_revoke_never_restarts_the_worker_however_long_the_task_takes_to_stop():
    w = ready_worker()
    w.assign("t1")
    w.hear("revoke", task="t1")
    for second in range(1, 120):
        w.at(float(second)).hear("ack")
        assert Restart() not in w.tick()
