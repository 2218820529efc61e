"""cpctl: the plain form of responses, their JSON, times and tables."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from controlplane.api.v1 import mitigation_pb2, types_pb2
from controlplane.cli._output import CLI_SHAPES, JSON_SHAPES, dumps, format_time, to_plain
from controlplane.cli.flag import render_flag_list
from tests.unit.cli.support import NOW, set_flag_response, ts


def test_json_shape_of_set_flag_response() -> None:
    document = json.loads(dumps(to_plain(set_flag_response(expiring=True))))
    previous = {
        "scope": "checkout",
        "name": "new-ui",
        "value": True,
        "meta": {
            "actor": "deploy-bot",
            "actor_authenticated": True,
            "reason": "launch",
            "incident": "",
            "set_at": "2026-11-12T17:30:00Z",
            "expires_at": None,
            "mod_revision": 700,
            "bundle_id": "",
        },
        "replaced": None,
    }
    assert document == {
        "result": {
            "changed": True,
            "dry_run": False,
            "revision": 812,
            "mod_revision": 812,
            "overridden_by": ["billing", "search"],
            "audit_id": "audit-1",
            "summary": "flag new-ui = false (was true)",
            "would_change": False,
            "unknown_services": [],
            "in_force_since": {},
        },
        "flag": {
            "scope": "checkout",
            "name": "new-ui",
            "value": False,
            "meta": {
                "actor": "sre-1",
                "actor_authenticated": False,
                "reason": "errors after deploy",
                "incident": "INC-42",
                "set_at": "2026-11-26T17:30:00Z",
                "expires_at": "2026-11-26T18:00:00Z",
                "mod_revision": 812,
                "bundle_id": "",
            },
            "replaced": previous,
        },
        "previous": previous,
    }
    assert list(document) == ["result", "flag", "previous"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (types_pb2.FlagValue(number_value=50), 50),
        (types_pb2.FlagValue(number_value=0.25), 0.25),
        (types_pb2.FlagValue(string_value="read-only"), "read-only"),
        (
            types_pb2.FlagValue(json_value='{"mode":"lite","n":[1,2]}'),
            {"mode": "lite", "n": [1, 2]},
        ),
        (types_pb2.FlagValue(), None),
    ],
)
def test_json_flag_value_is_a_plain_value(value: types_pb2.FlagValue, expected: Any) -> None:
    document = json.loads(dumps(to_plain(types_pb2.Flag(name="x", value=value))))
    assert document["value"] == expected
    assert type(document["value"]) is type(expected)


def test_json_audit_entry_carries_records_as_objects() -> None:
    entry = types_pb2.AuditEntry(
        id="a1", revision=9, before_json="", after_json='{"value": false}', time=ts(NOW)
    )
    document = json.loads(dumps(to_plain(entry)))
    assert document["before"] is None
    assert document["after"] == {"value": False}
    assert document["time"] == "2026-11-26T17:30:00Z"
    assert "after_json" not in document


@pytest.mark.parametrize("name", [n for n in JSON_SHAPES if n not in CLI_SHAPES])
def test_documented_json_shapes_match_the_output(name: str) -> None:
    message_class = getattr(types_pb2, name, None) or getattr(mitigation_pb2, name)
    assert tuple(to_plain(message_class())) == JSON_SHAPES[name]


@pytest.mark.parametrize("would_change", [True, False])
def test_json_of_a_dry_run_carries_would_change(would_change: bool) -> None:
    response = set_flag_response(changed=False, dry_run=True, would_change=would_change)
    result = json.loads(dumps(to_plain(response)))["result"]
    assert (result["dry_run"], result["changed"]) == (True, False)
    assert result["would_change"] is would_change


def test_times_keep_fractions_in_json_and_drop_them_for_people() -> None:
    moment = NOW + timedelta(microseconds=250_000)
    document = json.loads(dumps(to_plain(types_pb2.Meta(set_at=ts(moment)))))
    assert document["set_at"] == "2026-11-26T17:30:00.250000Z"
    assert format_time(moment, NOW - timedelta(hours=2)) == "2026-11-26T17:30:00Z (in 2h)"
    assert format_time(moment, NOW + timedelta(days=1, hours=3)) == (
        "2026-11-26T17:30:00Z (1d3h ago)"
    )


def test_list_is_an_aligned_table() -> None:
    response = mitigation_pb2.ListFlagsResponse(
        flags=[
            types_pb2.Flag(
                scope="global",
                name="new-ui",
                value=types_pb2.FlagValue(bool_value=True),
                meta=types_pb2.Meta(actor="deploy-bot", reason="launch", mod_revision=7),
            ),
            types_pb2.Flag(
                scope="payments-api",
                name="checkout.mode",
                value=types_pb2.FlagValue(string_value="read-only"),
                meta=types_pb2.Meta(
                    actor="sre-1",
                    reason="db failover\nsecond line",
                    mod_revision=1234,
                    expires_at=ts(NOW + timedelta(hours=2)),
                ),
            ),
        ]
    )
    lines = list(render_flag_list(to_plain(response), NOW).lines)
    assert len(lines) == 3
    header = lines[0]
    for column in ("NAME", "VALUE", "EXPIRES", "REV", "ACTOR", "REASON"):
        start = header.index(column)
        assert all(line[start - 2 : start] == "  " for line in lines), column
        assert all(line[start] != " " for line in lines), column
    assert '"read-only"' in lines[2]
    assert "2026-11-26T19:30:00Z (in 2h)" in lines[2]
    assert lines[2].endswith("db failover\\nsecond line")
