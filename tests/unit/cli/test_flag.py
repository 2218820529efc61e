"""cpctl flag: its output, its values over the wire, and whom --wait waits for."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import click
import pytest

from controlplane.api.v1 import mitigation_pb2, types_pb2
from controlplane.cli import WaitArgs
from controlplane.cli._output import to_plain
from controlplane.cli.flag import render_flag_clear, render_flag_set, scope_wait_services
from controlplane.cli.shed import render_shed_clear
from tests.unit.cli.support import NOW, Server, flag_message, run, set_flag_response, ts


def test_human_line_of_a_set_flag() -> None:
    rendered = render_flag_set(to_plain(set_flag_response()), NOW)
    assert list(rendered.lines) == ["checkout: flag new-ui = false (was true) · rev 812"]
    assert list(rendered.warnings) == [
        "warning: 2 service(s) keep their own flag new-ui and do not see this global change: "
        "billing, search"
    ]


def test_human_line_of_a_time_boxed_set_flag() -> None:
    rendered = render_flag_set(to_plain(set_flag_response(expiring=True)), NOW)
    assert list(rendered.lines) == [
        "checkout: flag new-ui = false (was true) · rev 812"
        " · expires 2026-11-26T18:00:00Z (in 30m), then true"
    ]


def test_human_line_of_an_unchanged_set_flag() -> None:
    unchanged = render_flag_set(to_plain(set_flag_response(changed=False)), NOW)
    assert list(unchanged.lines) == ["checkout: flag new-ui = false · unchanged"]


def test_dry_run_says_would_set_only_when_the_write_would_change_something() -> None:
    would = set_flag_response(changed=False, dry_run=True, would_change=True)
    assert list(render_flag_set(to_plain(would), NOW).lines) == [
        "dry run: would set checkout: flag new-ui = false (was true) · nothing written"
    ]
    same = set_flag_response(changed=False, dry_run=True, would_change=False)
    assert list(render_flag_set(to_plain(same), NOW).lines) == [
        "dry run: unchanged (nothing would change) · checkout: flag new-ui = false"
    ]


def test_human_lines_of_clears() -> None:
    nothing = mitigation_pb2.ClearSheddingResponse(result=types_pb2.WriteResult())
    rendered = render_shed_clear(to_plain(nothing), NOW, "checkout")
    assert list(rendered.lines) == ["checkout: shedding off · unchanged"]

    beneath = flag_message(types_pb2.FlagValue(bool_value=True))
    removed = flag_message(
        types_pb2.FlagValue(bool_value=False), expires_at=ts(NOW + timedelta(minutes=30))
    )
    removed.replaced.CopyFrom(beneath)
    layered = mitigation_pb2.ClearFlagResponse(
        result=types_pb2.WriteResult(changed=True, revision=900),
        removed=removed,
        restored=beneath,
    )
    rendered = render_flag_clear(to_plain(layered), NOW, "checkout", "new-ui")
    assert list(rendered.lines) == [
        "checkout: time-boxed value false of flag new-ui removed; new-ui is still set · rev 900",
        "  the value beneath it, true, applies now (no expiry)",
        '  to remove every layer: cpctl flag clear checkout new-ui --all-layers --reason "..."',
    ]


def test_invalid_json_value_exits_3_before_any_call(server: Server) -> None:
    result = run(
        "--server", server.address, "flag", "set", "global", "limits", "{max: 5}", "--reason", "x"
    )
    assert result.exit_code == 3
    assert "error: VALUE is not valid JSON" in result.stderr
    assert server.servicer.calls == []


def test_json_object_value_is_sent_canonical(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "limits.json"
    path.write_text('{"rps": 50, "burst": 10}', encoding="utf-8")
    result = run(
        "--json", "--server", server.address, "flag", "set", "global", "limits", f"@{path}",
        "--reason", "protect the database",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (request,) = server.servicer.set_requests
    assert request.value.json_value == '{"burst":10,"rps":50}'
    document = json.loads(result.stdout)
    assert document["flag"]["value"] == {"burst": 10, "rps": 50}
    assert document["result"]["changed"] is True
    assert document["previous"] is None


def test_value_from_stdin(server: Server) -> None:
    result = run(
        "--server", server.address, "flag", "set", "global", "mode", "@-", "--reason", "r",
        stdin='{"mode": "lite"}',
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert server.servicer.set_requests[0].value.json_value == '{"mode":"lite"}'


def test_wait_services_of_a_flag_scope() -> None:
    assert scope_wait_services("checkout", WaitArgs()) == ()
    assert scope_wait_services("checkout", WaitArgs(enabled=True)) == ("checkout",)
    both = WaitArgs(enabled=True, services=("checkout", "search"))
    assert scope_wait_services("global", both) == ("checkout", "search")
    with pytest.raises(click.UsageError, match="--wait needs a service scope; for a global"):
        scope_wait_services("global", WaitArgs(enabled=True))
    with pytest.raises(click.UsageError, match="--wait-service is for a global flag"):
        scope_wait_services("checkout", both)
