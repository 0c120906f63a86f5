"""The client's file server: a ROUTER socket on its own thread that serves a job's inputs and takes its outputs.

`virnucpro embed` (and `predict`, through it) runs one for the life of each
job unless `--transfer never`. Workers connect to it directly; the broker
only passes on its address, the job's token and, unless the client runs
with --insecure, the server's CURVE public key (a key pair made here for
the job). Then the channel is encrypted and only the keys the broker admits
as workers may connect at all (the client asks the broker for them), and
every request must also carry the job's token. What to answer is decided
by virnucpro.transfer.core; this shell reads and hashes inputs, writes
uploads into a private directory inside the output directory, and
publishes each verified output under its final name exactly once
(virnucpro.worker.publish).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import zmq

from broker.protocol import ProtocolError
from broker.security import KeyPair, serve_securely
from virnucpro import scratch
from virnucpro.scratch import Scratch
from virnucpro.stages import is_complete
from virnucpro.transfer import wire
from virnucpro.transfer.core import (
    DescribeInput,
    DiscardUpload,
    FileServerCore,
    PublishUpload,
    Reply,
    SendInput,
    ServedFile,
    ServerInstruction,
    WriteUpload,
)
from virnucpro.transfer.wire import CREDIT, MAX_CHUNK, Refusal
from virnucpro.worker.publish import publish

logger = logging.getLogger("virnucpro.transfer")

MODES = ("auto", "always", "never")
MARKER_PREFIX = ".virnucpro-marker-"
# Messages queued per worker either way: a worker that asks for more than its credit gets nothing more in memory.
QUEUE = 4 * CREDIT
POLL_MS = 100
TICK = 1.0


class TransferSetupError(RuntimeError):
    """The file server cannot start; says what to change."""


def reachable_host(broker: str) -> str:
    """The local address this machine uses to reach the broker's host: workers that reach the broker reach it too.

    Nothing is sent: connecting a UDP socket only chooses the route.
    """
    if not broker.startswith("tcp://"):
        return "127.0.0.1"  # ipc:// and inproc:// brokers are on this machine
    host, _, port = broker.removeprefix("tcp://").rpartition(":")
    host = host.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.connect(address)
            return str(probe.getsockname()[0])
    except (OSError, ValueError) as exc:
        raise TransferSetupError(f"cannot tell which address of this machine reaches the broker at {broker} "
                                 f"({exc}); give --transfer-address HOST") from None


def bind_address(broker: str, override: str | None) -> str:
    """The tcp:// address to bind: --transfer-address (HOST, HOST:PORT or tcp://HOST:PORT), else the one that
    reaches the broker; on a free port unless one is given."""
    if override is None:
        host, port = reachable_host(broker), "*"
    else:
        text = override.removeprefix("tcp://")
        if text.startswith("["):  # [IPv6]:PORT
            host, _, rest = text[1:].partition("]")
            port = rest.removeprefix(":") or "*"
        elif text.count(":") == 1:
            host, port = text.split(":")
        else:  # a host name, an IPv4 address, or a bare IPv6 address
            host, port = text, "*"
        if port != "*" and not port.isdigit():
            raise TransferSetupError(f"--transfer-address {override}: the port must be a number")
        if host in ("", "*", "0.0.0.0", "::"):
            raise TransferSetupError(f"--transfer-address {override}: give the address workers use to reach this "
                                     "machine, not a wildcard")
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class FileServer:
    """Serves the files of one job (and of its resubmissions) until `close`."""

    def __init__(self, output_dir: Path, bind: str, workers: Collection[str] | None, marker: bool) -> None:
        """`workers`: the public keys (Z85 text) that may connect, over CURVE with a key pair made for this job;
        None serves in the clear (--insecure). `marker`: leave the marker (--transfer auto)."""
        self.output_dir = output_dir
        self.marker: Path | None = None
        self.marker_sha256: str | None = None
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            sweep(output_dir)
            # Locked while this server lives, so that another client's sweep leaves it alone.
            self._uploads = Scratch(output_dir, scratch.UPLOADS)
        except OSError as exc:
            raise TransferSetupError(f"{output_dir}: cannot prepare it for file transfers ({exc.strerror}); make it "
                                     "writable, or pass --transfer never") from None
        self.upload_dir = self._uploads.path
        if marker:
            self.marker = output_dir / (MARKER_PREFIX + self.upload_dir.name.removeprefix(scratch.UPLOADS))
            try:
                content = secrets.token_bytes(wire.MARKER_BYTES)
                self.marker.write_bytes(content)
                self.marker_sha256 = wire.marker_digest(content)
            except OSError as exc:
                self._remove_files()
                raise TransferSetupError(f"{output_dir}: cannot write the marker file ({exc.strerror}); make it "
                                         "writable, or pass --transfer never") from None
        self._context = zmq.Context()  # its own, so that no ZAP handler of another socket applies here
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_CHUNK + 65536)
        self._socket.setsockopt(zmq.SNDHWM, QUEUE)
        self._socket.setsockopt(zmq.RCVHWM, QUEUE)
        self.public_key: str | None = None
        self._authenticator = None
        if workers is not None:
            public, secret = zmq.curve_keypair()
            self._authenticator = serve_securely(self._context, self._socket, KeyPair(public, secret, Path("")), workers)
            self.public_key = public.decode("ascii")
        if ":" in bind.removeprefix("tcp://").rpartition(":")[0]:
            self._socket.setsockopt(zmq.IPV6, 1)
        try:
            self._socket.bind(bind)
        except zmq.ZMQError as exc:
            self._close_socket()
            self._remove_files()
            raise TransferSetupError(f"cannot listen on {bind} for workers' file transfers ({exc}); give "
                                     "--transfer-address HOST[:PORT] of this machine, or --transfer never") from None
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.core = FileServerCore(str(self.upload_dir))
        self.sent_bytes = self.stored_files = self.stored_bytes = self.dropped = 0
        self._sent: set[str] = set()  # inputs whose last chunk went out
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="file-server", daemon=True)
        self._upload_fds: dict[str, int] = {}
        self._digests: dict[str, tuple[tuple[int, int, int], str]] = {}

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def __enter__(self) -> FileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def offer(self, files: Sequence[dict[str, Any]], also: Sequence[str] = ()) -> dict[str, Any]:
        """Serve these files (a submission's `files`, in order) under a new token; the submission's `transfer`.

        A file's `paired` input, then the paths in `also` (a classify job's
        classifier), are served as its further inputs.
        """
        token = secrets.token_urlsafe(32)
        with self._lock:
            self.core.add_job(token, served_files(files, also))
        return {"address": self.address, "token": token, "server_key": self.public_key,
                "marker": str(self.marker) if self.marker else None, "marker_sha256": self.marker_sha256}

    def serve_more(self, offer: dict[str, Any], files: Sequence[dict[str, Any]], also: Sequence[str] = ()) -> None:
        """Serve `files` too under `offer`'s token, after those offered already (an open job's added files)."""
        with self._lock:
            self.core.add_files(offer["token"], served_files(files, also))

    def summary(self) -> str | None:
        """What travelled over the connection, for people; None if nothing did."""
        if not (self._sent or self.stored_files):
            return None
        return (f"transfers: {len(self._sent)} inputs sent ({self.sent_bytes / 1e6:,.1f} MB), {self.stored_files} "
                f"outputs received and verified ({self.stored_bytes / 1e6:,.1f} MB) over {self.address}")

    def close(self) -> None:
        """Stop serving; remove the marker and every partial upload."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            self._perform(self.core.close())
        for fd in self._upload_fds.values():
            os.close(fd)
        self._upload_fds.clear()
        self._remove_files()
        self._close_socket()

    def _close_socket(self) -> None:
        self._socket.close(0)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()

    def _remove_files(self) -> None:
        if self.marker is not None:
            self.marker.unlink(missing_ok=True)
        self._uploads.close()

    # ------------------------------------------------------------- loop

    def _serve(self) -> None:
        next_tick = time.monotonic() + TICK
        while not self._stop.is_set():
            if self._socket.poll(POLL_MS):
                for _ in range(1000):  # bounded, so the timer still runs under a flood
                    try:
                        frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._receive(frames)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK
                with self._lock:
                    self._perform(self.core.tick(time.monotonic()))

    def _receive(self, frames: list[zmq.Frame]) -> None:
        try:
            message, data = wire.decode(frames[1:], wire.REQUESTS)
        except ProtocolError as exc:
            self.dropped += 1
            logger.debug("dropped a file-channel message: %s", exc)
            return
        with self._lock:
            self._perform(self.core.handle(frames[0].bytes, message, data, time.monotonic()))

    def _send(self, peer: bytes, kind: str, data: wire.Data | None = None, **fields: Any) -> None:
        try:
            self._socket.send_multipart([peer, *wire.encode(kind, data, **fields)], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass  # the worker's queue is full (it asked beyond its credit): it asks again after silence

    def _perform(self, instructions: list[ServerInstruction]) -> None:
        for instruction in instructions:
            if isinstance(instruction, Reply):
                self._send(instruction.peer, instruction.kind, **instruction.fields)
            elif isinstance(instruction, DescribeInput):
                self._describe(instruction)
            elif isinstance(instruction, SendInput):
                self._send_input(instruction)
            elif isinstance(instruction, WriteUpload):
                self._write(instruction)
            elif isinstance(instruction, PublishUpload):
                self._publish(instruction)
            elif isinstance(instruction, DiscardUpload):
                self._discard(instruction.path)

    # ---------------------------------------------------------- inputs

    def _describe(self, ask: DescribeInput) -> None:
        try:
            size, digest = self._digest(ask.input)
        except OSError as exc:
            self._refuse(ask.peer, ask.task, Refusal.CHANGED, f"cannot read the input {ask.input}: {exc.strerror}")
            return
        complete = is_complete(ask.output)
        self._send(ask.peer, "input", task=ask.task, size=size, sha256=digest, complete=complete)

    def _digest(self, path: str) -> tuple[int, str]:
        """The input's size and SHA-256, hashed once per version of the file."""
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        version = (info.st_size, info.st_mtime_ns, info.st_ino)
        cached = self._digests.get(path)
        if cached is not None and cached[0] == version:
            return info.st_size, cached[1]
        digest = wire.file_digest(path)
        self._digests[path] = (version, digest)
        return info.st_size, digest

    def _send_input(self, ask: SendInput) -> None:
        try:
            fd = os.open(ask.input, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.pread(fd, ask.size, ask.offset)
            finally:
                os.close(fd)
        except OSError as exc:
            self._refuse(ask.peer, ask.task, Refusal.CHANGED, f"cannot read the input {ask.input}: {exc.strerror}")
            return
        if len(data) != ask.size:
            self._refuse(ask.peer, ask.task, Refusal.CHANGED,
                         f"the input {ask.input} ends before byte {ask.offset + ask.size}: it changed since it "
                         "was described")
            return
        self.sent_bytes += len(data)
        cached = self._digests.get(ask.input)
        if cached is not None and ask.offset + ask.size == cached[0][0]:
            self._sent.add(ask.input)
        self._send(ask.peer, "chunk", data, task=ask.task, offset=ask.offset)

    # --------------------------------------------------------- uploads

    def _write(self, write: WriteUpload) -> None:
        try:
            fd = self._upload_fds.get(write.path)
            if fd is None:
                fd = os.open(write.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
                self._upload_fds[write.path] = fd
            wire.write_at(fd, write.data, write.offset)
        except OSError as exc:
            self._perform(self.core.upload_failed(write.path, f"the client cannot write the output: {exc.strerror}"))

    def _publish(self, done: PublishUpload) -> None:
        fd = self._upload_fds.pop(done.path, None)
        if fd is not None:
            os.close(fd)
        temporary, final = Path(done.path), Path(done.output)
        if not temporary.exists():
            temporary.touch()  # an empty output: no chunk was written
        if not is_complete(temporary):
            self._perform(self.core.upload_failed(done.path, f"{final.name} arrived whole but is not a complete "
                                                             "output"))
            return
        size = temporary.stat().st_size
        try:
            published = publish(temporary, final)
        except OSError as exc:
            self._perform(self.core.upload_failed(done.path, f"the client cannot publish {final}: {exc.strerror}"))
            return
        if published:
            self.stored_files += 1
            self.stored_bytes += size
        self._perform(self.core.published(done.path, published, time.monotonic()))

    def _discard(self, path: str) -> None:
        fd = self._upload_fds.pop(path, None)
        if fd is not None:
            os.close(fd)
        Path(path).unlink(missing_ok=True)

    def _refuse(self, peer: bytes, task: str, code: Refusal, reason: str) -> None:
        self._send(peer, "refused", task=task, code=code.value, reason=reason)


def sweep(output_dir: Path) -> list[Path]:
    """Remove what dead file servers and workers left in `output_dir` (partial uploads, scratch, markers); what went.

    Live ones hold locks on theirs (virnucpro.scratch), so only the
    leftovers of dead ones are taken.
    """
    removed = scratch.sweep(output_dir)
    for marker in output_dir.glob(f"{MARKER_PREFIX}*"):
        if not (output_dir / (scratch.UPLOADS + marker.name.removeprefix(MARKER_PREFIX))).exists():
            marker.unlink(missing_ok=True)
            removed.append(marker)
    return removed


def served_files(files: Sequence[dict[str, Any]], also: Sequence[str]) -> list[ServedFile]:
    """What the core serves for these file specs: each one's input, its `paired` input and `also`, and its output."""
    return [ServedFile(f["path"], f["output"], (*([f["paired"]] if "paired" in f else []), *also)) for f in files]


def start_file_server(broker: str, workers: Collection[str] | None, output_dir: Path, mode: str,
                      address: str | None = None) -> FileServer | None:
    """A running file server for one job (None with --transfer never); close it when the job ends.

    `workers`: the keys the broker admits as workers, the only ones let in
    (None: the client runs with --insecure, and so does the channel).
    """
    if mode not in MODES:
        raise TransferSetupError(f"--transfer {mode}: must be one of {', '.join(MODES)}")
    if mode == "never":
        return None
    return FileServer(output_dir, bind_address(broker, address), workers, marker=mode == "auto").start()
