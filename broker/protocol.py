"""Wire protocol: msgpack maps over ZeroMQ, versioned, every field validated before use.

Each message is one frame holding a map with "v" (the protocol version), "type"
and the fields its type declares. Anything else (bad msgpack, unknown type or
version, a missing or mistyped field, oversize) is a ProtocolError, which the
receiver counts and drops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import msgpack

VERSION = 1
DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
ADDRESS_ENV = "VIRNUCPRO_BROKER"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_TEXT = 4096
MAX_FILES = 200_000
STAGES = ("dnabert", "esm", "synthetic")


class ProtocolError(ValueError):
    """A message that must be dropped; the reason names the bad field."""


def _text(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_TEXT


def _optional_text(value: Any) -> bool:
    return value is None or (isinstance(value, str) and len(value) <= MAX_TEXT)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _non_negative(value: Any) -> bool:
    return _number(value) and value >= 0


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


def _stage(value: Any) -> bool:
    return value in STAGES


def _stages(value: Any) -> bool:
    return isinstance(value, list) and 0 < len(value) <= len(STAGES) and all(_stage(s) for s in value)


def _file_spec(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"path", "output", "sequences", "residues"}
        and _text(value["path"])
        and _text(value["output"])
        and _count(value["sequences"])
        and _count(value["residues"])
    )


def _files(value: Any) -> bool:
    return isinstance(value, list) and 0 < len(value) <= MAX_FILES and all(_file_spec(f) for f in value)


def _gauges(value: Any) -> bool:
    return value is None or (
        isinstance(value, dict) and len(value) <= 16 and all(_text(k) and _number(v) for k, v in value.items())
    )


Check = Callable[[Any], bool]

# Field checks per message type; a field whose name ends in "?" may be absent.
SCHEMAS: dict[str, dict[str, Check]] = {
    # worker -> broker
    "register": {"name": _text, "host": _text, "gpu": _text, "device": _text, "stages": _stages, "pid": _count},
    "request": {},
    "heartbeat": {"task": _optional_text, "gauges?": _gauges},
    "done": {"task": _text, "seconds": _non_negative, "sequences": _count, "residues": _count, "skipped": _flag},
    "failed": {"task": _text, "reason": _text},
    "bye": {},
    # client -> broker
    "submit": {"stage": _stage, "output_dir": _text, "files": _files, "weighted": _flag, "steal": _flag},
    "job": {"job": _text},
    "cancel": {"job": _text},
    "status": {},
    # broker -> worker
    "registered": {"worker": _text, "name": _text, "weight": _positive, "heartbeat_interval": _positive},
    "assign": {"task": _text, "job": _text, "stage": _stage, "path": _text, "output": _text},
    "revoke": {"task": _text},
    "reregister": {},
    "ack": {},
    # broker -> client
    "submitted": {"job": _text},
    "job_state": {"job": _text, "state": _text, "progress": lambda v: isinstance(v, dict), "report?": lambda v: v is None or isinstance(v, dict)},
    "status_report": {"status": lambda v: isinstance(v, dict)},
    "error": {"reason": _text},
}


def encode(kind: str, **fields: Any) -> bytes:
    """One message as bytes. The receiver validates it; the sender does not pay for that twice."""
    return msgpack.packb({"v": VERSION, "type": kind, **fields}, use_bin_type=True)


def decode(frame: bytes) -> dict[str, Any]:
    """The validated message in a frame, or ProtocolError saying why it is dropped."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"oversized message ({len(frame)} bytes > {MAX_MESSAGE_BYTES})")
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"undecodable message ({type(exc).__name__})") from None
    validate(message)
    return message


def validate(message: Any) -> None:
    """Raise ProtocolError unless `message` is a known, well-formed message of this version."""
    if not isinstance(message, dict):
        raise ProtocolError("message is not a map")
    if message.get("v") != VERSION:
        raise ProtocolError(f"unknown protocol version {message.get('v')!r}")
    kind = message.get("type")
    schema = SCHEMAS.get(kind) if isinstance(kind, str) else None
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
        if not check(message[key]):
            raise ProtocolError(f"{kind}: bad value for field {key!r}")
