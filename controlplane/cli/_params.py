"""Parsing what people type: flag values, percentages, times, and the click types.

Durations and times come from ``controlplane._durations``, shared with the server; the
duration type from ``controlplane._duration_param``, shared with it too.
"""

from __future__ import annotations

import json
import math
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from controlplane._duration_param import DurationParam
from controlplane._durations import DURATION_FORMS, TIME_FORMS, parse_duration, parse_time

FlagValue = bool | int | float | str | dict[str, Any]
"""A flag value as the CLI handles it (an int is sent as a number)."""

_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_INT_RE = re.compile(r"-?\d+")
# Numbers are doubles on the wire: larger integers would silently change.
_MAX_EXACT_INT = 2**53

VALUE_FORMS = (
    "true/false (any case) -> bool; an int or float literal -> number; @PATH (or @- for "
    "stdin) -> the JSON object in that file; text starting with '{' -> a JSON object; "
    "anything else -> a string (--string forces a string)"
)


def parse_flag_value(text: str, *, force_string: bool = False) -> FlagValue:
    """Parse a flag VALUE argument (see ``VALUE_FORMS``).

    Raises:
        ValueError: the text looks like JSON or a number but is not a valid one, or the
            @file cannot be read; the message says what is wrong.
    """
    if force_string:
        return text
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if _NUMBER_RE.fullmatch(text):
        return _parse_number(text)
    if text.startswith("@"):
        return _json_object(_read_value_file(text[1:]), f"file {text[1:]}")
    if text.startswith("{"):
        return _json_object(text, "VALUE")
    return text


def _parse_number(text: str) -> int | float:
    if _INT_RE.fullmatch(text):
        number = int(text)
        if abs(number) > _MAX_EXACT_INT:
            raise ValueError(
                f"number {text} is too large to store exactly (limit ±2^53); "
                "use --string to store it as text"
            )
        return number
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _read_value_file(path: str) -> str:
    if not path:
        raise ValueError("'@' needs a file name: @PATH reads a JSON object from PATH, @- stdin")
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read {path}: not UTF-8 text ({e.reason})") from e


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} "
            "(use --string to store the text as a string)"
        ) from e
    except ValueError as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{where} must hold a JSON object ({{...}}), not {type(value).__name__}")
    return value


def parse_percent(text: str) -> float:
    """Parse a shedding PERCENT (0 to 100; a trailing ``%`` is allowed).

    Raises:
        ValueError: not a number, or outside 0..100.
    """
    raw = text.removesuffix("%")
    if not _NUMBER_RE.fullmatch(raw):
        raise ValueError(f"PERCENT must be a number from 0 to 100, got {text!r}")
    percent = float(raw)
    if not 0 <= percent <= 100:
        raise ValueError(f"PERCENT must be between 0 and 100, got {text}")
    return percent


def parse_since(text: str, now: datetime) -> datetime:
    """A point in time given as a duration back from ``now`` (``2h``) or an ISO 8601 time."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    except OverflowError:
        raise ValueError(f"{text!r} is too long ago") from None
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration back from now ({DURATION_FORMS}) "
            f"nor a time ({TIME_FORMS})"
        ) from None


if TYPE_CHECKING:
    _ParamType = click.ParamType[Any]
else:  # click < 8.4 has no generic ParamType
    _ParamType = click.ParamType


class _TimeType(_ParamType):
    """An ISO 8601 time, or with ``past_durations`` also a duration back from now."""

    name = "time"

    def __init__(self, *, past_durations: bool = False) -> None:
        self.past_durations = past_durations

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            if self.past_durations:
                return parse_since(str(value), datetime.now(UTC))
            return parse_time(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


DURATION = DurationParam(positive=True)
TIME = _TimeType()
SINCE = _TimeType(past_durations=True)
