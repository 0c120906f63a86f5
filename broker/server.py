"""Server shell: a ROUTER socket, a timer and a log file around the scheduler core.

It decodes and validates each message, turns it into a scheduler event,
and performs the instructions that come back. Nothing here decides policy.

The core runs on time.monotonic(), so leases and ages hold when the wall
clock is stepped; times people read (the throughput log's `time`, a job's
`submitted` and `finished`) become Unix seconds here, as they leave.

Admission is checked here too (broker.security): every message of a CURVE
peer carries its key, a request outside the key's role is answered with a
`forbidden` error, and a job is read or cancelled only with the key that
submitted it. What a client sees of other keys' jobs: their id, stage,
state and counts in `status`, never their file paths or reports.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from broker import paths, protocol
from broker.events import (
    Assign,
    FilesAdded,
    FileSpec,
    Heartbeat,
    Instruction,
    JobCancelled,
    JobFinished,
    JobSealed,
    JobSubmitted,
    Log,
    Notice,
    Refused,
    Reregister,
    Revoke,
    TaskFailed,
    TaskSucceeded,
    Tick,
    WorkerJoined,
    WorkerLeft,
    WorkRequested,
)
from broker.protocol import ErrorCode, ProtocolError
from broker.records import LogRecord
from broker.reports import job_progress
from broker.scheduler import Scheduler
from broker.security import Admission, sender_key, serve_securely, state_directory
from virnucpro.pipeline.gpu_weights import WeightTable

logger = logging.getLogger("virnucpro.broker")

# Handling one message for longer than this is worth a line in the log (a very large job being seeded, say).
SLOW_EVENT = 1.0
# Longest reason in an error reply: enough to name the field and the fix, short whatever a sender put in.
MAX_REASON = 500


def default_log_path() -> Path:
    """Per-user state path of the throughput log ($XDG_STATE_HOME or ~/.local/state)."""
    return state_directory() / "throughput.jsonl"


class ThroughputLog:
    """The JSON Lines throughput log: appended one record per line, never rewritten."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # file paths are nobody else's business
        self._handle = open(path, "a", encoding="utf-8")

    def append(self, record: LogRecord) -> None:
        self._handle.write(record.to_line() + "\n")
        self._handle.flush()

    def sync(self) -> None:
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


