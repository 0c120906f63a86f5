"""Write a file so that readers see all of it or none of it: temporary name, sync, rename."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from virnucpro.scratch import create_locked


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_args: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on a clean exit it is synced and renamed to `path`.

    On an error the temporary file is removed and `path` is left as it was.
    The temporary name starts with a dot and ends in .tmp, so no glob for
    outputs picks it up. It is created exclusively, never through a link,
    and locked until renamed, so a sweep (virnucpro.scratch) removes it only
    if this process was killed. `mode` is "w" or "wb"; `open_args` go to open().
    """
    path = Path(path)
    temporary, fd = create_locked(lambda: path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp"), mode=0o666)
    try:
        with open(fd, mode, **open_args) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(temporary, path)  # while still locked: a sweep never sees it unlocked under its name
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> Path:
    """`text` (UTF-8) as the whole content of `path`, atomically."""
    with atomic_write(path, encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)
