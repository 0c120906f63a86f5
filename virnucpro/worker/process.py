"""The worker process: the DEALER socket and the task thread around a WorkerSession.

One worker drives one device. Its models are loaded once, before it
registers, and kept across files and jobs. The file itself runs on a second
thread so that heartbeats keep flowing while a GPU works for minutes. What
to send and when is decided by the session core
(virnucpro.worker.session); this shell only moves bytes, starts and cancels
the task thread, and sleeps until the session's next timer, a message, or
the end of the running file, whichever comes first.

A file's output is published (synced, then linked under its final name) on
a third thread, one file after another, while the next file already runs:
the sync, often the slowest step of a short file on a busy disk, stays off
the path from one file to the next. The result goes to the broker only once
the output is durable.

Progress: the task thread asks `should_stop` between units of work (each
batch of a model, each wait of the synthetic stage, each transfer step);
each ask counts, and heartbeats carry the running task's count so the broker
can tell a working file from a stuck one. A file the broker tells us to
abandon that does not stop (its thread blocked in a system call, such as a
read of a FIFO nobody writes) makes the session ask for a Restart: the
worker says goodbye and replaces itself with a fresh copy of the same
command (os.execv, same pid), which kills the stuck thread with the rest of
the old process; a supervisor (`worker --gpus`) sees nothing but the new
registration.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from broker import protocol
from broker.protocol import ErrorCode, ProtocolError
from broker.security import Credentials
from virnucpro.backends.interface import Backend, Cancelled, PairBackend
from virnucpro.fingerprint import check_records, check_unchanged
from virnucpro.scratch import WORK, Scratch
from virnucpro.stages import is_complete, task_output
from virnucpro.transfer.remote import run_remote, sees_client_files, sweep_task_directories
from virnucpro.worker.config import WorkerConfig, WorkerSetupError, device_name
from virnucpro.worker.gauges import nvml_gauges_for
from virnucpro.worker.publish import publish
from virnucpro.worker.session import (
    CancelTask,
    Connected,
    Event,
    Instruction,
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

logger = logging.getLogger("virnucpro.worker")

# How long a worker that is stopping waits for the outputs still being published, to report them.
DRAIN_TIMEOUT = 30.0


@dataclass
class Computed:
    """A file whose stage ran: its output written in a held scratch directory, to be published."""

    source: str
    temporary: Path
    output: Path
    scratch: Scratch
    complete: Callable[[Path], bool]
    result: dict[str, Any]  # the fields of its `done` message


class WorkerRefused(WorkerSetupError):
    """The broker refused this worker's key as a worker; the message says what to change."""


