"""Wire protocol: msgpack maps over ZeroMQ, versioned, every field validated before use.

Each message is one frame holding a map with "v" (the protocol version), "type"
and the fields its type declares. Anything else (bad msgpack, unknown type or
version, a missing or mistyped field, oversize) is a ProtocolError, which the
receiver counts and drops.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import msgpack

from broker import fields
from broker.fields import Check, FieldError

VERSION = 1
DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
ADDRESS_ENV = "VIRNUCPRO_BROKER"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_FILES = 200_000
STAGES = ("dnabert", "esm", "synthetic")


class ProtocolError(ValueError):
    """A message that must be dropped; the reason names the bad field."""


class ErrorCode(str, Enum):
    """What an `error` reply is about; its `reason` says it in words for people."""

    UNKNOWN_JOB = "unknown_job"  # the broker does not know the job (it may have restarted and forgotten it)
    REJECTED_JOB = "rejected_job"  # the submitted job's paths are unacceptable; resubmitting it as is fails again
    # The sender's key may not make this request: a worker's key asking as a client or the reverse, or a
    # client asking about a job another key submitted.
    FORBIDDEN = "forbidden"


STAGE = fields.one_of(STAGES)
FILE_SPEC = fields.exact_map(
    {"path": fields.text, "output": fields.text, "sequences": fields.count, "residues": fields.count}
)
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
CLIENT_REQUESTS = frozenset({"submit", "job", "cancel", "status", "keys"})

# Field checks per message type; a field whose name ends in "?" may be absent.
SCHEMAS: dict[str, dict[str, Check]] = {
    # worker -> broker
    "register": {"name": fields.text, "host": fields.text, "gpu": fields.text, "device": fields.text,
                 "stages": fields.list_of(STAGE, most=len(STAGES)), "pid": fields.count},
    "request": {},
    "heartbeat": {"task": fields.optional(fields.string), "gauges?": GAUGES},
    "done": {"task": fields.text, "seconds": fields.non_negative, "sequences": fields.count,
             "residues": fields.count, "skipped": fields.flag},
    "failed": {"task": fields.text, "reason": fields.text},
    "bye": {},
    # client -> broker
    "submit": {"stage": STAGE, "output_dir": fields.text, "files": fields.list_of(FILE_SPEC, most=MAX_FILES),
               "weighted": fields.flag, "steal": fields.flag, "backup?": fields.flag,  # backup: default true
               "transfer?": TRANSFER},
    "job": {"job": fields.text},
    "cancel": {"job": fields.text},
    "status": {},
    "keys": {},  # the workers' public keys, which the client's file server admits (virnucpro.transfer)
    # broker -> worker
    "registered": {"worker": fields.text, "name": fields.text, "weight": fields.positive,
                   "heartbeat_interval": fields.positive},
    # The worker derives the output's path from `output_dir`, `stage` and `path`, and refuses a task whose
    # `output` says otherwise.
    "assign": {"task": fields.text, "job": fields.text, "stage": STAGE, "path": fields.text, "output_dir": fields.text,
               "output": fields.text, "transfer?": TRANSFER},
    "revoke": {"task": fields.text},
    "reregister": {},
    "ack": {},
    # broker -> client
    "submitted": {"job": fields.text},
    "job_state": {"job": fields.text, "state": fields.text, "progress": fields.any_map,
                  "report?": fields.optional(fields.any_map)},
    "status_report": {"status": fields.any_map},
    "worker_keys": {"keys": fields.list_of(fields.text, most=MAX_FILES, least=0)},
    "error": {"code": fields.one_of([code.value for code in ErrorCode]), "reason": fields.text},
}


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
        message = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"undecodable message ({type(exc).__name__})") from None
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
