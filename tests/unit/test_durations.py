"""The duration and time parser shared by ``cpctl`` and the server's options."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import click
import pytest

from controlplane import model, server
from controlplane._duration_param import DurationParam
from controlplane._durations import parse_duration, parse_time


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("90m", timedelta(minutes=90)),
        ("2h", timedelta(hours=2)),
        ("7d", timedelta(days=7)),
        ("30d", timedelta(days=30)),
        ("500ms", timedelta(milliseconds=500)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d2h3m4s5ms", timedelta(days=1, hours=2, minutes=3, seconds=4, milliseconds=5)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "5",
        "30",
        "1x",
        "m",
        "ms",
        "1.5h",
        "h",
        "30 m",
        " 30m",
        "1m1h",
        "1h1h",
        "1s1m",
        "-5m",
        "-5s",
        "5M",
        "30min",
        "1w",
        "PT30M",
    ],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration") as info:
        parse_duration(text)
    message = str(info.value)
    assert repr(text) in message
    assert "ms, s, m, h or d" in message
    assert "1h30m" in message


def test_parse_duration_too_large() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_duration("9999999999d")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-26T18:00Z", datetime(2026, 11, 26, 18, 0, tzinfo=UTC)),
        ("2026-11-26T18:00:00+02:00", datetime(2026, 11, 26, 16, 0, tzinfo=UTC)),
        ("2026-11-26T18:00", datetime(2026, 11, 26, 18, 0, tzinfo=UTC)),
        ("2026-11-26", datetime(2026, 11, 26, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    moment = parse_time(text)
    assert moment == expected
    assert moment.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["tomorrow", "2026-13-01", "18:00", "", "26/11/2026"])
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a time") as info:
        parse_time(text)
    assert repr(text) in str(info.value)
    assert "ISO 8601" in str(info.value)


@pytest.mark.parametrize("option", ["etcd_timeout", "audit_retention"])
def test_the_server_options_use_the_one_duration_type(option: str) -> None:
    param = next(p for p in server.serve.params if p.name == option)
    assert isinstance(param.type, DurationParam)
    with click.Context(server.serve) as ctx:
        # Spaces around the value, as an environment variable or a file may carry.
        assert param.type_cast_value(ctx, " 2s ") == timedelta(seconds=2)


@pytest.mark.parametrize("option", ["etcd_timeout", "audit_retention"])
def test_server_duration_options_take_milliseconds(option: str) -> None:
    param = next(p for p in server.serve.params if p.name == option)
    with click.Context(server.serve) as ctx:
        assert param.type_cast_value(ctx, "500ms") == timedelta(milliseconds=500)
        with pytest.raises(click.BadParameter, match="not a duration"):
            param.type_cast_value(ctx, "half a second")


def test_importing_the_parser_pulls_in_nothing_but_the_standard_library() -> None:
    code = (
        "import sys; import controlplane._durations; "
        "print(sorted(m for m in ('click', 'grpc', 'google.protobuf') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_time_stored_without_a_zone_is_refused_where_a_typed_one_is_utc() -> None:
    with pytest.raises(ValueError, match="has no time zone"):
        parse_time("2026-11-26T18:00", zone_required=True)
    with pytest.raises(ValueError, match="has no time zone"):
        model.parse_time("2026-11-26T18:00")
    stored = "2026-11-26T18:00:00.000000Z"
    assert model.parse_time(stored) == parse_time(stored) == datetime(2026, 11, 26, 18, tzinfo=UTC)


def test_one_duration_type_for_cpctl_and_the_server() -> None:
    typed, setting = DurationParam(positive=True), DurationParam(strip=True)
    assert typed.convert("500ms", None, None) == timedelta(milliseconds=500)
    assert setting.convert(" 2s ", None, None) == timedelta(seconds=2)
    assert setting.convert("0s", None, None) == timedelta(0)
    with pytest.raises(click.BadParameter, match="must be longer than zero"):
        typed.convert("0s", None, None)
    with pytest.raises(click.BadParameter, match="is not a duration"):
        typed.convert(" 2s", None, None)
