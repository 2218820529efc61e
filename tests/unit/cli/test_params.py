"""cpctl: parsing what people type (flag values, points in time, percentages)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from controlplane.cli import parse_flag_value, parse_percent, parse_since
from tests.unit.cli.support import NOW


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("false", False),
        ("False", False),
        ("TRUE", True),
        ("42", 42),
        ("-7", -7),
        ("0.5", 0.5),
        ("-.25", -0.25),
        ("1e3", 1000.0),
        ("read-only", "read-only"),
        ("", ""),
        ("yes", "yes"),
        ("nan", "nan"),
        ("inf", "inf"),
        ("1_000", "1_000"),
        ("0x10", "0x10"),
        ("[1, 2]", "[1, 2]"),
        ('{"mode": "lite", "n": 2}', {"mode": "lite", "n": 2}),
    ],
)
def test_parse_flag_value(text: str, expected: Any) -> None:
    value = parse_flag_value(text)
    assert value == expected
    # True == 1 and 1 == 1.0 in Python: the type is part of the answer.
    assert type(value) is type(expected)


@pytest.mark.parametrize("text", ["true", "42", "{not json", "@somefile", ""])
def test_parse_flag_value_string_forced(text: str) -> None:
    assert parse_flag_value(text, force_string=True) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"VALUE is not valid JSON: .* at line 1 column 2"),
        ('{"a": 1} trailing', r"VALUE is not valid JSON: Extra data"),
        ('{"a": NaN}', r"VALUE is not valid JSON: NaN"),
        ("9007199254740993", r"too large to store exactly"),
        ("1e999", r"out of range"),
        ("@", r"'@' needs a file name"),
        ("@/nonexistent/value.json", r"cannot read /nonexistent/value.json: No such file"),
    ],
)
def test_parse_flag_value_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_flag_value(text)


def test_parse_flag_value_from_file(tmp_path: Path) -> None:
    good = tmp_path / "mode.json"
    good.write_text('{"mode": "read-only", "limit": 5}', encoding="utf-8")
    assert parse_flag_value(f"@{good}") == {"mode": "read-only", "limit": 5}

    array = tmp_path / "array.json"
    array.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"array.json must hold a JSON object .*not list"):
        parse_flag_value(f"@{array}")

    broken = tmp_path / "broken.json"
    broken.write_text('{"mode": ', encoding="utf-8")
    with pytest.raises(ValueError, match=r"file .*broken.json is not valid JSON"):
        parse_flag_value(f"@{broken}")


def test_parse_since() -> None:
    assert parse_since("2h", NOW) == NOW - timedelta(hours=2)
    assert parse_since("1h30m", NOW) == NOW - timedelta(minutes=90)
    assert parse_since("2026-11-25T09:00Z", NOW) == datetime(2026, 11, 25, 9, tzinfo=UTC)
    with pytest.raises(ValueError, match=r"neither a duration .* nor a time") as info:
        parse_since("2 hours", NOW)
    assert "ISO 8601" in str(info.value)
    with pytest.raises(ValueError, match="too long ago"):
        parse_since("999999999d", NOW)


@pytest.mark.parametrize(
    ("text", "expected"), [("0", 0.0), ("50", 50.0), ("50%", 50.0), ("12.5", 12.5), ("100", 100.0)]
)
def test_parse_percent(text: str, expected: float) -> None:
    assert parse_percent(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("150", "PERCENT must be between 0 and 100, got 150"),
        ("-1", "PERCENT must be between 0 and 100, got -1"),
        ("100.01", "PERCENT must be between 0 and 100"),
        ("half", "PERCENT must be a number from 0 to 100, got 'half'"),
        ("nan", "PERCENT must be a number"),
    ],
)
def test_parse_percent_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_percent(text)
