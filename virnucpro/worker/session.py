"""The worker's protocol core: registration, heartbeats, broker silence, the running and publishing tasks; no I/O.

Like the broker's scheduler core, a WorkerSession owns no socket, thread or
clock. The shell (virnucpro.worker.process) feeds it events, each carrying
`now` from the shell's monotonic clock, and performs the instructions it
returns, in order. `deadline()` says when the next timer falls due, so the
shell can sleep exactly until then unless a message or a finished file
wakes it first. Messages given to it have been validated by
broker.protocol; every message it asks the shell to send matches
broker.protocol.SCHEMAS.

A file ends in two steps. When its stage has run (TaskComputed) the output
is written but not yet durable; the worker asks for its next file at once,
naming this one as `finishing`, and the shell publishes the output (sync,
then link) while the next file runs. Its `done` follows when the output is
published (TaskDone). The broker keeps the file in flight on this worker
until then, so nothing is lost if the worker dies first. One file at a time
is announced as finishing: a file whose stage ends while the previous one
is still being published waits, unannounced, and the worker asks for
nothing until the previous result has gone out, so every result reaches the
broker before the request that follows it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

# A register sent and not answered within this long is sent again.
REGISTER_RETRY = 1.0
# A register the socket would not take (no connection to the broker yet) is tried again this soon.
UNSENT_RETRY = 0.05
# Unregistered for this long since the broker was last heard: say that the worker is waiting for it.
WAITING_NOTICE = 2.0
# Heartbeat interval until the broker announces its own.
DEFAULT_HEARTBEAT_INTERVAL = 1.0
# Longest failure reason reported (the protocol allows 4096 characters).
MAX_REASON = 2000
REVOKED = "revoked by the broker"
# A task the broker told us to abandon (it showed no progress for the task timeout) that has not stopped this
# long after: its thread is blocked where it cannot see the revoke (a read that never returns), so the worker
# leaves service and restarts itself.
ABANDON_GRACE = 5.0
# What a task takes from its `assign` message; the last four come only with some.
ASSIGNMENT_FIELDS = ("task", "job", "stage", "path", "output_dir", "output", "transfer", "paired", "classifier",
                     "fingerprint")

# ----------------------------------------------------------------- events


@dataclass(frozen=True)
class Connected:
    """The shell opened a fresh connection to the broker."""

    now: float


@dataclass(frozen=True)
class MessageReceived:
    """A validated message from the broker."""

    message: dict[str, Any]
    now: float


@dataclass(frozen=True)
class SendFailed:
    """The socket would not take a message of type `kind` (no connection to the broker): it is lost."""

    kind: str
    now: float


@dataclass(frozen=True)
class TaskComputed:
    """The running task's stage ended and its output is written; the shell now publishes it (TaskDone or
    TaskFailed follows)."""

    task: str
    now: float


@dataclass(frozen=True)
class TaskDone:
    """A task's output is published (or was already complete: `skipped`)."""

    task: str
    seconds: float
    sequences: int
    residues: int
    skipped: bool
    now: float


@dataclass(frozen=True)
class TaskFailed:
    """A task raised, running or publishing; `reason` says what went wrong."""

    task: str
    reason: str
    now: float


@dataclass(frozen=True)
class TaskCancelled:
    """The running task stopped after a CancelTask, publishing nothing."""

    task: str
    now: float


@dataclass(frozen=True)
class Tick:
    """Time passed; due timers fire."""

    now: float


@dataclass(frozen=True)
class StopRequested:
    """The worker is leaving (Ctrl-C, SIGTERM)."""

    now: float


Event = (Connected | MessageReceived | SendFailed | TaskComputed | TaskDone | TaskFailed | TaskCancelled | Tick
         | StopRequested)

# ----------------------------------------------------------- instructions


@dataclass(frozen=True)
class Send:
    """Send the broker a message of type `kind` with these fields."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SendHeartbeat:
    """Send a heartbeat naming the task the broker takes to be running (and its progress), with the device's
    gauges read now (if it has any)."""

    task: str | None


@dataclass(frozen=True)
class StartTask:
    """Run the file of an `assign` message on the task thread.

    Its fields: task, job, stage, path, output, perhaps transfer, and for a
    classify task also paired and classifier.
    """

    assignment: dict[str, Any]


@dataclass(frozen=True)
class CancelTask:
    """Ask the running task to stop; it ends with TaskCancelled unless it had already finished."""

    task: str


@dataclass(frozen=True)
class Reconnect:
    """Drop the connection and open a fresh one, then feed Connected."""


@dataclass(frozen=True)
class Log:
    """A line for the worker's log."""

    level: int
    text: str


@dataclass(frozen=True)
class Restart:
    """Leave service and start this worker afresh: its task thread is stuck and cannot be stopped."""


Instruction = Send | SendHeartbeat | StartTask | CancelTask | Reconnect | Log | Restart