class Worker:
    """The worker's socket loop; `run` returns once `stop` is called."""

    def __init__(self, config: WorkerConfig, backends: dict[str, Backend | PairBackend], keys: Credentials | None) -> None:
        """`keys`: how it connects to the broker and to clients' file servers (None: --insecure)."""
        self.config = config
        self.backends = backends
        self.credentials = keys
        self._refusal: str | None = None
        self.gpu = device_name(config)
        self.name = config.name or f"{socket.gethostname()}:{config.device}"
        self.identity = uuid.uuid4().bytes
        self.session = WorkerSession(
            {"name": self.name, "host": socket.gethostname(), "gpu": self.gpu, "device": config.device,
             "stages": sorted(backends), "pid": os.getpid()},
            broker_timeout=config.broker_timeout, address=config.broker,
        )
        # Its own context, so a restart can flush the goodbye without waiting on sockets a stuck task holds.
        self._context: zmq.Context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task")
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish")
        self._future: Future | None = None
        self._publishes: deque[tuple[str, Future]] = deque()  # outputs being published, in order
        self._cancel = threading.Event()
        self._progress = 0  # how often the running task asked whether to stop: its units of work begun
        self._stop = threading.Event()
        self._gauges = nvml_gauges_for(config.device)
        # The task thread and `stop` write a byte here to wake the loop at once.
        self._wake_reader, self._wake_writer = socket.socketpair()
        for end in (self._wake_reader, self._wake_writer):
            end.setblocking(False)
        self._poller.register(self._wake_reader, zmq.POLLIN)

    def stop(self) -> None:
        """Make `run` say goodbye to the broker and return; safe from a signal handler or another thread."""
        self._stop.set()
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except OSError:
            pass  # a byte is already waiting (the buffer is full), or the loop has already closed up

    # ------------------------------------------------------------- loop

    def run(self) -> None:
        """Serve the broker until `stop` is called; WorkerRefused if the broker will not have this key as a worker."""
        logger.info("worker %s (%s, stages %s) connecting to %s%s", self.name, self.gpu,
                    ",".join(sorted(self.backends)), self.config.broker,
                    "" if self.credentials is None else f" with the key in {self.credentials.keys.source}")
        for leftover in sweep_task_directories():
            logger.info("removed %s, left by a worker that was killed", leftover)
        self._connect()
        try:
            while not self._stop.is_set():
                wait = self.session.deadline() - time.monotonic()
                ready = dict(self._poller.poll(None if wait == math.inf else max(0, math.ceil(wait * 1000))))
                if self._wake_reader in ready:
                    self._wake_reader.recv(4096)
                self._collect_publishes()
                if self._future is not None and self._future.done():
                    self._handle(self._outcome())
                if self._socket in ready:
                    self._receive_all()
                self._handle(Tick(time.monotonic()))
        finally:
            self._shutdown()
        if self._refusal is not None:
            raise WorkerRefused(self._refusal)

    def _connect(self) -> None:
        if self._socket is not None:
            self._poller.unregister(self._socket)
            self._socket.close(0)
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.ROUTING_ID, self.identity)
        self._socket.setsockopt(zmq.LINGER, 0)
        # Queue nothing for a broker that is not there: stale heartbeats must not reach a new one.
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        if self.credentials is not None:
            self.credentials.apply(self._socket)
        self._socket.connect(self.config.broker)
        self._poller.register(self._socket, zmq.POLLIN)
        self._handle(Connected(time.monotonic()))

    def _receive_all(self) -> None:
        while self._socket is not None:
            try:
                frame = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = protocol.decode(frame)
            except ProtocolError as exc:
                logger.warning("dropped a message from the broker: %s", exc)
                continue
            if message["type"] == "error":
                self._refused(message)
                continue
            self._handle(MessageReceived(message, time.monotonic()))

    def _refused(self, error: dict[str, Any]) -> None:
        """The broker answered with an error: a refused key cannot serve it, so the worker stops."""
        logger.error("the broker at %s refused this worker: %s", self.config.broker, error["reason"])
        if error["code"] == ErrorCode.FORBIDDEN.value:
            self._refusal = error["reason"]
            self.stop()

    def _handle(self, event: Event) -> None:
        for instruction in self.session.handle(event):
            self._perform(instruction)

    def _perform(self, instruction: Instruction) -> None:
        if isinstance(instruction, Send):
            self._send(instruction.kind, instruction.fields)
        elif isinstance(instruction, SendHeartbeat):
            gauges = self._gauges() if self._gauges else None
            progress = {"progress": self._progress} if instruction.task is not None else {}
            self._send("heartbeat", {"task": instruction.task, **progress, **({"gauges": gauges} if gauges else {})})
        elif isinstance(instruction, StartTask):
            self._start(instruction.assignment)
        elif isinstance(instruction, CancelTask):
            self._cancel.set()
        elif isinstance(instruction, Reconnect):
            self._connect()
        elif isinstance(instruction, Log):
            logger.log(instruction.level, "%s", instruction.text)
        elif isinstance(instruction, Restart):
            self._restart()

    def _restart(self) -> None:
        """Replace this process with a fresh run of the same command; the stuck task thread goes with it."""
        if self._socket is not None:
            self._socket.close(linger=500)  # the goodbye just sent, if the broker is there to take it
            self._socket = None
        self._context.term()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
        except OSError as exc:
            sys.stderr.write(f"virnucpro worker: cannot restart itself ({exc}); exiting\n")
            os._exit(1)

    def _send(self, kind: str, fields: dict[str, Any]) -> None:
        assert self._socket is not None
        try:
            self._socket.send(protocol.encode(kind, **fields), zmq.NOBLOCK)
        except zmq.Again:
            self._handle(SendFailed(kind, time.monotonic()))

    # ------------------------------------------------------------ tasks

    def _start(self, assignment: dict[str, Any]) -> None:
        # A fresh flag per task: a revoke that arrives late can never stop the next file.
        self._cancel = threading.Event()
        self._progress = 0
        self._future = self._executor.submit(self._execute, assignment, self._cancel)
        self._future.add_done_callback(lambda _: self._wake())

    def _execute(self, assignment: dict[str, Any], cancel: threading.Event) -> dict[str, Any] | Computed:
        """Run one file (on the task thread): the fields of its `done` message when nothing is left to publish
        (skipped, or returned through a transfer), else the output to publish."""

        def should_stop() -> bool:
            if cancel is self._cancel:  # a task abandoned, whose thread came back late, counts for nothing
                self._progress += 1
            return cancel.is_set()

        backend = self.backends.get(assignment["stage"])
        if backend is None:
            raise WorkerSetupError(f"this worker does not serve the {assignment['stage']} stage")
        # Derived here, never taken from the message: OutputRefused fails the task with the reason.
        output = task_output(assignment["stage"], assignment["path"], assignment["output_dir"], assignment["output"])
        transfer = assignment.get("transfer")
        if transfer is not None and not sees_client_files(transfer):
            return run_remote(assignment, output.name, backend, should_stop, self.credentials)
        classifier = assignment.get("classifier")

        def complete(path: Path) -> bool:
            # A per-pair predictions file counts only if this job's classifier made it.
            return is_complete(path, classifier["sha256"] if classifier is not None else None)

        if complete(output):
            logger.info("%s: output already complete, skipped", output)
            return {"seconds": 0.0, "sequences": 0, "residues": 0, "skipped": True}
        fingerprint = assignment.get("fingerprint")
        check_unchanged(assignment["path"], fingerprint)
        output.parent.mkdir(parents=True, exist_ok=True)
        # Written in a private directory beside the output, held locked until it is published: a sweep removes it
        # only once this worker is gone (virnucpro.scratch).
        scratch = Scratch(output.parent, WORK)
        try:
            temporary = scratch.path / output.name
            started = time.monotonic()
            if isinstance(backend, PairBackend):
                if "paired" not in assignment or classifier is None:
                    raise ValueError(f"a {backend.stage} task needs its paired input and the job's classifier")
                sequences, residues = backend.run_pair(Path(assignment["path"]), Path(assignment["paired"]),
                                                       classifier, temporary, should_stop)
            else:
                sequences, residues = backend.run(Path(assignment["path"]), temporary, should_stop)
            seconds = time.monotonic() - started
            check_records(assignment["path"], fingerprint, sequences)
        except BaseException:
            scratch.close()
            raise
        return Computed(assignment["path"], temporary, output, scratch, complete,
                        {"seconds": seconds, "sequences": sequences, "residues": residues, "skipped": False})

    @staticmethod
    def _publish(computed: Computed) -> dict[str, Any]:
        """Publish a computed output (on the publishing thread); the fields of its `done` message."""
        try:
            first = publish(computed.temporary, computed.output, computed.complete)
        finally:
            computed.scratch.close()
        result = computed.result
        logger.info("%s -> %s: %d sequences in %.2f s%s", computed.source, computed.output.name, result["sequences"],
                    result["seconds"], "" if first else " (another copy was published first)")
        return result

    def _outcome(self) -> Event:
        """The session event for the running task, which just ended; a computed output starts publishing."""
        future, task = self._future, self.session.task
        assert future is not None and task is not None
        self._future = None
        now = time.monotonic()
        try:
            result = future.result()
        except Cancelled:
            return TaskCancelled(task, now)
        except Exception as exc:  # any backend error fails this file, not the worker
            return TaskFailed(task, f"{type(exc).__name__}: {exc}", now)
        if isinstance(result, Computed):
            publishing = self._publisher.submit(self._publish, result)
            publishing.add_done_callback(lambda _: self._wake())
            self._publishes.append((task, publishing))
            return TaskComputed(task, now)
        return TaskDone(task, now=now, **result)

    def _collect_publishes(self) -> None:
        """Report the outputs published (or not), in the order they were computed."""
        while self._publishes and self._publishes[0][1].done():
            task, future = self._publishes.popleft()
            now = time.monotonic()
            try:
                result = future.result()
            except Exception as exc:  # a write that failed (a full disk) fails this file, not the worker
                self._handle(TaskFailed(task, f"{type(exc).__name__}: {exc}", now))
            else:
                self._handle(TaskDone(task, now=now, **result))

    def _shutdown(self) -> None:
        self._handle(StopRequested(time.monotonic()))
        # Outputs still being published are reported before the goodbye, so the broker need not run them again.
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while self._publishes and self._socket is not None:
            try:
                self._publishes[0][1].exception(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                logger.warning("left before %d output(s) were published; the broker will hand those files out again",
                               len(self._publishes))
                break
            self._collect_publishes()
        if self._socket is not None:
            self._socket.close(linger=500)
            self._socket = None
        self._context.term()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._publisher.shutdown(wait=False, cancel_futures=True)
        self._wake_reader.close()
        self._wake_writer.close()
