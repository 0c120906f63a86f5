"""An input's fingerprint at submission (size, modification time, records) and the worker's checks against it.

The client measures each input when it submits a job; the worker that runs
the file checks, before it reads it, that the size and modification time are
still those, and, before it publishes the output, that it wrote as many
records as the input held then. Either mismatch fails the attempt with
InputChanged, so that an input truncated or rewritten after submission never
gives an output that counts as complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REASON = "input changed since submission"


class InputChanged(ValueError):
    """The input is not the file that was submitted; the message names it and says what changed."""


def fingerprint(info: os.stat_result, records: int) -> dict[str, int]:
    """What a job's file spec carries of an input (`info`: its os.stat then): size, modification time, records."""
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "records": records}


def check_unchanged(path: str | Path, expected: dict[str, Any] | None, *, copy_of: str | None = None) -> None:
    """InputChanged unless `path` still has the size and modification time of `expected`.

    `copy_of`: the input that `path` was fetched from (virnucpro.transfer);
    only the size is checked then, since a copy's own time says nothing of
    the original's. Nothing to check without a fingerprint.
    """
    if expected is None:
        return
    name = copy_of or path
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputChanged(f"{REASON}: {name}: file not found, though it was there then") from None
    if info.st_size != expected["size"]:
        raise InputChanged(f"{REASON}: {name} held {expected['size']:,} bytes then and {info.st_size:,} now; "
                           "submit the job again if the new contents are meant")
    if copy_of is None and info.st_mtime_ns != expected["mtime_ns"]:
        raise InputChanged(f"{REASON}: {path} was modified after the job was submitted; submit the job again if "
                           "the new contents are meant")


def check_records(path: str | Path, expected: dict[str, Any] | None, written: int) -> None:
    """InputChanged unless the output holds as many records (`written`) as `path` held at submission."""
    if expected is not None and written != expected["records"]:
        raise InputChanged(f"{REASON}: {path} held {expected['records']:,} records then, but {written:,} were read "
                           "from it; submit the job again if the new contents are meant")
