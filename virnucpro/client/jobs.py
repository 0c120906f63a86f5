"""One job at the broker as a client feeds and follows it: chunked submission, open jobs, resubmission.

A job's files go in chunks that stay far under the broker's frame limit
(broker.protocol.file_chunks): the first with `submit`, the rest with `add`,
each naming the index its first file takes, so a chunk sent again after a
lost reply is recognised rather than added twice. An open job takes more
files by `add` until `seal`. If the broker forgets the job (it restarted),
every file sent so far whose output is not complete on disk is submitted
again as a new job, open or sealed as the old one was; a sealed job with
nothing left to do is finished here instead, with a report that says so.
While the broker is silent, the client waits for it, pausing longer after
each failed try (broker.client.reconnect_waits), for at most `timeout`
seconds in all since it was last heard. With a file server
(virnucpro.transfer), each submission's files are offered to it in the
job's order, added ones too, so that a worker that cannot see this
machine's files fetches task k's input by its index.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.client import BrokerClient, BrokerError, BrokerUnreachable
from broker.protocol import ErrorCode, file_chunks
from broker.reports import failure_reasons
from virnucpro.stages import is_complete
from virnucpro.transfer.fileserver import FileServer

# Resubmissions in a row that the broker lost before it had taken the whole job: a broker that keeps
# forgetting jobs as they arrive, not one that restarted.
MAX_RESUBMITS = 10


def client_description() -> str:
    """How this client names itself to the broker when it cancels a job: user@host pid N."""
    try:
        user = getpass.getuser()
    except OSError:  # no name for this user id (a container, say)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


class JobLost(RuntimeError):
    """The broker lost the job MAX_RESUBMITS times in a row while it was being submitted; the message names the
    broker."""


@dataclass
class Progress:
    """A job's progress over every file this client sent, across resubmissions."""

    files: int
    done: int
    failed: int
    amount: int  # residues, or frames for classify
    amount_done: int
    eta_seconds: float | None
    ended: bool


