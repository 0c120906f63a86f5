"""The file channel's protocol core: a credit-windowed receiver and the state machines of both ends; no I/O.

Transfers follow the ZeroMQ guide's credit-based file transfer ("fileio3"):
the receiver asks for chunks by offset and keeps at most `credit` of them
asked for, so a transfer holds at most chunk x credit bytes in flight
whatever the file's size, and the sender never reads ahead. The same
Receiver serves both directions: a worker downloading an input asks the
client's file server for chunks (`get`), and the file server taking an
output asks the worker for them (`want`). Each side hashes what it accepts
and compares the SHA-256 announced before the first byte.

A transfer that stops making progress (a dropped connection, a lost
message) is resumed from the offset the receiver holds: the worker
reconnects and asks again from there, or offers its output again and the
file server answers with what it still lacks.

Like the worker's session core, these classes own no socket, file or clock:
the shells (virnucpro.transfer.remote on the worker, .fileserver on the
client) feed them decoded messages with `now` and perform what they return.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import posixpath
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any

from broker.events import task_index
from virnucpro.transfer.wire import CHUNK, CREDIT, Data, Refusal

# No progress for this long: reconnect and ask again from the offset already held.
STALL = 5.0
# Nothing at all from the other end for this long: the transfer fails (and the broker hands the file out again).
GIVE_UP = 60.0
# An upload that no worker sent to for this long is dropped, with its partial file.
UPLOAD_IDLE = 120.0
# Uploads the file server receives at once; more are refused as busy until one ends.
MAX_UPLOADS = 64
# A transfer whose bytes do not have the announced checksum is started over this many times in all.
ATTEMPTS = 2

# -------------------------------------------------------------- receiver


@dataclass(frozen=True)
class Want:
    """Ask the sender for `size` bytes at `offset`."""

    offset: int
    size: int


@dataclass(frozen=True)
class Write:
    """Write `data` at `offset` of the file being received."""

    offset: int
    data: Data


@dataclass(frozen=True)
class Received:
    """Every byte arrived, and together they have the announced SHA-256."""


@dataclass(frozen=True)
class Corrupt:
    """Every byte arrived, but together they have SHA-256 `digest`, not the one announced."""

    digest: str


Step = Want | Write | Received | Corrupt


class Receiver:
    """Receives one file of known size and SHA-256 in chunks, with at most `credit` chunks asked for at a time.

    Chunks are accepted only in order (the oldest asked first); anything else
    (a chunk from before a resume, a duplicate, a wrong length) is ignored, and
    a transfer that stops moving is resumed from `received`.
    """

    def __init__(self, size: int, sha256: str, now: float, chunk: int = CHUNK, credit: int = CREDIT) -> None:
        if chunk <= 0 or credit <= 0:
            raise ValueError(f"chunk and credit must be positive, got {chunk} and {credit}")
        self.size = size
        self.sha256 = sha256
        self.chunk = chunk
        self.credit = credit
        self.received = 0  # bytes accepted, from the start, in order
        self.last_progress = now
        self.done = False
        self._hash = hashlib.sha256()
        self._asked: deque[int] = deque()  # offsets asked for and not yet accepted, oldest first
        self._next = 0  # the next offset to ask for

    def resume(self, now: float) -> list[Step]:
        """Forget what was asked and ask again from the offset held: the start of a transfer, or its resumption."""
        self._asked.clear()
        self._next = self.received
        self.last_progress = now
        if self.received == self.size:
            return self._finish()  # an empty file
        return self._ask()

    def accept(self, offset: int, data: Data, now: float) -> list[Step]:
        """Take a chunk: written and hashed if it is the one expected next, else ignored."""
        if self.done or not self._asked or offset != self._asked[0] or len(data) != min(self.chunk, self.size - offset):
            return []
        self._asked.popleft()
        self._hash.update(data)
        self.received += len(data)
        self.last_progress = now
        written: list[Step] = [Write(offset, data)]
        return written + (self._finish() if self.received == self.size else self._ask())

    @property
    def asked(self) -> int:
        """Chunks asked for and not yet received: never more than `credit`."""
        return len(self._asked)

    def _ask(self) -> list[Step]:
        out: list[Step] = []
        while len(self._asked) < self.credit and self._next < self.size:
            size = min(self.chunk, self.size - self._next)
            self._asked.append(self._next)
            out.append(Want(self._next, size))
            self._next += size
        return out

    def _finish(self) -> list[Step]:
        self.done = True
        digest = self._hash.hexdigest()
        return [Received()] if hmac.compare_digest(digest, self.sha256) else [Corrupt(digest)]


# ------------------------------------------------------ the worker's side


@dataclass(frozen=True)
class Send:
    """Send the file server a message of type `kind` with these fields."""

    kind: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class SendChunk:
    """Read `size` bytes at `offset` of the local file and send them as a `chunk` with these fields."""

    fields: dict[str, Any]
    offset: int
    size: int


@dataclass(frozen=True)
class Truncate:
    """Empty the local file: the download starts over."""


@dataclass(frozen=True)
class Reconnect:
    """Drop the connection to the file server and open a fresh one (replies still in flight are lost)."""


@dataclass(frozen=True)
class Fetched:
    """The download ended: the input is whole on disk, or (`complete`) the client already has a complete output."""

    complete: bool


@dataclass(frozen=True)
class Stored:
    """The client verified the output; `published` is False when another copy was published first."""

    published: bool


@dataclass(frozen=True)
class Failed:
    """The transfer cannot finish; `reason` says why."""

    reason: str


WorkerInstruction = Send | SendChunk | Write | Truncate | Reconnect | Fetched | Stored | Failed


class _Transfer(ABC):
    """What a download and an upload share: the task, the timers, the end."""

    def __init__(self, token: str, task: str, output: str, stall: float, give_up: float, attempts: int) -> None:
        self.token = token
        self.task = task
        self.output = output  # the output's file name, which the server checks against its record of the task
        self.stall = stall
        self.give_up = give_up
        self.attempts = attempts
        self.attempt = 1
        self.resumes = 0
        self.finished = False
        self._last_heard = 0.0
        self._last_progress = 0.0

    def deadline(self) -> float:
        """When `tick` next has something to do."""
        return min(self._last_progress + self.stall, self._last_heard + self.give_up)

    def tick(self, now: float) -> list[WorkerInstruction]:
        if self.finished:
            return []
        if now - self._last_heard >= self.give_up:
            return self._end(Failed(f"no answer from the client's file server for {self.give_up:g} s"))
        if now - self._last_progress >= self.stall:
            self.resumes += 1
            self._last_progress = now
            return [Reconnect(), *self._resume(now)]
        return []

    def _heard(self, message: dict[str, Any], now: float) -> bool:
        """True if the message is about this task (anything else is stale and ignored)."""
        if self.finished or message.get("task") not in (self.task, ""):
            return False
        self._last_heard = now
        return True

    def _refused(self, message: dict[str, Any]) -> list[WorkerInstruction]:
        return self._end(Failed(f"the client's file server refused {self.task} ({message['code']}): "
                                f"{message['reason']}"))

    def _end(self, outcome: Fetched | Stored | Failed) -> list[WorkerInstruction]:
        self.finished = True
        return [outcome]

    @abstractmethod
    def _resume(self, now: float) -> list[WorkerInstruction]:
        """What to send to pick the transfer up again after silence."""


class Download(_Transfer):
    """A worker fetching one of its task's inputs (`input`, 0 for its file): its size and checksum first, then its
    chunks, resumed after silence."""

    def __init__(self, token: str, task: str, output: str, chunk: int = CHUNK, credit: int = CREDIT,
                 stall: float = STALL, give_up: float = GIVE_UP, attempts: int = ATTEMPTS, input: int = 0) -> None:
        super().__init__(token, task, output, stall, give_up, attempts)
        self.input = input
        self.chunk = chunk
        self.credit = credit
        self.receiver: Receiver | None = None

    def start(self, now: float) -> list[WorkerInstruction]:
        self._last_heard = self._last_progress = now
        return [self._stat()]

    def handle(self, message: dict[str, Any], data: Data | None, now: float) -> list[WorkerInstruction]:
        """A reply from the file server, validated against wire.REPLIES."""
        if not self._heard(message, now):
            return []
        kind = message["type"]
        if kind == "refused":
            return self._refused(message)
        if kind == "input" and self.receiver is None:
            if message["complete"]:
                return self._end(Fetched(complete=True))
            self.receiver = Receiver(message["size"], message["sha256"], now, self.chunk, self.credit)
            self._last_progress = now
            return self._follow(self.receiver.resume(now))
        if kind == "chunk" and self.receiver is not None and data is not None:
            before = self.receiver.received
            out = self._follow(self.receiver.accept(message["offset"], data, now))
            if self.receiver is not None and self.receiver.received > before:
                self._last_progress = now
            return out
        return []

    def _stat(self) -> Send:
        return Send("stat", {"token": self.token, "task": self.task, "output": self.output, **self._which()})

    def _which(self) -> dict[str, int]:
        # Named only when not the task's own file, so requests for that read as they always have.
        return {"input": self.input} if self.input else {}

    def _resume(self, now: float) -> list[WorkerInstruction]:
        if self.receiver is None:
            return [self._stat()]
        return self._follow(self.receiver.resume(now))

    def _follow(self, steps: list[Step]) -> list[WorkerInstruction]:
        out: list[WorkerInstruction] = []
        for step in steps:
            if isinstance(step, Want):
                out.append(Send("get", {"token": self.token, "task": self.task, "offset": step.offset,
                                        "size": step.size, **self._which()}))
            elif isinstance(step, Write):
                out.append(step)
            elif isinstance(step, Received):
                out += self._end(Fetched(complete=False))
            elif self.attempt < self.attempts:
                # Corrupt: start over, asking the size and checksum again in case the input changed.
                self.attempt += 1
                self.receiver = None
                out += [Truncate(), self._stat()]
            else:
                out += self._end(Failed(f"the input of {self.task} arrived {self.attempts} times with the wrong "
                                        f"checksum (SHA-256 {step.digest})"))
        return out


class Upload(_Transfer):
    """A worker returning its task's output: offer it (size, checksum), then send each chunk the server asks for."""

    def __init__(self, token: str, task: str, output: str, size: int, sha256: str, stall: float = STALL,
                 give_up: float = GIVE_UP, attempts: int = ATTEMPTS) -> None:
        super().__init__(token, task, output, stall, give_up, attempts)
        self.size = size
        self.sha256 = sha256

    def start(self, now: float) -> list[WorkerInstruction]:
        self._last_heard = self._last_progress = now
        return [self._put()]

    def handle(self, message: dict[str, Any], data: Data | None, now: float) -> list[WorkerInstruction]:
        """A reply from the file server, validated against wire.REPLIES."""
        if not self._heard(message, now):
            return []
        kind = message["type"]
        if kind == "want" and message["offset"] + message["size"] <= self.size:
            self._last_progress = now
            return [SendChunk({"token": self.token, "task": self.task, "offset": message["offset"]},
                              message["offset"], message["size"])]
        if kind == "stored":
            return self._end(Stored(message["published"]))
        if kind == "refused":
            if message["code"] == Refusal.MISMATCH.value and self.attempt < self.attempts:
                self.attempt += 1  # the server dropped what it had: offer the output again, from the start
                self._last_progress = now
                return [self._put()]
            return self._refused(message)
        return []

    def _put(self) -> Send:
        return Send("put", {"token": self.token, "task": self.task, "output": self.output, "size": self.size,
                            "sha256": self.sha256})

    def _resume(self, now: float) -> list[WorkerInstruction]:
        return [self._put()]  # the server answers with the chunks it still lacks


