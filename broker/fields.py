"""Field checks shared by the wire protocol's messages and the throughput log's records.

A check takes a decoded value (from msgpack or JSON) and returns nothing when
the value is acceptable, or raises FieldError with what the value must be,
worded to follow the field's name: "field 'residues' must be a whole number".
Checks never convert: the value that passed is the value used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

MAX_TEXT = 4096

Check = Callable[[Any], None]


class FieldError(ValueError):
    """A value its field cannot hold; the message says what it must be."""


def string(value: Any) -> None:
    """A string of at most MAX_TEXT characters, possibly empty."""
    if not isinstance(value, str):
        raise FieldError("must be a string")
    if len(value) > MAX_TEXT:
        raise FieldError(f"must be at most {MAX_TEXT} characters long")


def text(value: Any) -> None:
    """A string of 1 to MAX_TEXT characters."""
    string(value)
    if not value:
        raise FieldError("must not be empty")


def number(value: Any) -> None:
    """A finite integer or float; true and false are not numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FieldError("must be a finite number")


def non_negative(value: Any) -> None:
    number(value)
    if value < 0:
        raise FieldError("must not be negative")


def positive(value: Any) -> None:
    number(value)
    if value <= 0:
        raise FieldError("must be positive")


def count(value: Any) -> None:
    """A whole number of at least zero, written as an integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FieldError("must be a whole number (0 or more)")


def flag(value: Any) -> None:
    if not isinstance(value, bool):
        raise FieldError("must be true or false")


def any_map(value: Any) -> None:
    if not isinstance(value, dict):
        raise FieldError("must be a map")


def optional(check: Check) -> Check:
    """`check`, or None."""

    def optional_check(value: Any) -> None:
        if value is not None:
            check(value)

    return optional_check


def one_of(choices: Collection[str]) -> Check:
    def one_of_check(value: Any) -> None:
        if not isinstance(value, str) or value not in choices:
            raise FieldError(f"must be one of {', '.join(choices)}")

    return one_of_check


def list_of(check: Check, most: int, least: int = 1) -> Check:
    """A list of `least` to `most` items, each passing `check`."""

    def list_check(value: Any) -> None:
        if not isinstance(value, list) or not least <= len(value) <= most:
            raise FieldError(f"must be a list of {least} to {most} items")
        for index, item in enumerate(value):
            try:
                check(item)
            except FieldError as exc:
                raise FieldError(f"item {index} {exc}") from None

    return list_check


def map_of(key: Check, value: Check, most: int) -> Check:
    """A map of at most `most` entries, keys passing `key` and values passing `value`."""

    def map_check(entries: Any) -> None:
        any_map(entries)
        if len(entries) > most:
            raise FieldError(f"must have at most {most} entries")
        for name, item in entries.items():
            try:
                key(name)
                value(item)
            except FieldError as exc:
                raise FieldError(f"entry {name!r} {exc}") from None

    return map_check


def exact_map(schema: Mapping[str, Check], optional: Mapping[str, Check] | None = None) -> Check:
    """A map with exactly the keys of `schema`, and perhaps some of `optional`, each value passing its check."""
    optional = dict(optional or {})
    checks = {**schema, **optional}
    wanted = f"exactly the keys {', '.join(schema)}" + (f" (and perhaps {', '.join(optional)})" if optional else "")

    def exact_map_check(value: Any) -> None:
        any_map(value)
        if not set(schema) <= set(value) <= set(checks):
            raise FieldError(f"must have {wanted}")
        for name, item in value.items():
            try:
                checks[name](item)
            except FieldError as exc:
                raise FieldError(f"key {name!r} {exc}") from None

    return exact_map_check


def sha256(value: Any) -> None:
    """A SHA-256 digest as 64 lower-case hexadecimal digits."""
    if not isinstance(value, str) or len(value) != 64 or value.strip("0123456789abcdef"):
        raise FieldError("must be a SHA-256 digest: 64 lower-case hexadecimal digits")
