"""The worker's checks of an input against its fingerprint at submission, and the clients' reconnect waits."""

from __future__ import annotations

import itertools
import os

import pytest

from broker.client import reconnect_waits
from virnucpro.fingerprint import InputChanged, check_records, check_unchanged, fingerprint


def test_an_unchanged_input_passes_every_check(tmp_path):
    path = tmp_path / "a.fa"
    path.write_text(">a\nACGT\n")
    expected = fingerprint(os.stat(path), 1)
    check_unchanged(path, expected)
    check_records(path, expected, 1)


def test_a_truncated_input_is_named_with_both_sizes(tmp_path):
    path = tmp_path / "a.fa"
    path.write_text(">a\nACGT\n>b\nACGT\n")
    expected = fingerprint(os.stat(path), 2)
    path.write_text(">a\nACGT\n")
    with pytest.raises(InputChanged, match=rf"input changed since submission: {path} held 16 bytes then and 8 now"):
        check_unchanged(path, expected)


def test_an_input_rewritten_to_the_same_size_is_caught_by_its_modification_time(tmp_path):
    path = tmp_path / "a.fa"
    path.write_text(">a\nACGT\n")
    expected = fingerprint(os.stat(path), 1)
    path.write_text(">a\nTTTT\n")
    os.utime(path, ns=(expected["mtime_ns"] + 10**9, expected["mtime_ns"] + 10**9))
    with pytest.raises(InputChanged, match=rf"{path} was modified after the job was submitted"):
        check_unchanged(path, expected)


def test_a_fetched_copy_is_checked_by_size_alone_and_named_as_the_original(tmp_path):
    original, copy = tmp_path / "a.fa", tmp_path / "copy.fa"
    original.write_text(">a\nACGT\n")
    expected = fingerprint(os.stat(original), 1)
    copy.write_text(">a\nACGT\n")  # another modification time: not compared
    check_unchanged(copy, expected, copy_of=str(original))
    copy.write_text(">a\nAC\n")
    with pytest.raises(InputChanged, match=rf"input changed since submission: {original} held"):
        check_unchanged(copy, expected, copy_of=str(original))


def test_fewer_records_read_than_submitted_fail_the_attempt(tmp_path):
    with pytest.raises(InputChanged, match="held 3 records then, but 2 were read"):
        check_records(tmp_path / "a.fa", {"size": 1, "mtime_ns": 1, "records": 3}, 2)


def test_a_vanished_input_is_named_as_not_found(tmp_path):
    with pytest.raises(InputChanged, match=rf"input changed since submission: {tmp_path}/a.fa: file not found"):
        check_unchanged(tmp_path / "a.fa", {"size": 1, "mtime_ns": 1, "records": 1})


def test_without_a_fingerprint_nothing_is_checked(tmp_path):
    check_unchanged(tmp_path / "absent.fa", None)
    check_records(tmp_path / "absent.fa", None, 0)


def test_reconnect_waits_start_at_1_s_and_double_up_to_32_s():
    assert list(itertools.islice(reconnect_waits(), 8)) == [1, 2, 4, 8, 16, 32, 32, 32]
