"""One job at the broker as a client feeds and follows it: chunked submission, open jobs, resubmission.

A job's files go in chunks that stay far under the broker's frame limit
(broker.protocol.file_chunks): the first with `submit`, the rest with `add`,
each naming the index its first file takes, so a chunk sent again after a
lost reply is recognised rather than added twice. An open job takes more
files by `add` until `seal`. If the broker forgets the job (it restarted),
every file sent so far whose output is not complete on disk is submitted
again as a new job, open or sealed as the old one was. With a file server
(virnucpro.transfer), each submission's files are offered to it in the
job's order, added ones too, so that a worker that cannot see this
machine's files fetches task k's input by its index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.client import BrokerClient, BrokerError, BrokerUnreachable
from broker.protocol import ErrorCode, file_chunks
from virnucpro.stages import is_complete
from virnucpro.transfer.fileserver import FileServer

MAX_RESUBMITS = 10
# A request that may be repeated unchanged is sent this many times before the broker counts as gone: a
# broker busy with a burst of results may answer one late.
UNANSWERED_TRIES = 3


class JobLost(RuntimeError):
    """The broker lost the job more often than MAX_RESUBMITS; the message names the broker."""


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
    files. `on_resubmit(job)` is called with the new job id whenever the broker lost
    the job and it was submitted again; `classifier` ({"path", "sha256"}) is
    a classify job's; `server` serves the job's files to workers that cannot
    see them.
    """

    def __init__(self, client: BrokerClient, stage: str, output_dir: Path, *, weighted: bool, steal: bool,
                 backup: bool = True, classifier: dict[str, str] | None = None, server: FileServer | None = None,
                 on_resubmit: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.stage = stage
        self.output_dir = output_dir
        self.weighted = weighted
        self.steal = steal
        self.backup = backup
        self.classifier = classifier
        self.server = server
        self.on_resubmit = on_resubmit
        self.files: list[dict[str, Any]] = []  # every file sent, in order
        self.amount = 0  # their summed cost
        self.sealed = False
        self.job = ""
        self.ids: list[str] = []  # the job's id, and the ids of its resubmissions
        self.report: dict[str, Any] | None = None
        self._sent = 0  # files the current job id holds
        self._offer: dict[str, Any] | None = None  # the current job's `transfer`, with a file server
        self._state: dict[str, Any] | None = None
        self._resubmits = 0

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
                self.client.request("cancel", job=self.job, timeout=2.0)
            except (BrokerError, BrokerUnreachable):
                pass

    def _submit(self, files: list[dict[str, Any]]) -> None:
        """Submit `files` as a new job (in chunks); if the broker loses it meanwhile, submit what is left again."""
        while True:
            try:
                self._submit_once(files)
                return
            except BrokerError as exc:
                if exc.code is not ErrorCode.UNKNOWN_JOB:
                    raise
            files = self._before_resubmit()

    def _submit_once(self, files: list[dict[str, Any]]) -> None:
        chunks = list(file_chunks(files)) or [[]]
        extra: dict[str, Any] = {"classifier": self.classifier} if self.classifier is not None else {}
        if self.server is not None:
            self._offer = extra["transfer"] = self.server.offer(files, self._also())
        reply = self.client.request("submit", stage=self.stage, output_dir=str(self.output_dir), files=chunks[0],
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
        """The reply to a request that may be sent again unchanged (add, seal, job): a late answer is tried again."""
        for _ in range(UNANSWERED_TRIES - 1):
            try:
                return self.client.request(kind, **fields)
            except BrokerUnreachable:
                continue
        return self.client.request(kind, **fields)

    def _call(self, kind: str, **fields: Any) -> dict[str, Any] | None:
        """The broker's reply, or None if it had lost the job and the job was submitted again instead."""
        try:
            return self._retried(kind, **fields)
        except BrokerError as exc:
            if exc.code is not ErrorCode.UNKNOWN_JOB:
                raise
        self._submit(self._before_resubmit())
        if self.on_resubmit is not None:
            self.on_resubmit(self.job)
        return None

    def _before_resubmit(self) -> list[dict[str, Any]]:
        """Wait for the broker to answer again; the files sent so far whose outputs are not complete."""
        self._resubmits += 1
        if self._resubmits > MAX_RESUBMITS:
            raise JobLost(f"the broker at {self.client.address} lost the {self.stage} job {MAX_RESUBMITS} times; "
                          "giving up")
        self.client.wait_until_up(self.client.timeout * 6)
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
        return {f["file"]: "; ".join(f"{a['worker']}: {a['reason']}" for a in f["attempts"]) for f in failures}