# ------------------------------------------------- the client's file server


@dataclass(frozen=True)
class ServedFile:
    """One file of a job: the input the client holds and the output it expects (all its own paths).

    `more` are the task's further inputs, which a worker asks for by number
    (1, 2, ...): a classify task's ESM-2 features, then its classifier.
    """

    input: str
    output: str
    more: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reply:
    """Send `peer` a message of type `kind` with these fields."""

    peer: bytes
    kind: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class DescribeInput:
    """Answer `peer` with the input's size and SHA-256, and whether `output` is already complete."""

    peer: bytes
    task: str
    input: str
    output: str


@dataclass(frozen=True)
class SendInput:
    """Send `peer` `size` bytes of the input at `offset` as a chunk (refused as changed if it has fewer)."""

    peer: bytes
    task: str
    input: str
    offset: int
    size: int


@dataclass(frozen=True)
class WriteUpload:
    """Write `data` at `offset` of the upload's temporary file."""

    path: str
    offset: int
    data: Data


@dataclass(frozen=True)
class PublishUpload:
    """The upload arrived whole with its checksum: verify it as an output, publish it, then call `published`."""

    path: str
    output: str


@dataclass(frozen=True)
class DiscardUpload:
    """Remove the upload's temporary file."""

    path: str


ServerInstruction = Reply | DescribeInput | SendInput | WriteUpload | PublishUpload | DiscardUpload


