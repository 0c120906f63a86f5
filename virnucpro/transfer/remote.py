"""A worker's side of the file channel: whether it sees the client's files, and running a task whose files travel.

A task whose assignment carries `transfer` and whose worker cannot read the
client's marker runs here, on the worker's task thread: its input is fetched
from the client's file server into a private temporary directory, the
backend runs there, and the output goes back to the client, which verifies
and publishes it. The protocol is decided by virnucpro.transfer.core; this
shell owns one DEALER socket per task and the local files.
"""

from __future__ import annotations

import hmac
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import zmq

from broker.protocol import ProtocolError
from broker.security import Credentials
from virnucpro import scratch
from virnucpro.backends.interface import Backend, Cancelled, PairBackend
from virnucpro.fingerprint import check_records, check_unchanged
from virnucpro.scratch import Scratch
from virnucpro.stages import is_complete
from virnucpro.transfer import wire
from virnucpro.transfer.core import (
    Download,
    Failed,
    Fetched,
    Reconnect,
    Send,
    SendChunk,
    Stored,
    Truncate,
    Upload,
    WorkerInstruction,
    Write,
)
from virnucpro.transfer.wire import CREDIT, MAX_CHUNK

logger = logging.getLogger("virnucpro.worker")

# How often a transfer checks whether its task was revoked.
CANCEL_CHECK = 0.1
QUEUE = 4 * CREDIT


class TransferError(RuntimeError):
    """A transfer that cannot finish; the message (the task's failure reason) says why."""


def sees_client_files(transfer: dict[str, Any]) -> bool:
    """True if this worker reads the client's marker with the announced content: it uses the shared paths."""
    marker, expected = transfer.get("marker"), transfer.get("marker_sha256")
    if not marker or not expected:
        return False  # --transfer always
    try:
        with open(marker, "rb") as handle:
            content = handle.read(wire.MARKER_BYTES + 1)
    except OSError:
        return False
    return hmac.compare_digest(wire.marker_digest(content), expected)


