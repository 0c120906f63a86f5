"""Publishing a finished output: synced, then given its final name exactly once, never through a link."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from virnucpro.stages import is_complete


def publish(temporary: Path, final: Path, complete: Callable[[Path], bool] = is_complete) -> bool:
    """Give a fully written temporary file its final name, unless another copy got there first.

    The data is flushed to disk before the name appears, and the name is
    created with a hard link, which fails rather than replace an existing
    file: an output is written exactly once even when two workers finish
    the same file. Returns False (and removes `temporary`) if a complete
    output already existed; `complete` says what counts as one (a per-pair
    predictions file made by another classifier does not). Neither link(2)
    nor rename(2) follows a symbolic link at the final name: a link planted
    there is not an output (see is_complete) and is replaced, and what it
    points at is never touched.
    """
    fd = os.open(temporary, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, final, follow_symlinks=False)
    except FileExistsError:
        if complete(final):
            published = False
        else:
            # A damaged leftover (truncated by hand, a disk error, another classifier's) or a link is not an
            # output: replace it.
            os.replace(temporary, final)
            published = True
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
            raise
        # A file system without hard links: rename is still atomic, last writer wins.
        if os.path.lexists(final) and complete(final):
            published = False
        else:
            os.replace(temporary, final)
            published = True
    else:
        published = True
    temporary.unlink(missing_ok=True)
    _sync_directory(final.parent)
    return published


def _sync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the data itself is already synced
    finally:
        os.close(fd)
