"""cpctl watch: the line of a change, JSON Lines, and the stream ending."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from controlplane.api.v1 import types_pb2
from controlplane.cli._output import JSON_SHAPES, to_plain
from controlplane.cli.audit import render_change
from tests.unit.cli.support import NOW, Server, closed_address, run, ts


def _entry(kind: str, before: Any, after: Any, **fields: Any) -> types_pb2.AuditEntry:
    defaults: dict[str, Any] = {"id": "a1", "revision": 812, "time": ts(NOW), "actor": "sre-1"}
    return types_pb2.AuditEntry(
        kind=kind,
        before_json=json.dumps(before) if before is not None else "",
        after_json=json.dumps(after) if after is not None else "",
        **{**defaults, **fields},
    )


@pytest.mark.parametrize(
    ("entry", "line"),
    [
        (
            _entry(
                "flag", {"value": True}, {"value": False}, action="flag.set", scope="checkout",
                name="new-ui", reason="errors after deploy", incident="INC-42",
                expires_at=ts(NOW + timedelta(minutes=30)),
            ),
            '2026-11-26T17:30:00Z  rev 812  flag.set  checkout/new-ui  true -> false until '
            '2026-11-26T18:00:00Z  by sre-1  "errors after deploy"  INC-42',
        ),
        (
            _entry("shedding", None, {"tier": "SHEDDABLE_PLUS", "percent": 30},
                   action="shedding.set", scope="checkout", bundle_id="b-1"),
            "2026-11-26T17:30:00Z  rev 812  shedding.set  checkout  off -> SHEDDABLE_PLUS 30%  "
            "by sre-1  bundle b-1",
        ),
        (
            _entry("pin", {"version": "v2"}, None, action="pin.clear", scope="checkout",
                   reason="line1\nline2"),
            '2026-11-26T17:30:00Z  rev 812  pin.clear  checkout  v2 -> unpinned  by sre-1  '
            '"line1\\nline2"',
        ),
        (
            _entry("known_good", None, {"version": "v1"}, action="known_good.mark",
                   scope="checkout", name="v1"),
            "2026-11-26T17:30:00Z  rev 812  known_good.mark  checkout/v1  not marked -> "
            "known-good  by sre-1",
        ),
        (
            _entry("flag", {"truncated": True, "bytes": 1200000, "sha256": "ab"}, {"value": 1},
                   action="flag.set", scope="checkout", name="big"),
            "2026-11-26T17:30:00Z  rev 812  flag.set  checkout/big  (1200000 bytes, too large "
            "to show) -> 1  by sre-1",
        ),
    ],
)  # fmt: skip
def test_watch_line_of_a_change(entry: types_pb2.AuditEntry, line: str) -> None:
    assert render_change(to_plain(entry)) == line


def test_watch_json_lines_then_the_stream_ending_is_an_error(server: Server) -> None:
    server.servicer.watched = [
        _entry("flag", None, {"value": False}, action="flag.set", scope="checkout", name="x"),
        _entry("pin", None, {"version": "v1"}, action="pin.set", scope="checkout", revision=813),
    ]
    result = run("--json", "--server", server.address, "watch", "checkout")
    assert result.exit_code == 6, result.output
    lines = result.stdout.splitlines()
    assert [json.loads(line)["action"] for line in lines] == ["flag.set", "pin.set"]
    assert json.loads(lines[0])["after"] == {"value": False}
    assert tuple(json.loads(lines[1])) == JSON_SHAPES["AuditEntry"]
    live, error = result.stderr.splitlines()
    assert json.loads(live) == {"watching": {"service": "checkout", "revision": 812}}
    assert json.loads(error)["error"]["message"].startswith("the watch ended: ")

    human = run("--server", server.address, "watch")
    assert human.exit_code == 6
    note, error_line, hint = human.stderr.splitlines()
    assert note == "watching every service from revision 812 (Ctrl-C to stop)"
    assert error_line.startswith("error: the watch ended: ")
    assert hint.startswith("hint: changes after revision 813 were not shown")
    assert len(human.stdout.splitlines()) == 2


def test_watch_fails_over_before_it_is_live(server: Server) -> None:
    result = run("--server", f"{closed_address()},{server.address}", "watch")
    assert result.exit_code == 6
    assert "watching every service from revision 812" in result.stderr
    assert server.servicer.calls == ["WatchChanges"]


def test_watch_writes_out_what_a_terminal_would_act_on(server: Server) -> None:
    # An agent's report reached the audit trail with an escape sequence and a bidi override.
    evil = "\x1b]0;pwned\x07\x1b[2J\u202eFAKE"
    server.servicer.watched = [
        _entry("override", None, {"flags": {}}, action="override.applied", scope="checkout",
               name="web-1", reason=evil, actor=evil),
    ]  # fmt: skip
    result = run("--server", server.address, "watch", "checkout")
    assert result.exit_code == 6, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "\u202e" not in result.output
    assert "\\u001b]0;pwned\\u0007\\u001b[2J\\u202eFAKE" in result.stdout
