"""Which paths a job may name: the checks the client, the broker and every worker apply to the same text.

A job's output directory is where a worker writes as the worker's user, so
it is refused unless it is an absolute, normalized path that is not `/` and
holds no NUL or other control character (a name with a line break cannot be
shown or logged unambiguously). The worker then derives each output's name
itself inside that directory (virnucpro.stages.output_path).
"""

from __future__ import annotations

import posixpath
import re

CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # a regular expression: a job of 100,000 paths is checked in C


def control_character(text: str) -> str | None:
    """The first control character in `text` (NUL, line breaks, escapes, DEL), shown escaped; None if none."""
    found = CONTROL.search(text)
    return repr(found.group()) if found else None


def _named_problem(what: str, path: str) -> str | None:
    """Why `path` cannot name a job's `what` (an input, the output directory) at all, or None."""
    bad = control_character(path)
    if bad is not None:
        return f"{what} {path!r} holds the control character {bad}; rename it"
    if not posixpath.isabs(path):
        return f"{what} {path!r} is not an absolute path; give it from / (workers may run elsewhere)"
    return None


def output_dir_problem(output_dir: str) -> str | None:
    """Why `output_dir` cannot be a job's output directory, or None; the reason says what to give instead."""
    problem = _named_problem("output directory", output_dir)
    if problem:
        return problem
    if posixpath.normpath(output_dir) != output_dir or output_dir.startswith("//"):
        return (f"output directory {output_dir!r} is not in normal form (no '.', '..', repeated or trailing '/'); "
                f"give {posixpath.normpath(output_dir)!r}")
    if output_dir == "/":
        return "output directory '/' is the root of the file system; give a directory of its own"
    return None


def input_problem(path: str) -> str | None:
    """Why `path` cannot be a job's input, or None."""
    return _named_problem("input", path)
