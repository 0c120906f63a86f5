"""The file channel's messages between a worker and the client's file server, their framing, and its checksums.

A message is a msgpack header frame, validated by broker.protocol against
this channel's schemas, followed for a `chunk` by one raw data frame (the
bytes are never copied into msgpack). Every request a worker sends carries
the job's token; files are named by task, and an output by its file name,
which the server checks against its own record of the job. Both ends share
the checksum of a file (SHA-256), of the marker, and writing a chunk in place.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from enum import Enum
from typing import Any

import zmq

from broker import fields, protocol
from broker.fields import Check, FieldError
from broker.protocol import ProtocolError

# Bytes per chunk, and chunks a receiver keeps asked for: a transfer holds at most CHUNK x CREDIT in flight.
CHUNK = 1 << 20
CREDIT = 8
# Chunk sizes a receiver may ask for; a larger request is refused, a larger data frame dropped.
MAX_CHUNK = 4 << 20


class Refusal(str, Enum):
    """Why the file server refused a request; `reason` says it in words."""

    TOKEN = "token"  # not the token of any job this server serves
    UNKNOWN = "unknown"  # not one of the job's files
    INVALID = "invalid"  # a range or size the file does not have
    CHANGED = "changed"  # the input changed (or vanished) while it was being sent
    MISMATCH = "mismatch"  # the bytes received do not have the announced SHA-256
    BUSY = "busy"  # too many uploads open at once
    FAILED = "failed"  # the client could not store the output (disk full, not a complete output)


def sha256_hex(value: Any) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise FieldError("must be a SHA-256 digest (64 lower-case hex digits)")


def chunk_size(value: Any) -> None:
    fields.count(value)
    if not 0 < value <= MAX_CHUNK:
        raise FieldError(f"must be 1 to {MAX_CHUNK} bytes")


# worker -> file server. `output` is the output's file name as the worker's assignment gives it.
REQUESTS: dict[str, dict[str, Check]] = {
    # `input`: which of the task's inputs, 0 (its file, the default) or a further one (a classify task's 1 and 2).
    "stat": {"token": fields.text, "task": fields.text, "output": fields.text, "input?": fields.count},
    "get": {"token": fields.text, "task": fields.text, "offset": fields.count, "size": chunk_size,
            "input?": fields.count},
    "put": {"token": fields.text, "task": fields.text, "output": fields.text, "size": fields.count,
            "sha256": sha256_hex},
    "chunk": {"token": fields.text, "task": fields.text, "offset": fields.count},
}
# file server -> worker. `complete`: the client already holds a complete output, so there is nothing to do.
REPLIES: dict[str, dict[str, Check]] = {
    "input": {"task": fields.text, "size": fields.count, "sha256": sha256_hex, "complete": fields.flag},
    "chunk": {"task": fields.text, "offset": fields.count},
    "want": {"task": fields.text, "offset": fields.count, "size": chunk_size},
    "stored": {"task": fields.text, "published": fields.flag},
    "refused": {"task": fields.string, "code": fields.one_of([r.value for r in Refusal]), "reason": fields.text},
}

Data = bytes | memoryview


def encode(kind: str, data: Data | None = None, **values: Any) -> list[Data]:
    """The frames of one message: its header, and its data for a chunk."""
    header = protocol.encode(kind, **values)
    return [header] if data is None else [header, data]


def decode(frames: Sequence[zmq.Frame | bytes], schemas: dict[str, dict[str, Check]]) -> tuple[dict[str, Any], Data | None]:
    """(message, data) of a message's frames, or ProtocolError: a chunk has exactly one data frame, others none."""
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(f"{len(frames)} frames (a message has a header and, for a chunk, data)")
    first = frames[0]
    message = protocol.decode(first.bytes if isinstance(first, zmq.Frame) else first, schemas)
    if len(frames) == 1:
        if message["type"] == "chunk":
            raise ProtocolError("chunk: no data frame")
        return message, None
    if message["type"] != "chunk":
        raise ProtocolError(f"{message['type']}: unexpected data frame")
    second = frames[1]
    data = second.buffer if isinstance(second, zmq.Frame) else second
    if len(data) > MAX_CHUNK:
        raise ProtocolError(f"chunk: {len(data)} bytes of data, more than {MAX_CHUNK}")
    return message, data


# The marker: a file of random bytes that the client leaves in the output directory. A worker that reads
# bytes with the announced SHA-256 there sees the client's files and reads and writes them itself.
MARKER_BYTES = 32


def marker_digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """The channel's checksum of a file: the SHA-256 of its bytes, read a chunk at a time."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while read := handle.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()


def write_at(fd: int, data: Data, offset: int) -> None:
    """Write all of `data` at `offset` of the open file `fd` (pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
