"""Scratch space a live process holds locked, and the sweep that removes what dead processes left behind.

A worker writes each output in a private scratch directory (mode 0700)
inside the output directory, then links it to its final name; the client's
file server keeps partial uploads in one; a worker whose files travel
(virnucpro.transfer) runs each task in one under $TMPDIR; and atomic_write
(virnucpro.atomic) writes a temporary file beside its target. A process
killed meanwhile (SIGKILL, a power cut) leaves them behind. `sweep` removes
those that no live process holds, and never one that is in use:

- The owner holds an exclusive lock (flock) on a lock file for as long as
  it uses the space: the temporary file itself, or `NAME.lock` beside a
  scratch directory `NAME`, created first and removed last. Locks die with
  their process, so "unlocked" means "its owner is gone".
- Every such file is created exclusively and never through a link
  (O_CREAT | O_EXCL | O_NOFOLLOW), and a scratch directory by mkdir, which
  fails rather than follow anything planted at its name.
- A sweep can catch a file in the instant between its creation and its
  lock. It removes the name only while it holds the lock; the owner, once
  its own lock is granted, sees the file unlinked and starts over under a
  new name. So nothing in use is ever taken, with no timeouts.
- Only the current user's entries are swept, and only those named as this
  module names them.

NFS: Linux's NFS client sends flock to the server as a whole-file lock
(NLM with NFSv3, the protocol's own locks with NFSv4), so a lock taken on
one machine is seen by a sweep on any other; the lock files are opened
for writing, as NFS requires for an exclusive lock. The locks of a machine
that dies are released by the server after its grace period (about 90 s),
and its leftovers are swept after that. Where no lock can be taken at all
(no lock service: ENOLCK), the owner goes on without one and a sweep
removes nothing it cannot lock. A mount with `local_lock=flock` (or `all`)
keeps locks on each machine: there a sweep on one machine can remove a
live worker's scratch on another; that worker then fails the file, which
another worker redoes, and nothing incomplete is ever published.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

PREFIX = ".virnucpro-"  # every scratch directory's name starts with it
WORK = PREFIX + "work-"  # a worker's, in an output directory
UPLOADS = PREFIX + "uploads-"  # a client's file server's, in an output directory
TASK = PREFIX + "task-"  # a worker's for a task whose files travel, in $TMPDIR
LOCK_SUFFIX = ".lock"
# atomic_write's temporary files: ".NAME.<32 hex digits>.tmp".
TEMPORARY = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")
CREATE_ATTEMPTS = 8


def _lock(fd: int, wait: bool) -> bool | None:
    """Take the exclusive lock on `fd`: True, False if another process holds it, None if locks do not work here."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK (no lock service), EBADF or EOPNOTSUPP: a file system without these locks
    return True


def create_locked(make_name: Callable[[], Path], mode: int = 0o600) -> tuple[Path, int]:
    """Create a new file at `make_name()`, exclusively and never through a link, and lock it: (path, open fd).

    The lock lasts while the fd is open. If a sweep took the file between its
    creation and the lock, it is made again under a new name.
    """
    for _ in range(CREATE_ATTEMPTS):
        path = make_name()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        _lock(fd, wait=True)
        if os.fstat(fd).st_nlink > 0:
            return path, fd
        os.close(fd)
    raise OSError(errno.EAGAIN, f"{path.parent}: files made there keep disappearing; is another process removing them?")


class Scratch:
    """A private directory (mode 0700) that this process holds until `close`, which removes it."""

    def __init__(self, parent: Path, prefix: str) -> None:
        lock, self._fd = create_locked(lambda: parent / f"{prefix}{secrets.token_hex(8)}{LOCK_SUFFIX}")
        self._lock_path = lock
        self.path = lock.with_name(lock.name.removesuffix(LOCK_SUFFIX))
        try:
            self.path.mkdir(mode=0o700)
        except OSError:
            self._release()
            raise

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        self._lock_path.unlink(missing_ok=True)  # last, still locked: a sweep never sees the directory unlocked
        os.close(self._fd)


def _take(path: Path) -> int | None:
    """Open and lock `path` if it is this user's file and no live process holds it; the fd, else None."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        # Still the file at that name, locked by us: not one its owner unlinked and made again meanwhile.
        if info.st_uid == os.geteuid() and _lock(fd, wait=False) and os.path.samestat(os.fstat(fd), os.lstat(path)):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def sweep(directory: Path) -> list[Path]:
    """Remove the scratch directories and temporary files in `directory` that no live process holds; what went."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    removed = []
    for entry in entries:
        path = Path(entry.path)
        try:
            mine = entry.stat(follow_symlinks=False).st_uid == os.geteuid()
        except OSError:
            continue
        if not mine:
            continue
        if entry.name.startswith(PREFIX) and entry.name.endswith(LOCK_SUFFIX) and entry.is_file(follow_symlinks=False):
            fd = _take(path)
            if fd is None:
                continue
            shutil.rmtree(path.with_name(entry.name.removesuffix(LOCK_SUFFIX)), ignore_errors=True)
            path.unlink(missing_ok=True)
            os.close(fd)
            removed.append(path)
        elif (entry.name.startswith(PREFIX) and entry.is_dir(follow_symlinks=False)
              and not os.path.lexists(f"{entry.path}{LOCK_SUFFIX}")):
            # Its owner makes the lock file before it and removes the lock file after it: without one, it is
            # what a sweep or an owner killed halfway through removing it left.
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            fd = _take(path)
            if fd is None:
                continue
            path.unlink(missing_ok=True)
            os.close(fd)
            removed.append(path)
    return removed