class WorkerSession:
    """One worker's conversation with the broker, as a state machine."""

    def __init__(self, register: dict[str, Any], broker_timeout: float, address: str) -> None:
        """`register`: the fields of this worker's `register` message; `address` only names the broker in logs."""
        if not broker_timeout > 0:
            raise ValueError(f"broker_timeout must be positive, got {broker_timeout!r}")
        self.register_fields = dict(register)
        self.broker_timeout = broker_timeout
        self.address = address
        self.heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL
        self.registered = False
        self.running: dict[str, Any] | None = None  # the assignment being run
        self.publishing: list[dict[str, Any]] = []  # assignments run to the end whose outputs are being published
        self._announced: set[str] = set()  # publishing tasks the broker was told of (or that this session predates)
        self._asked = False  # a request is out, not yet answered by an assignment
        self._leaving = False
        self._connected = False
        self._register_due = math.inf
        self._last_heard = 0.0
        self._last_heartbeat = -math.inf
        self._waiting_logged = False
        self._abandoning: str | None = None  # a task told to abandon, and when it must have stopped
        self._abandon_by = math.inf

    @property
    def task(self) -> str | None:
        """The id of the task being run, or None when idle."""
        return self.running["task"] if self.running is not None else None

    @property
    def reported_task(self) -> str | None:
        """The task the broker takes to be running here: the running one, else one run to the end and not yet
        announced as finishing."""
        if self.running is not None:
            return self.running["task"]
        unannounced = self._unannounced()
        return unannounced[0] if unannounced else None

    def _unannounced(self) -> list[str]:
        """The publishing tasks the broker still takes to be running (at most one: none is asked for meanwhile)."""
        return [a["task"] for a in self.publishing if a["task"] not in self._announced]

    def deadline(self) -> float:
        """When the next timer falls due (monotonic seconds; inf before the first Connected)."""
        if not self._connected:
            return math.inf
        if not self.registered:
            return min(self._register_due, self._abandon_by)
        return min(self._last_heartbeat + self.heartbeat_interval, self._last_heard + self.broker_timeout,
                   self._abandon_by)

    def handle(self, event: Event) -> list[Instruction]:
        """Apply one event; return what the shell must do, in order."""
        if isinstance(event, Tick):
            return self._on_tick(event.now)
        if isinstance(event, MessageReceived):
            return self._on_message(event.message, event.now)
        if isinstance(event, TaskComputed):
            if self.running is None or self.running["task"] != event.task:
                raise ValueError(f"task {event.task} was computed, but the task running is {self.task}")
            self.publishing.append(self.running)
            self.running = None
            return self._ask_for_work()
        if isinstance(event, TaskDone):
            self._end(event.task)
            result = {"seconds": event.seconds, "sequences": event.sequences, "residues": event.residues,
                      "skipped": event.skipped}
            return [Send("done", {"task": event.task, **result})] + self._after_end()
        if isinstance(event, TaskFailed):
            path = self._end(event.task)["path"]
            return [Log(logging.WARNING, f"{path} failed: {event.reason}"),
                    Send("failed", {"task": event.task, "reason": event.reason[:MAX_REASON] or "error"}),
                    *self._after_end()]
        if isinstance(event, TaskCancelled):
            self._end(event.task)
            return [Send("failed", {"task": event.task, "reason": REVOKED})] + self._after_end()
        if isinstance(event, Connected):
            self._connected = True
            self.registered = False
            self._last_heard = event.now
            return self._register(event.now)
        if isinstance(event, SendFailed):
            return self._on_send_failed(event.kind, event.now)
        if isinstance(event, StopRequested):
            return self._on_stop()
        raise TypeError(f"not a worker session event: {event!r}")

    # ------------------------------------------------------------ timers

    def _on_tick(self, now: float) -> list[Instruction]:
        if now >= self._abandon_by:
            return self._restart(now)
        if not self._connected:
            return []
        if not self.registered:
            if now < self._register_due:
                return []
            out: list[Instruction] = []
            if not self._waiting_logged and now - self._last_heard > WAITING_NOTICE:
                out.append(Log(logging.INFO, f"waiting for the broker at {self.address}"))
                self._waiting_logged = True
            return out + self._register(now)
        silent = now - self._last_heard
        if silent >= self.broker_timeout:
            self.registered = False
            self._connected = False  # nothing falls due until the shell reports the fresh connection
            return [Log(logging.WARNING, f"broker at {self.address} silent for {silent:.0f} s; reconnecting"),
                    Reconnect()]
        if now >= self._last_heartbeat + self.heartbeat_interval:
            self._last_heartbeat = now
            return [SendHeartbeat(self.reported_task)]
        return []

    def _register(self, now: float) -> list[Instruction]:
        self._register_due = now + REGISTER_RETRY
        return [Send("register", dict(self.register_fields))]

    def _on_send_failed(self, kind: str, now: float) -> list[Instruction]:
        if kind == "register":
            # Nothing went out: try again as soon as a connection may be up, not a whole retry later.
            self._register_due = min(self._register_due, now + UNSENT_RETRY)
        elif kind in ("done", "failed"):
            return [Log(logging.WARNING, f"could not report a result to the broker at {self.address} "
                                         "(not connected); it will hand the file out again")]
        elif kind == "request":
            self._asked = False  # the broker counts an idle worker that never asked as waiting, after a while
        return []

    # ---------------------------------------------------------- messages

    def _on_message(self, message: dict[str, Any], now: float) -> list[Instruction]:
        self._last_heard = now
        kind = message["type"]
        if kind == "registered":
            self.registered = True
            self._waiting_logged = False
            self._asked = False
            # This broker session knows none of the outputs still being published; their results still count.
            self._announced = {a["task"] for a in self.publishing}
            self.heartbeat_interval = message["heartbeat_interval"]
            log = Log(logging.INFO, f"registered as {message['name']}, weight {message['weight']:.2f}")
            return [log, *self._ask_for_work()]
        if kind == "reregister":
            # The broker no longer counts this worker as alive: register again, and again until it answers.
            self.registered = False
            return self._register(now)
        if kind == "assign":
            self._asked = False
            if self.running is not None:
                return [Log(logging.WARNING, f"broker sent {message['task']} while {self.task} runs; ignored")]
            if any(a["task"] == message["task"] for a in self.publishing):
                # Handed out again after a reconnect while its output is still being published: that result answers.
                return [Log(logging.INFO, f"task {message['task']} is already being published; its result follows")]
            # "transfer", when present, says how to fetch the input and return the output (virnucpro.transfer);
            # "paired" and "classifier" come with a classify task only.
            self.running = {k: message[k] for k in ASSIGNMENT_FIELDS if k in message}
            return [StartTask(dict(self.running))]
        if kind == "revoke":
            task = message["task"]
            if task == self.task:
                if message.get("abandon"):
                    self._abandon(task, now)
                    return [Log(logging.WARNING, f"task {task} showed no progress for the broker's task timeout; "
                                                 "abandoning it"), CancelTask(task)]
                return [Log(logging.INFO, f"task {task} revoked"), CancelTask(task)]
            if any(a["task"] == task for a in self.publishing):
                # Its output is being written out and cannot be stopped half way: the broker discards the result.
                if message.get("abandon"):
                    self._abandon(task, now)
                    return [Log(logging.WARNING, f"task {task}'s output was not published within the broker's task "
                                                 "timeout; abandoning it")]
                return [Log(logging.INFO, f"task {task} revoked while its output is published")]
            return []
        return []

    def _abandon(self, task: str, now: float) -> None:
        """`task` must end within ABANDON_GRACE, or the worker restarts."""
        if self._abandoning is None:
            self._abandoning, self._abandon_by = task, now + ABANDON_GRACE

    def _restart(self, now: float) -> list[Instruction]:
        """The task told to abandon is still running: say goodbye and start afresh."""
        self._abandon_by = math.inf
        out: list[Instruction] = [Log(logging.ERROR, f"task {self._abandoning} did not stop within {ABANDON_GRACE:g} "
                                                     "s of being abandoned (blocked in a system call?); restarting "
                                                     "this worker")]
        self._connected = False
        return [*out, *self._bye(), Restart()]

    # ------------------------------------------------------------- tasks

    def _end(self, task: str) -> dict[str, Any]:
        """Forget a task that ended, running or publishing; return its assignment."""
        if self.running is not None and self.running["task"] == task:
            ended, self.running = self.running, None
        else:
            position = next((i for i, a in enumerate(self.publishing) if a["task"] == task), None)
            if position is None:
                raise ValueError(f"task {task} ended, but it is neither running ({self.task}) nor being published")
            ended = self.publishing.pop(position)
            self._announced.discard(task)
        if task == self._abandoning:
            self._abandoning, self._abandon_by = None, math.inf
        return ended

    def _after_end(self) -> list[Instruction]:
        if self._leaving:
            return self._bye() if not self.publishing else []
        return self._ask_for_work()

    def _ask_for_work(self) -> list[Instruction]:
        """A request, once nothing runs and no request is out; naming the file run to the end whose output is being
        published, unless the result of the one named before has not gone out yet."""
        if not self.registered or self.running is not None or self._asked or self._leaving:
            return []
        unannounced = self._unannounced()
        if not unannounced:
            self._asked = True
            return [Send("request")]
        if self._announced:
            return []  # the broker hears each result before the request that follows it
        self._announced.add(unannounced[0])
        self._asked = True
        return [Send("request", {"finishing": unannounced[0]})]

    def _bye(self) -> list[Instruction]:
        if not self.registered:
            return []
        self.registered = False
        return [Send("bye")]

    def _on_stop(self) -> list[Instruction]:
        """Cancel the running file and say goodbye once the outputs being published are reported."""
        self._leaving = True
        out: list[Instruction] = []
        if self.running is not None:
            out.append(CancelTask(self.running["task"]))
        return out + (self._bye() if not self.publishing else [])