class Channel:
    """A DEALER socket to the client's file server, encrypted when the job gives the server's key.

    The worker connects with the key pair it uses with the broker: the file
    server lets in only the keys the broker admits as workers.
    """

    def __init__(self, transfer: dict[str, Any], keys: Credentials | None) -> None:
        self.address: str = transfer["address"]
        self.server_key: str | None = transfer.get("server_key")
        if self.server_key and keys is None:
            raise TransferError(f"the file server at {self.address} admits only workers' keys, and this worker runs "
                                "with --insecure")
        self.keys = keys
        self._context: zmq.Context = zmq.Context.instance()
        self._socket = self._open()

    def _open(self) -> zmq.Socket:
        channel = self._context.socket(zmq.DEALER)
        channel.setsockopt(zmq.LINGER, 0)
        channel.setsockopt(zmq.MAXMSGSIZE, MAX_CHUNK + 65536)
        channel.setsockopt(zmq.SNDHWM, QUEUE)
        channel.setsockopt(zmq.RCVHWM, QUEUE)
        if self.server_key and self.keys is not None:
            channel.curve_publickey = self.keys.keys.public
            channel.curve_secretkey = self.keys.keys.secret
            channel.curve_serverkey = self.server_key.encode("ascii")
        channel.connect(self.address)
        return channel

    def reconnect(self) -> None:
        """A fresh connection: replies to what the old one asked can no longer arrive."""
        self._socket.close(0)
        self._socket = self._open()

    def send(self, kind: str, fields: dict[str, Any], data: wire.Data | None = None) -> None:
        try:
            self._socket.send_multipart(wire.encode(kind, data, **fields), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass  # not connected yet, or the server is not reading: the core asks again after silence

    def receive(self, timeout: float) -> Iterator[tuple[dict[str, Any], wire.Data | None]]:
        """The valid messages that arrive within `timeout` seconds (those waiting, once one has come)."""
        if not self._socket.poll(max(0, round(timeout * 1000))):
            return
        for _ in range(4 * CREDIT):
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                yield wire.decode(frames, wire.REPLIES)
            except ProtocolError as exc:
                logger.warning("dropped a message from the file server at %s: %s", self.address, exc)

    def close(self) -> None:
        self._socket.close(0)


def drive(machine: Download | Upload, channel: Channel, fd: int, should_stop: Callable[[], bool]) -> Fetched | Stored:
    """Run one transfer to its end over `channel`, reading or writing the local file `fd`.

    Raises TransferError when it fails, Cancelled when `should_stop()` turns True.
    """
    pending: list[WorkerInstruction] = machine.start(time.monotonic())
    while True:
        for instruction in pending:
            if isinstance(instruction, (Fetched, Stored)):
                return instruction
            _perform(instruction, channel, fd)
        if should_stop():
            raise Cancelled()
        wait = min(machine.deadline() - time.monotonic(), CANCEL_CHECK)
        pending = []
        for message, data in channel.receive(wait):
            pending += machine.handle(message, data, time.monotonic())
        pending += machine.tick(time.monotonic())


def _perform(instruction: WorkerInstruction, channel: Channel, fd: int) -> None:
    if isinstance(instruction, Send):
        channel.send(instruction.kind, instruction.fields)
    elif isinstance(instruction, SendChunk):
        data = os.pread(fd, instruction.size, instruction.offset)
        if len(data) != instruction.size:
            raise TransferError("the output changed on this worker while it was being sent")
        channel.send("chunk", instruction.fields, data)
    elif isinstance(instruction, Write):
        wire.write_at(fd, instruction.data, instruction.offset)
    elif isinstance(instruction, Truncate):
        os.ftruncate(fd, 0)
    elif isinstance(instruction, Reconnect):
        channel.reconnect()
    elif isinstance(instruction, Failed):
        raise TransferError(f"{instruction.reason} (file server {channel.address})")


def fetch(channel: Channel, token: str, task: str, output: str, destination: Path,
          should_stop: Callable[[], bool], input: int = 0) -> bool:
    """Download the task's input (`input`: a further one) to `destination` (a new file); True if the client's
    output is already complete."""
    fd = os.open(destination, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        outcome = drive(Download(token, task, output, input=input), channel, fd, should_stop)
    finally:
        os.close(fd)
    assert isinstance(outcome, Fetched)
    return outcome.complete


def store(channel: Channel, token: str, task: str, source: Path, should_stop: Callable[[], bool]) -> bool:
    """Upload `source` as the task's output; True if the client published it (False: another copy was first)."""
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        upload = Upload(token, task, source.name, os.fstat(fd).st_size, wire.file_digest(source))
        outcome = drive(upload, channel, fd, should_stop)
    finally:
        os.close(fd)
    assert isinstance(outcome, Stored)
    return outcome.published


def _local_name(path: str) -> str:
    name = PurePosixPath(path).name
    if name in ("", ".", ".."):
        raise TransferError(f"{path!r} does not end in a file name")
    return name


def sweep_task_directories() -> list[Path]:
    """Remove the private task directories that killed workers of this user left in $TMPDIR; what went."""
    return scratch.sweep(Path(tempfile.gettempdir()))


def run_remote(assignment: dict[str, Any], output_name: str, backend: Backend | PairBackend, should_stop: Callable[[], bool],
               keys: Credentials | None) -> dict[str, Any]:
    """Fetch, run and return one task's files (on the task thread); the fields of its `done` message.

    `output_name`: the output's file name, as this worker derived it.
    `seconds` counts the backend alone, so the throughput log keeps measuring
    the device; the transfers are in the worker's log.
    """
    transfer, task = assignment["transfer"], assignment["task"]
    token = transfer["token"]
    input_name = _local_name(assignment["path"])
    channel = Channel(transfer, keys)
    try:
        # Mode 0700, under $TMPDIR, locked while the task runs: a later worker's sweep takes it only if this
        # worker was killed (virnucpro.scratch).
        with Scratch(Path(tempfile.gettempdir()), scratch.TASK) as directory:
            private = directory.path
            (private / "input").mkdir()
            (private / "output").mkdir()
            local_input, local_output = private / "input" / input_name, private / "output" / output_name
            started = time.monotonic()
            if fetch(channel, token, task, output_name, local_input, should_stop):
                logger.info("%s: output already complete on the client, skipped", output_name)
                return {"seconds": 0.0, "sequences": 0, "residues": 0, "skipped": True}
            if isinstance(backend, PairBackend):
                run = fetch_pair(assignment, output_name, backend, channel, private, should_stop)
            else:
                run = partial(backend.run, local_input, local_output, should_stop)
            fetched = time.monotonic()
            check_unchanged(local_input, assignment.get("fingerprint"), copy_of=assignment["path"])
            sequences, residues = run()
            ran = time.monotonic()
            check_records(assignment["path"], assignment.get("fingerprint"), sequences)
            if not is_complete(local_output):
                raise TransferError(f"{output_name}: the {assignment['stage']} stage wrote no complete output")
            published = store(channel, token, task, local_output, should_stop)
            logger.info("%s -> %s: %d sequences in %.2f s; over %s%s: input %.1f MB in %.2f s, output %.1f MB in "
                        "%.2f s%s", assignment["path"], output_name, sequences, ran - fetched, channel.address,
                        " (CURVE)" if channel.server_key else "", local_input.stat().st_size / 1e6, fetched - started,
                        local_output.stat().st_size / 1e6, time.monotonic() - ran,
                        "" if published else " (another copy was published first)")
    finally:
        channel.close()
    return {"seconds": ran - fetched, "sequences": sequences, "residues": residues, "skipped": False}


def fetch_pair(assignment: dict[str, Any], output_name: str, backend: PairBackend, channel: Channel, private: Path,
               should_stop: Callable[[], bool]) -> Callable[[], tuple[int, int]]:
    """Fetch a classify task's further inputs into `private`; what runs it on the local copies.

    Its file (the DNABERT-S features) is in private/input already; input 1 is
    the ESM-2 features, input 2 the classifier, fetched only if the backend
    has not loaded that classifier yet. Each download gets a fresh
    connection, so that no late reply to the one before can reach it.
    """
    token, task = assignment["transfer"]["token"], assignment["task"]
    classifier = dict(assignment["classifier"])
    local_paired = private / "paired" / _local_name(assignment["paired"])
    local_paired.parent.mkdir()
    channel.reconnect()
    fetch(channel, token, task, output_name, local_paired, should_stop, input=1)
    if not backend.knows(classifier["sha256"]):
        local_classifier = private / "classifier" / _local_name(classifier["path"])
        local_classifier.parent.mkdir()
        channel.reconnect()
        fetch(channel, token, task, output_name, local_classifier, should_stop, input=2)
        classifier["path"] = str(local_classifier)
    local_input = private / "input" / _local_name(assignment["path"])
    local_output = private / "output" / output_name

    return partial(backend.run_pair, local_input, local_paired, classifier, local_output, should_stop)