class BrokerServer:
    """Runs one Scheduler on a ROUTER socket until stopped."""

    def __init__(
        self,
        bind: str,
        scheduler: Scheduler,
        weights: WeightTable,
        log: ThroughputLog,
        heartbeat_interval: float = 1.0,
        wall_clock: Callable[[], float] = time.time,
        admission: Admission | None = None,
    ) -> None:
        """`admission`: the keys admitted per role (CURVE); None serves everyone in the clear (--insecure)."""
        self.scheduler = scheduler
        self.weights = weights
        self.log = log
        self.heartbeat_interval = heartbeat_interval
        self.wall_clock = wall_clock  # Unix seconds, read only to stamp times people read
        self.started = time.monotonic()
        self.reports: dict[str, dict[str, Any]] = {}
        # Per open job, what its workers get with each assignment beside the file: how they reach the client's
        # file server (`transfer`) and a classify job's classifier. Passed on, never used here.
        self.job_extras: dict[str, dict[str, Any]] = {}
        self.admission = admission
        # The key that submitted each job the core still knows; only that key may read or cancel it.
        self.submitters: dict[str, str | None] = {}
        self._sender: str | None = None  # the key of the message being handled (None: --insecure)
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # Far above the protocol's own limit: such a peer is cut off by ZeroMQ before we allocate.
        self._socket.setsockopt(zmq.MAXMSGSIZE, 4 * protocol.MAX_MESSAGE_BYTES)
        # The authenticator runs before the socket listens: no peer ever connects unchecked.
        self._authenticator = None if admission is None else serve_securely(
            self._context, self._socket, admission.keys, admission.workers | admission.clients)
        try:
            self._socket.bind(bind)
        except zmq.ZMQError:
            self._close()
            raise
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def serve(self, stop: threading.Event) -> None:
        """Serve until `stop` is set; the socket and log are closed on the way out."""
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        next_tick = time.monotonic() + self.heartbeat_interval
        try:
            while not stop.is_set():
                timeout = max(0.0, min(next_tick - time.monotonic(), 0.2))
                if poller.poll(math.ceil(timeout * 1000)):
                    self._drain()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.heartbeat_interval
                    self._perform(self.scheduler.handle(Tick(time.monotonic())))
        finally:
            self._close()
            self.log.close()

    def _close(self) -> None:
        self._socket.close(0)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()

    def _drain(self) -> None:
        for _ in range(1000):  # bounded, so the timer still runs under a flood
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._receive(frames)

    def _receive(self, frames: list[zmq.Frame]) -> None:
        # The first frame is always the sender's identity (ROUTER adds it), so every refusal can be answered.
        if len(frames) != 2:
            self.scheduler.count("malformed frames")
            self._refuse(frames[0].bytes, ErrorCode.INVALID_MESSAGE,
                         f"expected one frame per message, got {len(frames) - 1}")
            return
        identity, payload = frames[0].bytes, frames[1]
        try:
            message = protocol.decode(payload.bytes)
        except ProtocolError as exc:
            self.scheduler.count("invalid message")
            logger.debug("dropped message from %s: %s", identity.hex(), exc)
            self._refuse(identity, ErrorCode.INVALID_MESSAGE, str(exc))
            return
        handler = self._handlers.get(message["type"])
        if handler is None:
            self.scheduler.count("unexpected message type")
            self._refuse(identity, ErrorCode.INVALID_MESSAGE,
                         f"a {message['type']!r} message is sent by the broker, never to it")
            return
        if self.admission is not None:
            self._sender = sender_key(payload)
            role = "worker" if message["type"] in protocol.WORKER_REQUESTS else "client"
            if not self.admission.admits(self._sender, role):
                self._forbid(identity, f"the key {self._sender} is not admitted as a {role}, so it cannot send "
                                       f"{message['type']!r}; give this {role} a key from the broker's "
                                       f"--allowed-{role}s or --allowed-keys")
                return
        started = time.monotonic()
        handler(self, identity, message)
        busy = time.monotonic() - started
        if busy > SLOW_EVENT:
            logger.warning("a %s message took %.1f s to handle; no other message was read meanwhile",
                           message["type"], busy)

    # --------------------------------------------------------- handlers

    def _register(self, identity: bytes, m: dict[str, Any]) -> None:
        worker = identity.hex()
        weight = self.weights.lookup(m["gpu"])
        instructions = self.scheduler.handle(
            WorkerJoined(worker, m["name"], m["host"], m["gpu"], weight, tuple(m["stages"]), time.monotonic())
        )
        name = self.scheduler.workers[worker].name
        self._send(identity, "registered", worker=worker, name=name, weight=weight,
                   heartbeat_interval=self.heartbeat_interval)
        self._perform(instructions)

    def _request(self, identity: bytes, m: dict[str, Any]) -> None:
        self._perform(self.scheduler.handle(WorkRequested(identity.hex(), time.monotonic(), m.get("finishing"))))

    def _heartbeat(self, identity: bytes, m: dict[str, Any]) -> None:
        instructions = self.scheduler.handle(
            Heartbeat(identity.hex(), m["task"], time.monotonic(), m.get("gauges"), m.get("progress"))
        )
        if not any(isinstance(i, Reregister) for i in instructions):
            self._send(identity, "ack")
        self._perform(instructions)

    def _done(self, identity: bytes, m: dict[str, Any]) -> None:
        self._perform(self.scheduler.handle(
            TaskSucceeded(identity.hex(), m["task"], float(m["seconds"]), m["skipped"], time.monotonic())
        ))

    def _failed(self, identity: bytes, m: dict[str, Any]) -> None:
        self._perform(self.scheduler.handle(TaskFailed(identity.hex(), m["task"], m["reason"], time.monotonic())))

    def _bye(self, identity: bytes, m: dict[str, Any]) -> None:
        self._perform(self.scheduler.handle(WorkerLeft(identity.hex(), time.monotonic())))

    def _submit(self, identity: bytes, m: dict[str, Any]) -> None:
        problem = check_paths(m["output_dir"], m["files"]) or check_classifier(m["stage"], m.get("classifier"))
        if problem:
            self._reject(identity, problem)
            return
        refusal = self.scheduler.refusal(len(m["files"]))
        if refusal:
            self.scheduler.count("refused job (queued tasks cap)")
            self._refuse(identity, ErrorCode.REFUSED, refusal)
            return
        job = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        extras = {key: m[key] for key in ("transfer", "classifier") if m.get(key) is not None}
        if extras:
            self.job_extras[job] = extras
        instructions = self.scheduler.handle(JobSubmitted(
            job, m["stage"], m["output_dir"], file_specs(m["files"]), m["weighted"], m["steal"], time.monotonic(),
            m.get("backup", True), sealed=not m.get("open", False),
        ))
        self.submitters[job] = self._sender
        self._send(identity, "submitted", job=job)
        self._perform(instructions)

    def _add(self, identity: bytes, m: dict[str, Any]) -> None:
        if not self._may_touch(identity, m["job"]):
            return
        job = self.scheduler.jobs.get(m["job"])
        problem = check_paths(job.output_dir, m["files"]) if job is not None else None
        if problem:
            self._reject(identity, problem)
            return
        instructions = self.scheduler.handle(FilesAdded(m["job"], m["first"], file_specs(m["files"]), time.monotonic()))
        if not self._refused(identity, instructions):
            self._send(identity, "added", job=m["job"], files=len(self.scheduler.jobs[m["job"]].tasks))
        self._perform(instructions)

    def _seal(self, identity: bytes, m: dict[str, Any]) -> None:
        if not self._may_touch(identity, m["job"]):
            return
        instructions = self.scheduler.handle(JobSealed(m["job"], m["files"], time.monotonic()))
        self._perform(instructions)
        if not self._refused(identity, instructions):
            self._send_job_state(identity, m["job"])

    def _reject(self, identity: bytes, reason: str) -> None:
        self.scheduler.count("rejected job")
        self._send(identity, "error", code=ErrorCode.REJECTED_JOB.value, reason=reason)

    def _refused(self, identity: bytes, instructions: list[Instruction]) -> bool:
        """Answer the request with the core's refusal, if it refused; True if it did."""
        for instruction in instructions:
            if isinstance(instruction, Refused):
                self.scheduler.count("refused request")
                self._send(identity, "error", code=instruction.code, reason=instruction.reason)
                return True
        return False

    def _job(self, identity: bytes, m: dict[str, Any]) -> None:
        if self._may_touch(identity, m["job"]):
            self._send_job_state(identity, m["job"])

    def _cancel(self, identity: bytes, m: dict[str, Any]) -> None:
        if self._may_touch(identity, m["job"]):
            instructions = self.scheduler.handle(JobCancelled(m["job"], time.monotonic()))
            # Who cancelled goes in the job's report, so that its own client can say so.
            who = self._canceller(identity, m.get("by"))
            self._perform([dataclasses.replace(i, report={**i.report, "cancelled_by": who})
                           if isinstance(i, JobFinished) and i.job == m["job"] else i for i in instructions])
            self._send_job_state(identity, m["job"])

    def _canceller(self, identity: bytes, by: str | None) -> str:
        """The cancelling client in words: its description of itself, and its key (or its connection, in the clear)."""
        seen = f"key {self._sender}" if self._sender is not None else f"connection {identity.hex()}"
        return f"{by} ({seen})" if by else f"the client with {seen}"

    def _status(self, identity: bytes, m: dict[str, Any]) -> None:
        now = time.monotonic()
        status = self.scheduler.status(now, m.get("page", 0))
        offset = self._unix_offset()
        for job in status["jobs"]:
            job["submitted"] += offset
        if self.admission is not None:
            self._hide_others(status)
        status["broker"] = {"address": self.address, "log": str(self.log.path), "uptime": now - self.started}
        self._send(identity, "status_report", status=status)

    def _keys(self, identity: bytes, m: dict[str, Any]) -> None:
        workers = sorted(self.admission.workers) if self.admission is not None else []
        self._send(identity, "worker_keys", keys=workers)

    _handlers: dict[str, Callable[[BrokerServer, bytes, dict[str, Any]], None]] = {
        "register": _register, "request": _request, "heartbeat": _heartbeat, "done": _done,
        "failed": _failed, "bye": _bye, "submit": _submit, "add": _add, "seal": _seal, "job": _job,
        "cancel": _cancel, "status": _status, "keys": _keys,
    }

    # -------------------------------------------------------- admission

    def _forbid(self, identity: bytes, reason: str) -> None:
        self.scheduler.count("forbidden request")
        self._send(identity, "error", code=ErrorCode.FORBIDDEN.value, reason=reason)

    def _may_touch(self, identity: bytes, job: str) -> bool:
        """True if the sender may read, feed, seal or cancel `job`; otherwise answer `forbidden` (an unknown job
        passes)."""
        if self.admission is None or job not in self.submitters or self.submitters[job] == self._sender:
            return True
        self._forbid(identity, f"job {job} was submitted with another key; only that key may read, add to, seal or cancel it")
        return False

    def _hide_others(self, status: dict[str, Any]) -> None:
        """Mark the sender's own jobs, and drop the file paths of every other key's."""
        for job in status["jobs"]:
            job["yours"] = self.submitters.get(job["job"]) == self._sender
        for worker in status["workers"]:
            if worker["running_job"] is not None and self.submitters.get(worker["running_job"]) != self._sender:
                worker["running"] = None

    # ----------------------------------------------------------- output

    def _send_job_state(self, identity: bytes, job_id: str) -> None:
        job = self.scheduler.jobs.get(job_id)
        if job is None:
            self._send(identity, "error", code=ErrorCode.UNKNOWN_JOB.value,
                       reason=f"unknown job {job_id!r} (the broker may have restarted)")
            return
        self._send(identity, "job_state", job=job_id, state=job.state,
                   progress=job_progress(self.scheduler, job), report=self.reports.get(job_id))

    def _unix_offset(self) -> float:
        """What turns a time on the core's monotonic clock into Unix seconds, by the wall clock now."""
        return self.wall_clock() - time.monotonic()

    def _refuse(self, identity: bytes, code: ErrorCode, reason: str) -> None:
        """Answer a request that is malformed or refused with an `error` reply, never with silence."""
        self._send(identity, "error", code=code.value, reason=reason[:MAX_REASON] or code.value)

    def _send(self, identity: bytes, kind: str, **fields: Any) -> None:
        self._socket.send_multipart([identity, protocol.encode(kind, **fields)])

    def _perform(self, instructions: list[Instruction]) -> None:
        offset = self._unix_offset()  # one for the batch: the records of one event keep one time
        for instruction in instructions:
            if isinstance(instruction, Assign):
                extra = dict(self.job_extras.get(instruction.job, {}))
                if instruction.paired is not None:
                    extra["paired"] = instruction.paired
                fingerprint = self.scheduler.tasks[instruction.task].spec.fingerprint
                if fingerprint is not None:
                    extra["fingerprint"] = dict(zip(("size", "mtime_ns", "records"), fingerprint, strict=True))
                self._send(bytes.fromhex(instruction.worker), "assign", task=instruction.task, job=instruction.job,
                           stage=instruction.stage, path=instruction.path,
                           output_dir=self.scheduler.jobs[instruction.job].output_dir, output=instruction.output,
                           **extra)
            elif isinstance(instruction, Revoke):
                self._send(bytes.fromhex(instruction.worker), "revoke", task=instruction.task,
                           **({"abandon": True} if instruction.abandon else {}))
            elif isinstance(instruction, Reregister):
                self._send(bytes.fromhex(instruction.worker), "reregister")
            elif isinstance(instruction, Log):
                self.log.append(dataclasses.replace(instruction.record, time=instruction.record.time + offset))
            elif isinstance(instruction, JobFinished):
                self.reports[instruction.job] = {
                    **instruction.report, "submitted": instruction.report["submitted"] + offset,
                    "finished": instruction.report["finished"] + offset,
                }
                for forgotten in [job for job in self.reports if job not in self.scheduler.jobs]:
                    del self.reports[forgotten]
                for forgotten in [job for job in self.submitters if job not in self.scheduler.jobs]:
                    del self.submitters[forgotten]
                self.job_extras.pop(instruction.job, None)
                self.log.sync()
                report = instruction.report
                logger.info("job %s %s: %d done, %d failed, %d steals, makespan %.1f s",
                            report["job"], report["state"], report["done"], report["failed"], report["steals"],
                            report["makespan"] or 0.0)
            elif isinstance(instruction, Notice):
                logger.info("%s", instruction.text)