@dataclass
class _Upload:
    """One output being received: keyed by job token, file, size and checksum, so a new sender resumes it."""

    peer: bytes
    task: str
    path: str
    output: str
    receiver: Receiver
    last_active: float
    state: str = "receiving"  # receiving | publishing | stored
    published: bool = False


UploadKey = tuple[str, int, int, str]  # token, file index, size, SHA-256


class FileServerCore:
    """What the client's file server answers: only the job's own files, only to requests with the job's token.

    A job (one submission) is a token and its files, in submission order; a
    worker names a file by its task id, whose index (broker.events.task_id)
    picks the file. Paths never come from the worker: an output's name is
    only checked against the job's record.
    """

    def __init__(self, upload_dir: str, chunk: int = CHUNK, credit: int = CREDIT, idle: float = UPLOAD_IDLE,
                 max_uploads: int = MAX_UPLOADS) -> None:
        self.upload_dir = upload_dir
        self.chunk = chunk
        self.credit = credit
        self.idle = idle
        self.max_uploads = max_uploads
        self._jobs: dict[str, list[ServedFile]] = {}
        self._uploads: dict[UploadKey, _Upload] = {}
        self._receiving: dict[tuple[str, int, bytes], UploadKey] = {}  # who sends which upload
        self._names = itertools.count(1)

    def add_job(self, token: str, files: list[ServedFile]) -> None:
        """Serve `files` to requests that carry `token`."""
        self._jobs[token] = list(files)

    def add_files(self, token: str, files: list[ServedFile]) -> None:
        """Serve `files` too to requests that carry `token`, after its job's files (indices go on from there)."""
        self._jobs[token].extend(files)

    def handle(self, peer: bytes, message: dict[str, Any], data: Data | None, now: float) -> list[ServerInstruction]:
        """A request from `peer`, validated against wire.REQUESTS."""
        task = message["task"]
        token = self._token(message["token"])
        if token is None:
            return [self._refuse(peer, task, Refusal.TOKEN, "not the token of a job this client runs")]
        index = task_index(task)
        files = self._jobs[token]
        if index is None or index >= len(files):
            return [self._refuse(peer, task, Refusal.UNKNOWN, f"{task!r} is not a task of this job")]
        served = files[index]
        kind = message["type"]
        if kind in ("stat", "put") and message["output"] != posixpath.basename(served.output):
            return [self._refuse(peer, task, Refusal.UNKNOWN,
                                 f"{task!r} writes {posixpath.basename(served.output)!r}, not {message['output']!r}")]
        if kind in ("stat", "get"):
            inputs = (served.input, *served.more)
            which = message.get("input", 0)
            if which >= len(inputs):
                return [self._refuse(peer, task, Refusal.UNKNOWN, f"{task!r} has no input {which}")]
            if kind == "stat":
                return [DescribeInput(peer, task, inputs[which], served.output)]
            return [SendInput(peer, task, inputs[which], message["offset"], message["size"])]
        if kind == "put":
            return self._put(peer, task, (token, index, message["size"], message["sha256"]), served, now)
        key = self._receiving.get((token, index, peer))
        upload = self._uploads.get(key) if key is not None else None
        if key is None or upload is None or upload.state != "receiving" or data is None:
            return []  # a chunk nobody asked this peer for
        upload.last_active = now
        return self._follow(key, upload, upload.receiver.accept(message["offset"], data, now))

    def published(self, path: str, published: bool, now: float) -> list[ServerInstruction]:
        """The shell published the upload at `path` (or found a complete output there first): tell its sender."""
        upload = self._upload_at(path)
        if upload is None:
            return []
        upload.state, upload.published, upload.last_active = "stored", published, now
        return [Reply(upload.peer, "stored", {"task": upload.task, "published": published})]

    def upload_failed(self, path: str, reason: str) -> list[ServerInstruction]:
        """The shell could not write or publish the upload at `path`: drop it and tell its sender why."""
        upload = self._upload_at(path)
        if upload is None:
            return []
        self._drop(upload)
        return [DiscardUpload(path), self._refuse(upload.peer, upload.task, Refusal.FAILED, reason)]

    def tick(self, now: float) -> list[ServerInstruction]:
        """Forget uploads idle for `idle` seconds, removing the partial files of those not finished."""
        out: list[ServerInstruction] = []
        for upload in list(self._uploads.values()):
            if now - upload.last_active >= self.idle and upload.state != "publishing":
                if upload.state == "receiving":
                    out.append(DiscardUpload(upload.path))
                self._drop(upload)
        return out

    def close(self) -> list[ServerInstruction]:
        """The job is over: remove every partial upload."""
        out: list[ServerInstruction] = [DiscardUpload(u.path) for u in self._uploads.values() if u.state == "receiving"]
        self._uploads.clear()
        self._receiving.clear()
        return out

    @property
    def receiving(self) -> int:
        """Uploads being received now."""
        return sum(1 for u in self._uploads.values() if u.state == "receiving")

    # ------------------------------------------------------------ inner

    def _token(self, token: str) -> str | None:
        """The job token equal to `token`, compared in constant time against every one."""
        found = None
        given = token.encode()
        for known in self._jobs:
            if hmac.compare_digest(known.encode(), given):
                found = known
        return found

    def _put(self, peer: bytes, task: str, key: UploadKey, served: ServedFile, now: float) -> list[ServerInstruction]:
        upload = self._uploads.get(key)
        if upload is None:
            if self.receiving >= self.max_uploads:
                return [self._refuse(peer, task, Refusal.BUSY, f"{self.max_uploads} uploads are open; try again")]
            name = f"{next(self._names)}-{posixpath.basename(served.output)}"
            upload = _Upload(peer, task, posixpath.join(self.upload_dir, name), served.output,
                             Receiver(key[2], key[3], now, self.chunk, self.credit), now)
            self._uploads[key] = upload
        upload.last_active = now
        if upload.state == "stored":
            return [Reply(peer, "stored", {"task": task, "published": upload.published})]
        if upload.state == "publishing":
            upload.peer = peer
            return []
        # A new sender (or the same one after silence) takes the upload over from the offset held.
        self._receiving.pop((key[0], key[1], upload.peer), None)
        upload.peer, upload.task = peer, task
        self._receiving[(key[0], key[1], peer)] = key
        return self._follow(key, upload, upload.receiver.resume(now))

    def _follow(self, key: UploadKey, upload: _Upload,
                steps: list[Step]) -> list[ServerInstruction]:
        out: list[ServerInstruction] = []
        for step in steps:
            if isinstance(step, Want):
                out.append(Reply(upload.peer, "want", {"task": upload.task, "offset": step.offset, "size": step.size}))
            elif isinstance(step, Write):
                out.append(WriteUpload(upload.path, step.offset, step.data))
            elif isinstance(step, Received):
                upload.state = "publishing"
                self._receiving.pop((key[0], key[1], upload.peer), None)
                out.append(PublishUpload(upload.path, upload.output))
            else:
                self._drop(upload)
                out += [DiscardUpload(upload.path),
                        self._refuse(upload.peer, upload.task, Refusal.MISMATCH,
                                     f"the output arrived with SHA-256 {step.digest}, not the one announced")]
        return out

    def _upload_at(self, path: str) -> _Upload | None:
        return next((u for u in self._uploads.values() if u.path == path), None)

    def _drop(self, upload: _Upload) -> None:
        for key, held in list(self._uploads.items()):
            if held is upload:
                del self._uploads[key]
                self._receiving.pop((key[0], key[1], upload.peer), None)

    @staticmethod
    def _refuse(peer: bytes, task: str, code: Refusal, reason: str) -> Reply:
        return Reply(peer, "refused", {"task": task, "code": code.value, "reason": reason})
