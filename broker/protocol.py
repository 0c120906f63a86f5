"""Wire protocol: msgpack maps over ZeroMQ, versioned, every field validated before use.

Each message is one frame holding a map with "v" (the protocol version), "type"
and the fields its type declares. Anything else (bad msgpack, unknown type or
version, a missing or mistyped field, oversize) is a ProtocolError, which the
receiver counts and drops.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from enum import Enum
from typing import Any

import msgpack

from broker import fields
from broker.fields import Check, FieldError

# 2: error codes, fingerprints, progress in heartbeats, output_dir in assign, open jobs;
# 3: `request` may name the file whose output the worker still publishes (its result follows).
VERSION = 3
DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
ADDRESS_ENV = "VIRNUCPRO_BROKER"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Files in one `submit` or `add` message; clients cut larger submissions into chunks (file_chunks).
MAX_FILES = 200_000
# The longest worker name, host and GPU name a worker may register: far above any real one, and small enough
# that a status reply listing a page of workers stays small.
MAX_NAME = 512
# Length limits for msgpack, from what a message may hold: no list longer than a submission's files, no map
# with more entries than the largest record (a job report), no string longer than a text field in UTF-8,
# no binary (file data travels in frames of their own). Without them one frame of tiny items unpacks into
# millions of objects before any schema check sees it.
UNPACK_LIMITS = {
    "max_array_len": MAX_FILES, "max_map_len": 256, "max_str_len": 4 * fields.MAX_TEXT,
    "max_bin_len": 0, "max_ext_len": 0,
}
# A chunk's budget: well under the frame limit, and small enough that seeding it keeps the broker responsive.
CHUNK_BYTES = MAX_MESSAGE_BYTES // 4
CHUNK_FILES = 10_000
# Files in one job, over all its chunks.
MAX_JOB_FILES = 1_000_000
STAGES = ("dnabert", "esm", "classify", "synthetic")
# Stages whose tasks run on a worker's CPU whatever its device and cost frames rather than residues: their
# times are not the device's speed, and the workers' speeds give no estimate of their remaining time.
UNTIMED_STAGES = ("classify",)


class ProtocolError(ValueError):
    """A message that must be dropped; the reason names the bad field."""


class ErrorCode(str, Enum):
    """What an `error` reply is about; its `reason` says it in words for people."""

    UNKNOWN_JOB = "unknown_job"  # the broker does not know the job (it may have restarted and forgotten it)
    # The request cannot be done as sent (unacceptable paths, a sealed or ended job, too many files);
    # sending it again as is fails again.
    REJECTED_JOB = "rejected_job"
    INVALID_MESSAGE = "invalid_message"  # the request was not a well-formed message of this protocol version
    REFUSED = "refused"  # the broker is at a limit (queued tasks): the same request may succeed later
    # The sender's key may not make this request: a worker's key asking as a client or the reverse, or a
    # client asking about a job another key submitted.
    FORBIDDEN = "forbidden"


STAGE = fields.one_of(STAGES)
NAME = fields.text_of(most=MAX_NAME)
# `paired`: the second input of a task that reads two files (classify: the ESM-2 features beside `path`'s
# DNABERT-S features of the same file pair).
# `fingerprint`: the input as the client measured it at submission; the worker that runs the file refuses
# one whose size, modification time or record count is no longer that (virnucpro.fingerprint).
FINGERPRINT = fields.exact_map({"size": fields.count, "mtime_ns": fields.count, "records": fields.count})
FILE_SPEC = fields.exact_map(
    {"path": fields.text, "output": fields.text, "sequences": fields.count, "residues": fields.count},
    optional={"paired": fields.text, "fingerprint": FINGERPRINT},
)
# The classifier checkpoint a classify job's workers load, and the digest they check it against.
CLASSIFIER = fields.exact_map({"path": fields.text, "sha256": fields.sha256})
GAUGES = fields.optional(fields.map_of(fields.text, fields.number, most=16))
# How a worker that cannot see the client's files reaches the client's file server (virnucpro.transfer):
# its address, the job's token, its CURVE public key (when the broker connection is encrypted), and the
# marker file by which a worker tells whether it sees the client's files (absent: always transfer).
TRANSFER = fields.optional(fields.exact_map({
    "address": fields.text, "token": fields.text, "server_key": fields.optional(fields.text),
    "marker": fields.optional(fields.text), "marker_sha256": fields.optional(fields.text),
}))

# What each role may send: a key admitted only as a worker gets a `forbidden` error for a client's request,
# and the reverse.
WORKER_REQUESTS = frozenset({"register", "request", "heartbeat", "done", "failed", "bye"})
CLIENT_REQUESTS = frozenset({"submit", "add", "seal", "job", "cancel", "status", "keys"})

# Field checks per message type; a field whose name ends in "?" may be absent.
SCHEMAS: dict[str, dict[str, Check]] = {
    # worker -> broker
    "register": {"name": NAME, "host": NAME, "gpu": NAME, "device": NAME,
                 "stages": fields.list_of(STAGE, most=len(STAGES)), "pid": fields.count},
    # finishing: the task the worker ran to the end and still publishes; its done or failed follows, and the
    # worker takes the next file meanwhile.
    "request": {"finishing?": fields.text},
    # progress: units of work (batches) the running task has begun, counted from 0 for each task.
    "heartbeat": {"task": fields.optional(fields.string), "gauges?": GAUGES, "progress?": fields.count},
    "done": {"task": fields.text, "seconds": fields.non_negative, "sequences": fields.count,
             "residues": fields.count, "skipped": fields.flag},
    "failed": {"task": fields.text, "reason": fields.text},
    "bye": {},
    # client -> broker
    # A job submitted with "open" true takes more files by `add` until `seal`; otherwise it is sealed at once.
    "submit": {"stage": STAGE, "output_dir": fields.text,
               "files": fields.list_of(FILE_SPEC, most=MAX_FILES, least=0),
               "weighted": fields.flag, "steal": fields.flag, "backup?": fields.flag,  # backup: default true
               "transfer?": TRANSFER, "open?": fields.flag, "classifier?": CLASSIFIER},
    # `first`: the index in the job of the first file sent (the count sent before), so a resent chunk is known.
    "add": {"job": fields.text, "first": fields.count, "files": fields.list_of(FILE_SPEC, most=MAX_FILES)},
    # `files`: how many files the client sent in all; the broker refuses to seal a job that holds another count.
    "seal": {"job": fields.text, "files": fields.count},
    "job": {"job": fields.text},
    # `by?`: how the cancelling client describes itself (user@host pid N); its job's report names it.
    "cancel": {"job": fields.text, "by?": fields.text},
    "status": {"page?": fields.count},  # page: 0 (the default) holds the most recent workers and jobs
    "keys": {},  # the workers' public keys, which the client's file server admits (virnucpro.transfer)
    # broker -> worker
    "registered": {"worker": fields.text, "name": fields.text, "weight": fields.positive,
                   "heartbeat_interval": fields.positive},
    # The worker derives the output's path from `output_dir`, `stage` and `path`, and refuses a task whose
    # `output` says otherwise.
    "assign": {"task": fields.text, "job": fields.text, "stage": STAGE, "path": fields.text, "output_dir": fields.text,
               "output": fields.text, "transfer?": TRANSFER, "paired?": fields.text, "classifier?": CLASSIFIER,
               "fingerprint?": FINGERPRINT},
    # abandon: the task showed no progress for the task timeout; a worker that cannot stop it restarts itself.
    "revoke": {"task": fields.text, "abandon?": fields.flag},
    "reregister": {},
    "ack": {},
    # broker -> client
    "submitted": {"job": fields.text},
    "added": {"job": fields.text, "files": fields.count},
    "job_state": {"job": fields.text, "state": fields.text, "progress": fields.any_map,
                  "report?": fields.optional(fields.any_map)},
    "status_report": {"status": fields.any_map},
    "worker_keys": {"keys": fields.list_of(fields.text, most=MAX_FILES, least=0)},
    "error": {"code": fields.one_of([code.value for code in ErrorCode]), "reason": fields.text},
}


def file_chunks(files: Sequence[dict[str, Any]], most_bytes: int = CHUNK_BYTES,
                most_files: int = CHUNK_FILES) -> Iterator[list[dict[str, Any]]]:
    """`files` cut, in order, into lists whose packed specs total at most `most_bytes` and `most_files` each.

    A `submit` or `add` message carrying one chunk stays within a few hundred
    bytes of that budget, far under MAX_MESSAGE_BYTES, however long the paths.
    """
    chunk: list[dict[str, Any]] = []
    size = 0
    for spec in files:
        spec_bytes = len(msgpack.packb(spec, use_bin_type=True))
        if chunk and (size + spec_bytes > most_bytes or len(chunk) == most_files):
            yield chunk
            chunk, size = [], 0
        chunk.append(spec)
        size += spec_bytes
    if chunk:
        yield chunk


def encode(kind: str, **values: Any) -> bytes:
    """One message as bytes. The receiver validates it; the sender does not pay for that twice."""
    return msgpack.packb({"v": VERSION, "type": kind, **values}, use_bin_type=True)


def decode(frame: bytes, schemas: dict[str, dict[str, Check]] = SCHEMAS) -> dict[str, Any]:
    """The validated message in a frame, or ProtocolError saying why it is dropped.

    `schemas`: the message types the receiver accepts (another channel, such as
    virnucpro.transfer's, has its own).
    """
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"oversized message ({len(frame)} bytes > {MAX_MESSAGE_BYTES})")
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=True, **UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"undecodable message ({type(exc).__name__}: {str(exc)[:200]})") from None
    validate(message, schemas)
    return message


def validate(message: Any, schemas: dict[str, dict[str, Check]] = SCHEMAS) -> None:
    """Raise ProtocolError unless `message` is a known, well-formed message of this version."""
    if not isinstance(message, dict):
        raise ProtocolError("message is not a map")
    if message.get("v") != VERSION:
        raise ProtocolError(f"unknown protocol version {message.get('v')!r}")
    kind = message.get("type")
    schema = schemas.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    allowed = {"v", "type"} | {name.rstrip("?") for name in schema}
    extra = set(message) - allowed
    if extra:
        raise ProtocolError(f"{kind}: unexpected fields {sorted(map(str, extra))}")
    for name, check in schema.items():
        key = name.rstrip("?")
        if key not in message:
            if name.endswith("?"):
                continue
            raise ProtocolError(f"{kind}: missing field {key!r}")
        try:
            check(message[key])
        except FieldError as exc:
            raise ProtocolError(f"{kind}: bad value for field {key!r}: {exc}") from None