def file_specs(files: list[dict[str, Any]]) -> tuple[FileSpec, ...]:
    """The core's records of a message's validated file specs."""
    return tuple(FileSpec(f["path"], f["output"], f["sequences"], f["residues"], f.get("paired"),
                          fingerprint(f.get("fingerprint"))) for f in files)


def fingerprint(wire: dict[str, int] | None) -> tuple[int, int, int] | None:
    """The core's record of a file spec's fingerprint: (size, mtime_ns, records)."""
    return None if wire is None else (wire["size"], wire["mtime_ns"], wire["records"])


def check_classifier(stage: str, classifier: dict[str, Any] | None) -> str | None:
    """Why a job's classifier is unacceptable, or None: a classify job names one, by an absolute path; no other job does."""
    if stage != "classify":
        return None if classifier is None else f"a {stage} job takes no classifier; only a classify job does"
    if classifier is None:
        return "a classify job must name its classifier checkpoint (path and sha256)"
    if not os.path.isabs(classifier["path"]):
        return f"classifier {classifier['path']!r} is not an absolute path"
    return None


def check_paths(output_dir: str, files: list[dict[str, Any]]) -> str | None:
    """Why a submitted job's paths are unacceptable, or None.

    Paths must be absolute (workers run elsewhere), the output directory one
    a worker may write in (broker.paths), and every output a file directly in
    it (the worker derives the name itself, and refuses any other).
    """
    problem = paths.output_dir_problem(output_dir)
    if problem:
        return problem
    for spec in files:
        for path in (spec["path"], spec.get("paired", "/")):
            problem = paths.input_problem(path)
            if problem:
                return problem
        # Split, not normalized: the name must be a plain name right in the directory, as the worker derives it.
        directory, name = os.path.split(spec["output"])
        if directory != output_dir or name in ("", ".", "..") or paths.control_character(name):
            return f"output {spec['output']!r} is not a file name directly in the job's output directory {output_dir!r}"
    return None
