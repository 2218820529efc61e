"""What an agent reports of an override, bounded and checked by the server; text rules."""

from __future__ import annotations

import json
import re

import pytest

from controlplane import model
from controlplane.api.v1 import agent_pb2
from controlplane.api.v1 import types_pb2 as pb
from controlplane.errors import InvalidArgumentError
from controlplane.server._reports import MAX_REPORT_BYTES, ReportLimiter, read_report


def _report(**fields: object) -> agent_pb2.Override:
    return agent_pb2.Override(**fields)  # type: ignore[arg-type]


def test_the_digest_is_the_servers_whatever_the_agent_sends() -> None:
    one = read_report(_report(active=True, content_json='{"flags": {}}', digest="a"))
    two = read_report(_report(active=True, content_json='{"flags": {}}', digest="b"))
    other = read_report(_report(active=True, content_json='{"flags": {"x": true}}', digest="a"))
    cleared = read_report(_report(active=False, content_json='{"flags": {}}', digest="a"))
    assert one.digest == two.digest
    assert len({one.digest, other.digest, cleared.digest}) == 3
    assert one.digest not in ("a", "b")


def test_content_over_the_limit_is_kept_as_its_size_digest_and_start() -> None:
    raw = json.dumps({"flags": {"new-ui": True}, "pad": "x" * MAX_REPORT_BYTES})
    report = read_report(_report(active=True, content_json=raw))
    assert report.content is not None
    assert report.content["too_large"] is True
    assert report.content["bytes"] == len(raw)
    assert report.content["start"] == raw[:512]
    assert len(json.dumps(report.content)) < 1024
    at_limit = '{"p": "' + "y" * (MAX_REPORT_BYTES - 9) + '"}'
    assert len(at_limit) == MAX_REPORT_BYTES
    assert read_report(_report(active=True, content_json=at_limit)).content == json.loads(at_limit)


def test_reported_text_is_cut_and_its_control_and_bidi_characters_written_out() -> None:
    report = read_report(
        _report(active=True, reason="a\x1b[2J\u202eb" + "r" * 5000, actor="\x9bmallory")
    )
    assert report.reason.startswith("a\\u001b[2J\\u202eb")
    assert len(report.reason) <= model.MAX_REASON_CHARS + 20
    assert report.actor == "\\u009bmallory"


def test_not_json_content_is_kept_as_text_made_safe() -> None:
    report = read_report(_report(active=True, content_json="flags:\n  x: \x1b[31m"))
    assert report.content == {"content": "flags:\\u000a  x: \\u001b[31m"}


@pytest.mark.parametrize("raw", ['{"a": 1e400}', '{"a": -1e999}', '{"a": NaN}', "[Infinity]"])
def test_numbers_json_cannot_hold_are_kept_as_text(raw: str) -> None:
    # 1e400 parses as infinity: a record holding it could not be read back (strict JSON).
    report = read_report(_report(active=True, content_json=raw))
    assert report.content == {"content": raw}
    json.loads(json.dumps(report.content, allow_nan=False))


def test_each_instance_has_a_burst_then_earns_reports_back_with_time() -> None:
    now = [0.0]
    limiter = ReportLimiter(burst=3, every=10.0, clock=lambda: now[0])
    assert [limiter.allow("checkout", "web-1") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("checkout", "web-2")  # another instance has its own budget
    now[0] = 9.0
    assert not limiter.allow("checkout", "web-1")
    now[0] = 19.5  # 10 s after the last refusal's 0.9 token: one more
    assert limiter.allow("checkout", "web-1")
    assert not limiter.allow("checkout", "web-1")
    now[0] = 1000.0
    assert [limiter.allow("checkout", "web-1") for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("undo\x1b[2J", "control characters (found U+001B)"),
        ("undo\x9b31m", "control characters (found U+009B)"),
        ("undo\x7f", "control characters (found U+007F)"),
        ("\u202eod ton", "bidirectional control characters (found U+202E)"),
        ("a\u2066b", "bidirectional control characters (found U+2066)"),
        ("\u200b", "shows nothing"),
        ("\u200b\u2060\ufeff", "shows nothing"),
    ],
)
def test_an_operator_reason_must_show_what_it_says(reason: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        model.write_options_from_proto(pb.WriteOptions(reason=reason), now=model.utcnow())


@pytest.mark.parametrize("reason", ["db down", "rollback\tv1.4", "café 👍", "👨\u200d👩 deploy"])
def test_ordinary_reasons_pass(reason: str) -> None:
    opts = model.write_options_from_proto(pb.WriteOptions(reason=reason), now=model.utcnow())
    assert opts.reason == reason


def test_a_record_too_large_to_show_is_its_size_and_digest() -> None:
    small = {"value": True}
    assert model.shown_json(small, 100) == '{"value":true}'
    big = {"value": "x" * 200}
    shown = json.loads(model.shown_json(big, 100))
    assert shown["truncated"] is True
    assert shown["bytes"] == len(json.dumps(big, separators=(",", ":")))
    assert len(shown["sha256"]) == 64