class JobRun:
    """A job of one stage: submitted, perhaps fed more files, sealed, polled until the broker reports it ended.

    `backup`: with `steal`, idle workers may run backup copies of straggling
    files. `on_resubmit(job)` is called whenever the broker lost the job,
    with the new job's id, or None if every output was complete and the job
    was finished here; `timeout` is the longest wait for a silent broker, in
    seconds since it last answered; `classifier` ({"path", "sha256"}) is
    a classify job's; `server` serves the job's files to workers that cannot
    see them.
    """

    def __init__(self, client: BrokerClient, stage: str, output_dir: Path, *, weighted: bool, steal: bool,
                 backup: bool = True, classifier: dict[str, str] | None = None, server: FileServer | None = None,
                 on_resubmit: Callable[[str | None], None] | None = None, timeout: float = 600.0) -> None:
        self.client = client
        self.stage = stage
        self.output_dir = output_dir
        self.weighted = weighted
        self.steal = steal
        self.backup = backup
        self.classifier = classifier
        self.server = server
        self.on_resubmit = on_resubmit
        self.timeout = timeout
        self.submitted = time.monotonic()
        self.files: list[dict[str, Any]] = []  # every file sent, in order
        self.amount = 0  # their summed cost
        self.sealed = False
        self.job = ""
        self.ids: list[str] = []  # the job's id, and the ids of its resubmissions
        self.report: dict[str, Any] | None = None
        self._sent = 0  # files the current job id holds
        self._offer: dict[str, Any] | None = None  # the current job's `transfer`, with a file server
        self._state: dict[str, Any] | None = None
        self._resubmits = 0  # in a row, since the broker last took a whole submission

    # ------------------------------------------------------------ feeding

    def submit(self, files: Sequence[dict[str, Any]], *, open: bool = False) -> str:
        """Submit the job with `files`; an open job takes more by `add` until `seal`. Returns its id."""
        self.files = list(files)
        self.amount = sum(f["residues"] for f in self.files)
        self.sealed = not open
        self._submit(self.files)
        return self.job

    def add(self, files: Sequence[dict[str, Any]]) -> None:
        """Add `files` to the open job, in chunks."""
        if self.sealed:
            raise ValueError(f"the {self.stage} job {self.job} is sealed; it takes no more files")
        self.files += files
        self.amount += sum(f["residues"] for f in files)
        if self.server is not None and self._offer is not None:
            self.server.serve_more(self._offer, files, self._also())
        for chunk in file_chunks(files):
            if self._call("add", job=self.job, first=self._sent, files=chunk) is None:
                return  # the job was submitted again, these files with it
            self._sent += len(chunk)

    def seal(self) -> None:
        """Say that no more files come; the job ends once its files have."""
        self.sealed = True
        reply = self._call("seal", job=self.job, files=self._sent)
        if reply is not None:
            self._take(reply)

    def cancel(self) -> None:
        """Ask the broker to cancel the job, if it is running; silent if the broker cannot be reached."""
        if self.job and self.report is None:
            try:
                self.client.request("cancel", job=self.job, by=client_description(), timeout=2.0)
            except (BrokerError, BrokerUnreachable):
                pass

    def _submit(self, files: list[dict[str, Any]]) -> None:
        """Submit `files` as a new job (in chunks); if the broker loses it meanwhile, submit what is left again.

        A sealed job whose files are all complete already is finished here.
        """
        while True:
            if not files and self.sealed and self.files:
                self._finish_here()
                return
            try:
                self._submit_once(files)
                self._resubmits = 0  # the broker took the whole job: whatever restarted it, it is back
                return
            except BrokerError as exc:
                if exc.code is not ErrorCode.UNKNOWN_JOB:
                    raise
            files = self._before_resubmit()

    def _finish_here(self) -> None:
        """End the job without the broker: every file's output is complete on disk (the broker forgot the job)."""
        finished = time.monotonic()
        self._state = {"progress": {"files": 0, "done": 0, "failed": 0, "residues": 0, "residues_done": 0,
                                    "eta_seconds": 0.0}}
        self.report = {
            "job": self.job, "stage": self.stage, "state": "finished", "files": len(self.files),
            "done": len(self.files), "failed": 0, "steals": 0, "backups": 0, "backups_won": 0, "wasted_seconds": 0.0,
            "makespan": finished - self.submitted, "lower_bound": None, "failures": [], "workers": [],
            "finished_here": "the broker forgot the job after every output was complete on disk; the client "
                             "checked each one and finished the job itself",
        }

    def _submit_once(self, files: list[dict[str, Any]]) -> None:
        chunks = list(file_chunks(files)) or [[]]
        extra: dict[str, Any] = {"classifier": self.classifier} if self.classifier is not None else {}
        if self.server is not None:
            self._offer = extra["transfer"] = self.server.offer(files, self._also())
        reply = self._retried("submit", stage=self.stage, output_dir=str(self.output_dir), files=chunks[0],
                                    weighted=self.weighted, steal=self.steal, backup=self.backup,
                                    open=not self.sealed or len(chunks) > 1, **extra)
        self.job = reply["job"]
        self.ids.append(self.job)
        self._state = None
        self._sent = len(chunks[0])
        for chunk in chunks[1:]:
            self._retried("add", job=self.job, first=self._sent, files=chunk)
            self._sent += len(chunk)
        if self.sealed and len(chunks) > 1:
            self._take(self._retried("seal", job=self.job, files=self._sent))

    def _also(self) -> tuple[str, ...]:
        """The inputs every file of the job reads besides its own: a classify job's classifier."""
        return (self.classifier["path"],) if self.classifier is not None else ()

    def _retried(self, kind: str, **fields: Any) -> dict[str, Any]:
        """The reply to a request, sent again each time the broker answers after a silence.

        Add, seal and job may be sent again unchanged; a submit whose reply
        was lost leaves an extra job whose outputs are the same files'. The
        broker's silence may last `timeout` seconds in all; then
        BrokerUnreachable says for how long it was silent.
        """
        silent_since: float | None = None
        while True:
            try:
                return self.client.request(kind, **fields)
            except BrokerUnreachable:
                if silent_since is None:
                    silent_since = time.monotonic() - self.client.timeout  # the request waited that long
                elif time.monotonic() - silent_since >= self.timeout:
                    raise  # the broker answers `status` but not this request
                self.client.wait_until_up(self.timeout, since=silent_since)

    def _call(self, kind: str, **fields: Any) -> dict[str, Any] | None:
        """The broker's reply, or None if it had lost the job and the job was submitted again instead."""
        try:
            return self._retried(kind, **fields)
        except BrokerError as exc:
            if exc.code is not ErrorCode.UNKNOWN_JOB:
                raise
        self._submit(self._before_resubmit())
        if self.on_resubmit is not None:
            self.on_resubmit(None if self.report is not None and "finished_here" in self.report else self.job)
        return None

    def _before_resubmit(self) -> list[dict[str, Any]]:
        """Wait for the broker to answer again; the files sent so far whose outputs are not complete."""
        self._resubmits += 1
        if self._resubmits > MAX_RESUBMITS:
            raise JobLost(f"the broker at {self.client.address} lost the {self.stage} job {MAX_RESUBMITS} times in a "
                          "row, each time before it had taken all its files; giving up")
        self.client.wait_until_up(self.timeout)
        sha256 = self.classifier["sha256"] if self.classifier is not None else None
        return [f for f in self.files if not is_complete(f["output"], sha256)]

    # ---------------------------------------------------------- following

    def poll(self) -> Progress:
        """Ask the broker how the job stands (submitting it again if the broker lost it)."""
        if self.report is None:
            reply = self._call("job", job=self.job)
            if reply is not None:
                self._take(reply)
        return self.progress()

    def _take(self, reply: dict[str, Any]) -> None:
        self._state = reply
        if reply.get("report") is not None:
            self.report = reply["report"]

    def progress(self) -> Progress:
        """The figures of the last poll, over every file sent: those outside the current job are done."""
        p = self._state["progress"] if self._state is not None else None
        if p is None:
            return Progress(len(self.files), 0, 0, self.amount, 0, None, False)
        earlier = len(self.files) - p["files"]  # complete before a resubmission
        remaining = p["residues"] - p["residues_done"]
        return Progress(len(self.files), earlier + p["done"], p["failed"], self.amount, self.amount - remaining,
                        p.get("eta_seconds"), self.report is not None)

    @property
    def ended(self) -> bool:
        return self.report is not None

    def failures(self) -> dict[str, str]:
        """The files that failed, each with its reasons on one line (worker: reason; ...)."""
        failures = (self.report or {}).get("failures", [])
        return {f["file"]: failure_reasons(f) for f in failures}
