"""The sweep: what dead processes left is removed, and nothing a live process holds ever is."""

from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path

from virnucpro import scratch
from virnucpro.atomic import atomic_write
from virnucpro.scratch import LOCK_SUFFIX, TASK, UPLOADS, WORK, Scratch, create_locked, sweep


def dead_scratch(directory: Path, prefix: str) -> Path:
    """What a process killed while it used a scratch directory leaves: the directory and its unlocked lock file."""
    held = Scratch(directory, prefix)
    (held.path / "half-written.json").write_text('{"records": [')
    os.close(held._fd)  # the lock dies with its process; the files stay
    return held.path


def test_a_scratch_directory_whose_owner_is_gone_is_removed_with_its_lock(tmp_path: Path) -> None:
    left = [dead_scratch(tmp_path, prefix) for prefix in (WORK, UPLOADS, TASK)]
    (tmp_path / "a_synthetic.json").write_text("{}")
    assert sorted(sweep(tmp_path)) == sorted(path.with_name(path.name + LOCK_SUFFIX) for path in left)
    assert [p.name for p in tmp_path.iterdir()] == ["a_synthetic.json"]


def test_a_live_scratch_directory_is_never_removed(tmp_path: Path) -> None:
    dead = dead_scratch(tmp_path, WORK)
    with Scratch(tmp_path, WORK) as live:
        (live.path / "being-written.json").write_text("{")
        sweep(tmp_path)
        assert (live.path / "being-written.json").exists() and not dead.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_scratch_directory_without_its_lock_file_is_what_a_half_done_removal_left(tmp_path: Path) -> None:
    (tmp_path / f"{WORK}orphan").mkdir()
    (tmp_path / f"{WORK}orphan" / "x").write_text("x")
    (tmp_path / ".virnucpro-marker-abc").write_bytes(b"m")  # a file, and the file server's business
    sweep(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".virnucpro-marker-abc"]


def test_a_temporary_file_of_a_killed_writer_is_removed_and_one_being_written_is_not(tmp_path: Path) -> None:
    stale = tmp_path / f".run_report.json.{uuid.uuid4().hex}.tmp"
    stale.write_text("{")
    other = tmp_path / ".notes.tmp"  # not a name atomic_write makes
    other.write_text("x")
    with atomic_write(tmp_path / "predictions.txt") as handle:
        handle.write("half")
        assert sweep(tmp_path) == [stale]
        [being_written] = [p for p in tmp_path.iterdir() if p.name.startswith(".predictions.txt.")]
    assert not being_written.exists() and (tmp_path / "predictions.txt").read_text() == "half"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "predictions.txt"]


def test_a_file_taken_by_a_sweep_before_its_owner_locked_it_is_made_again_under_a_new_name(
        tmp_path: Path, monkeypatch) -> None:
    names = iter(["first", "second"])
    real_lock = scratch._lock

    def sweep_between_create_and_lock(fd: int, wait: bool) -> bool | None:
        if wait and not (tmp_path / "second").exists():
            # The instant between the owner's create and its lock: a sweep locks the file and removes the name.
            sweeper = os.open(tmp_path / "first", os.O_RDWR)
            fcntl.flock(sweeper, fcntl.LOCK_EX | fcntl.LOCK_NB)
            (tmp_path / "first").unlink()
            os.close(sweeper)
        return real_lock(fd, wait)

    monkeypatch.setattr(scratch, "_lock", sweep_between_create_and_lock)
    path, fd = create_locked(lambda: tmp_path / next(names))
    try:
        assert path == tmp_path / "second" and os.fstat(fd).st_nlink == 1
    finally:
        os.close(fd)


def test_a_sweep_leaves_other_users_files_and_links_alone(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / f"{WORK}link{LOCK_SUFFIX}").symlink_to(tmp_path / "nowhere")
    (tmp_path / f"{WORK}dirlink").symlink_to(target)
    assert sweep(tmp_path) == []
    assert target.exists() and (tmp_path / f"{WORK}dirlink").is_symlink()
