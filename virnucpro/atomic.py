"""Write a file so that readers see all of it or none of it: temporary name, sync, rename."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_args: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on a clean exit it is synced and renamed to `path`.

    On an error the temporary file is removed and `path` is left as it was.
    The temporary name starts with a dot and ends in .tmp, so no glob for
    outputs picks it up. `mode` is "w" or "wb"; `open_args` go to open().
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, mode.replace("w", "x"), **open_args) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> Path:
    """`text` (UTF-8) as the whole content of `path`, atomically."""
    with atomic_write(path, encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)
