"""cpctl: input parsing, exit codes, output shapes, and calls against a real in-process server.

The servers here are real ``grpc.server`` instances on port 0 serving a hand-written
MitigationService (our own API), so what the CLI sends and how it reacts to each status code
go over the wire; nothing is patched.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import grpc
import pytest
from click.testing import CliRunner, Result
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.api.v1 import mitigation_pb2, mitigation_pb2_grpc, types_pb2
from controlplane.cli import (
    OUTCOME_UNKNOWN,
    ExitCode,
    WaitArgs,
    cli,
    exit_code_for_status,
    parse_flag_value,
    parse_percent,
    parse_since,
    wait_exit_code,
)
from controlplane.cli._output import CLI_SHAPES, JSON_SHAPES, dumps, format_time, to_plain
from controlplane.cli._write import describe_wait, render_wait, wait_outcome, worst_outcome
from controlplane.cli.audit import render_change
from controlplane.cli.bundle import (
    change_services,
    key_services,
    render_bundle_apply,
    render_bundle_get,
    render_bundle_list,
    render_bundle_revert,
)
from controlplane.cli.flag import (
    render_flag_clear,
    render_flag_list,
    render_flag_set,
    scope_wait_services,
)
from controlplane.cli.shed import render_shed_clear, render_shed_set
from controlplane.cli.status import NO_INSTANCES, render_status
from tests.helpers.certs import TestCA

NOW = datetime(2026, 11, 26, 17, 30, tzinfo=UTC)
# The CLI must not pick up the settings of whoever runs the tests.
CLEAN_ENV: Mapping[str, str | None] = {
    "CPCTL_SERVER": None,
    "CPCTL_ACTOR": None,
    "CPCTL_JSON": None,
    "CPCTL_TIMEOUT": None,
    "CPCTL_TLS": None,
    "CPCTL_TLS_CA": None,
    "CPCTL_TLS_CERT": None,
    "CPCTL_TLS_KEY": None,
    "CPCTL_TLS_SERVER_NAME": None,
    "CPCTL_INSECURE": None,
    "CPCTL_TOKEN": None,
    "CPCTL_TOKEN_FILE": None,
}


def _ts(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def run(*args: str, stdin: str | None = None, env: Mapping[str, str] | None = None) -> Result:
    environment = {**CLEAN_ENV, **(env or {})}
    return CliRunner().invoke(cli, list(args), input=stdin, env=environment, prog_name="cpctl")


# ---- flag values ----


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


# ---- points in time, percentages ----


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


# ---- exit codes ----

EXIT_BY_STATUS = {
    grpc.StatusCode.OK: 1,
    grpc.StatusCode.CANCELLED: 1,
    grpc.StatusCode.UNKNOWN: 1,
    grpc.StatusCode.INVALID_ARGUMENT: 3,
    grpc.StatusCode.DEADLINE_EXCEEDED: 6,
    grpc.StatusCode.NOT_FOUND: 5,
    grpc.StatusCode.ALREADY_EXISTS: 4,
    grpc.StatusCode.PERMISSION_DENIED: 7,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 1,
    grpc.StatusCode.FAILED_PRECONDITION: 11,
    grpc.StatusCode.ABORTED: 4,
    grpc.StatusCode.OUT_OF_RANGE: 3,
    grpc.StatusCode.UNIMPLEMENTED: 12,
    grpc.StatusCode.INTERNAL: 1,
    grpc.StatusCode.UNAVAILABLE: 6,
    grpc.StatusCode.DATA_LOSS: 1,
    grpc.StatusCode.UNAUTHENTICATED: 7,
}


def test_every_status_code_has_an_expected_exit_code() -> None:
    assert set(EXIT_BY_STATUS) == set(grpc.StatusCode)


@pytest.mark.parametrize("status", list(grpc.StatusCode), ids=lambda s: s.name)
def test_exit_code_for_status(status: grpc.StatusCode) -> None:
    assert exit_code_for_status(status) == EXIT_BY_STATUS[status]


def test_exit_codes_are_the_documented_numbers_and_listed_in_help() -> None:
    assert {code.name: int(code) for code in ExitCode} == {
        "OK": 0,
        "ERROR": 1,
        "USAGE": 2,
        "INVALID": 3,
        "CONFLICT": 4,
        "NOT_FOUND": 5,
        "UNAVAILABLE": 6,
        "PERMISSION_DENIED": 7,
        "WAIT_TIMEOUT": 8,
        "WAIT_NO_INSTANCES": 9,
        "REJECTED": 10,
        "FAILED_PRECONDITION": 11,
        "UNIMPLEMENTED": 12,
        "INTERRUPTED": 130,
    }
    result = run("--help")
    assert result.exit_code == 0
    for code in ExitCode:
        assert re.search(rf"^\s+{int(code)}  \S", result.stdout, re.MULTILINE), code


# ---- JSON and human output of responses ----


def _flag(value: types_pb2.FlagValue, **meta: Any) -> types_pb2.Flag:
    return types_pb2.Flag(scope="checkout", name="new-ui", value=value, meta=types_pb2.Meta(**meta))


def _set_flag_response(
    *,
    changed: bool = True,
    dry_run: bool = False,
    would_change: bool = False,
    expiring: bool = False,
) -> mitigation_pb2.SetFlagResponse:
    previous = _flag(
        types_pb2.FlagValue(bool_value=True),
        actor="deploy-bot",
        actor_authenticated=True,
        reason="launch",
        set_at=_ts(NOW - timedelta(days=14)),
        mod_revision=700,
    )
    flag = _flag(
        types_pb2.FlagValue(bool_value=False),
        actor="sre-1",
        reason="errors after deploy",
        incident="INC-42",
        set_at=_ts(NOW),
        mod_revision=812,
    )
    if expiring:
        flag.meta.expires_at.CopyFrom(_ts(NOW + timedelta(minutes=30)))
        flag.replaced.CopyFrom(previous)
    return mitigation_pb2.SetFlagResponse(
        result=types_pb2.WriteResult(
            changed=changed,
            dry_run=dry_run,
            revision=812 if changed else 0,
            mod_revision=812,
            overridden_by=["billing", "search"],
            audit_id="audit-1",
            summary="flag new-ui = false (was true)",
            would_change=would_change,
        ),
        flag=flag,
        previous=previous,
    )


def test_json_shape_of_set_flag_response() -> None:
    document = json.loads(dumps(to_plain(_set_flag_response(expiring=True))))
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
        id="a1", revision=9, before_json="", after_json='{"value": false}', time=_ts(NOW)
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


def test_human_line_of_a_set_flag() -> None:
    rendered = render_flag_set(to_plain(_set_flag_response()), NOW)
    assert list(rendered.lines) == ["checkout: flag new-ui = false (was true) · rev 812"]
    assert list(rendered.warnings) == [
        "warning: 2 service(s) keep their own flag new-ui and do not see this global change: "
        "billing, search"
    ]


def test_human_line_of_a_time_boxed_set_flag() -> None:
    rendered = render_flag_set(to_plain(_set_flag_response(expiring=True)), NOW)
    assert list(rendered.lines) == [
        "checkout: flag new-ui = false (was true) · rev 812"
        " · expires 2026-11-26T18:00:00Z (in 30m), then true"
    ]


def test_human_line_of_an_unchanged_set_flag() -> None:
    unchanged = render_flag_set(to_plain(_set_flag_response(changed=False)), NOW)
    assert list(unchanged.lines) == ["checkout: flag new-ui = false · unchanged"]


def test_dry_run_says_would_set_only_when_the_write_would_change_something() -> None:
    would = _set_flag_response(changed=False, dry_run=True, would_change=True)
    assert list(render_flag_set(to_plain(would), NOW).lines) == [
        "dry run: would set checkout: flag new-ui = false (was true) · nothing written"
    ]
    same = _set_flag_response(changed=False, dry_run=True, would_change=False)
    assert list(render_flag_set(to_plain(same), NOW).lines) == [
        "dry run: unchanged (nothing would change) · checkout: flag new-ui = false"
    ]


@pytest.mark.parametrize("would_change", [True, False])
def test_json_of_a_dry_run_carries_would_change(would_change: bool) -> None:
    response = _set_flag_response(changed=False, dry_run=True, would_change=would_change)
    result = json.loads(dumps(to_plain(response)))["result"]
    assert (result["dry_run"], result["changed"]) == (True, False)
    assert result["would_change"] is would_change


def test_dry_run_of_a_clear_that_would_change_nothing() -> None:
    response = mitigation_pb2.ClearSheddingResponse(
        result=types_pb2.WriteResult(dry_run=True, would_change=False)
    )
    rendered = render_shed_clear(to_plain(response), NOW, "checkout")
    assert list(rendered.lines) == [
        "dry run: unchanged (nothing would change) · checkout: shedding off"
    ]


def test_human_line_of_a_shedding_change() -> None:
    response = mitigation_pb2.SetSheddingResponse(
        result=types_pb2.WriteResult(changed=True, revision=813),
        shedding=types_pb2.Shedding(service="checkout", tier=types_pb2.SHEDDABLE_PLUS, percent=50),
    )
    rendered = render_shed_set(to_plain(response), NOW)
    assert list(rendered.lines) == ["checkout: shedding SHEDDABLE_PLUS 50% (was off) · rev 813"]


def test_human_lines_of_clears() -> None:
    nothing = mitigation_pb2.ClearSheddingResponse(result=types_pb2.WriteResult())
    rendered = render_shed_clear(to_plain(nothing), NOW, "checkout")
    assert list(rendered.lines) == ["checkout: shedding off · unchanged"]

    layered = mitigation_pb2.ClearFlagResponse(
        result=types_pb2.WriteResult(changed=True, revision=900),
        removed=_flag(types_pb2.FlagValue(bool_value=False)),
        restored=_flag(types_pb2.FlagValue(bool_value=True)),
    )
    rendered = render_flag_clear(to_plain(layered), NOW, "checkout", "new-ui")
    assert list(rendered.lines) == [
        "checkout: flag new-ui cleared (was false); true applies again · rev 900"
    ]


def test_times_keep_fractions_in_json_and_drop_them_for_people() -> None:
    moment = NOW + timedelta(microseconds=250_000)
    document = json.loads(dumps(to_plain(types_pb2.Meta(set_at=_ts(moment)))))
    assert document["set_at"] == "2026-11-26T17:30:00.250000Z"
    assert format_time(moment, NOW - timedelta(hours=2)) == "2026-11-26T17:30:00Z (in 2h)"
    assert format_time(moment, NOW + timedelta(days=1, hours=3)) == (
        "2026-11-26T17:30:00Z (1d2h ago)"
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
                    expires_at=_ts(NOW + timedelta(hours=2)),
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


# ---- commands against a real in-process server ----


class FakeMitigation(mitigation_pb2_grpc.MitigationServiceServicer):
    """MitigationService with GetFlag and SetFlag over a dict, WaitApplied answering
    ``waits[service]`` (every instance applied, by default), WatchChanges sending
    ``watched`` after its live response, then ending, and GetBundle over ``bundles``;
    everything else UNIMPLEMENTED.

    ``fail[method]`` makes that method answer with a status instead; a method in ``hang``
    signals ``entered`` and then blocks until ``release`` is set (or 10 seconds pass).
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.set_requests: list[mitigation_pb2.SetFlagRequest] = []
        self.flags: dict[tuple[str, str], types_pb2.Flag] = {}
        self.revision = 812
        self.fail: dict[str, tuple[grpc.StatusCode, str]] = {}
        self.hang: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.waits: dict[str, mitigation_pb2.WaitAppliedResponse] = {}
        self.wait_requests: list[mitigation_pb2.WaitAppliedRequest] = []
        self.watched: list[types_pb2.AuditEntry] = []
        self.bundles: dict[str, mitigation_pb2.Bundle] = {}
        self.metadata: list[tuple[str, dict[str, str]]] = []
        """Each call's method and metadata, in order."""

    def GetBundle(
        self, request: mitigation_pb2.GetBundleRequest, context: grpc.ServicerContext
    ) -> mitigation_pb2.GetBundleResponse:
        self._misbehave("GetBundle", context)
        if request.bundle_id not in self.bundles:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no bundle {request.bundle_id}")
        return mitigation_pb2.GetBundleResponse(bundle=self.bundles[request.bundle_id])

    def WaitApplied(
        self, request: mitigation_pb2.WaitAppliedRequest, context: grpc.ServicerContext
    ) -> mitigation_pb2.WaitAppliedResponse:
        self._misbehave("WaitApplied", context)
        self.wait_requests.append(request)
        default = mitigation_pb2.WaitAppliedResponse(all_applied=True, connected=3, applied=3)
        return self.waits.get(request.service, default)

    def WatchChanges(
        self, request: mitigation_pb2.WatchChangesRequest, context: grpc.ServicerContext
    ) -> Iterator[mitigation_pb2.WatchChangesResponse]:
        self._misbehave("WatchChanges", context)
        yield mitigation_pb2.WatchChangesResponse(revision=self.revision)
        for entry in self.watched:
            yield mitigation_pb2.WatchChangesResponse(revision=entry.revision, changes=[entry])

    def _misbehave(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls.append(method)
        sent = {str(key): str(value) for key, value in context.invocation_metadata()}
        self.metadata.append((method, sent))
        if method in self.hang:
            self.entered.set()
            self.release.wait(10)
        if method in self.fail:
            context.abort(*self.fail[method])

    def GetFlag(
        self, request: mitigation_pb2.GetFlagRequest, context: grpc.ServicerContext
    ) -> mitigation_pb2.GetFlagResponse:
        self._misbehave("GetFlag", context)
        flag = self.flags.get((request.scope, request.name))
        if flag is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"flag {request.scope}/{request.name}: none")
        return mitigation_pb2.GetFlagResponse(flag=flag)

    def SetFlag(
        self, request: mitigation_pb2.SetFlagRequest, context: grpc.ServicerContext
    ) -> mitigation_pb2.SetFlagResponse:
        self._misbehave("SetFlag", context)
        self.set_requests.append(request)
        key = (request.scope, request.name)
        previous = self.flags.get(key)
        current = previous.meta.mod_revision if previous is not None else 0
        options = request.options
        if options.HasField("expected_mod_revision") and options.expected_mod_revision != current:
            context.abort(
                grpc.StatusCode.ABORTED,
                f"expected mod revision {options.expected_mod_revision}, current {current}",
            )
        changed = previous is None or previous.value != request.value
        flag = types_pb2.Flag(
            scope=request.scope,
            name=request.name,
            value=request.value,
            meta=types_pb2.Meta(actor=options.actor, reason=options.reason, mod_revision=current),
        )
        result = types_pb2.WriteResult(
            dry_run=options.dry_run, would_change=options.dry_run and changed, mod_revision=current
        )
        if changed and not options.dry_run:
            self.revision += 1
            flag.meta.mod_revision = result.revision = result.mod_revision = self.revision
            result.changed = True
            self.flags[key] = flag
        return mitigation_pb2.SetFlagResponse(result=result, flag=flag, previous=previous)


@dataclass
class Server:
    address: str
    servicer: FakeMitigation
    grpc_server: grpc.Server


@pytest.fixture
def start_server() -> Iterator[Callable[[], Server]]:
    """Start real gRPC servers on 127.0.0.1:0; all are stopped after the test."""
    servers: list[grpc.Server] = []
    servicers: list[FakeMitigation] = []

    def start() -> Server:
        servicer = FakeMitigation()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        add_servicer: Any = mitigation_pb2_grpc.add_MitigationServiceServicer_to_server
        add_servicer(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        servicers.append(servicer)
        return Server(f"127.0.0.1:{port}", servicer, server)

    yield start
    for servicer in servicers:
        servicer.release.set()
    for server in servers:
        server.stop(grace=None)


@pytest.fixture
def server(start_server: Callable[[], Server]) -> Server:
    started = start_server()
    started.servicer.flags[("checkout", "new-ui")] = types_pb2.Flag(
        scope="checkout",
        name="new-ui",
        value=types_pb2.FlagValue(bool_value=False),
        meta=types_pb2.Meta(actor="sre-1", reason="errors after deploy", mod_revision=812),
    )
    return started


def closed_address() -> str:
    """A loopback address nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_fails_over_to_the_next_server(server: Server) -> None:
    result = run(
        "--server", f"{closed_address()},{server.address}", "flag", "get", "checkout", "new-ui"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "checkout: flag new-ui = false"
    assert server.servicer.calls == ["GetFlag"]


def test_fails_over_with_json_output(server: Server) -> None:
    servers = f"{closed_address()},{server.address}"
    result = run("--json", "--server", servers, "flag", "get", "checkout", "new-ui")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["flag"]["value"] is False
    assert document["flag"]["meta"]["mod_revision"] == 812
    assert document["overridden_by"] == []
    assert result.stderr == ""


def test_no_server_reachable_exits_6_naming_each_server() -> None:
    first, second = closed_address(), closed_address()
    result = run("--server", f"{first},{second}", "flag", "get", "checkout", "new-ui")
    assert result.exit_code == 6
    assert "error: no server reachable" in result.stderr
    assert first in result.stderr
    assert second in result.stderr
    assert result.stdout == ""


def test_only_unavailable_fails_over(start_server: Callable[[], Server], server: Server) -> None:
    empty = start_server()
    result = run("--server", f"{empty.address},{server.address}", "flag", "get", "checkout", "x")
    assert result.exit_code == 5
    assert "error: flag checkout/x: none" in result.stderr
    assert empty.servicer.calls == ["GetFlag"]
    assert server.servicer.calls == []


ETCD_DOWN = (
    grpc.StatusCode.UNAVAILABLE,
    "etcd is unreachable at http://127.0.0.1:2379: no answer within 2s",
)
SET_ARGS = ("flag", "set", "checkout", "new-ui", "true", "--reason", "recovered")


def test_write_answered_unavailable_by_a_server_is_not_retried_elsewhere(
    start_server: Callable[[], Server], server: Server
) -> None:
    # Its etcd transaction may have committed: a retry elsewhere would report "unchanged".
    that, other = start_server(), server
    that.servicer.fail["SetFlag"] = ETCD_DOWN
    result = run("--server", f"{that.address},{other.address}", *SET_ARGS)
    assert result.exit_code == 6, result.output
    assert that.servicer.calls == ["SetFlag"]
    assert other.servicer.calls == []
    error, hint = result.stderr.splitlines()
    assert error == f"error: {that.address}: {ETCD_DOWN[1]}"
    assert hint.startswith("hint: the server answered but could not use its etcd")
    assert hint.endswith(OUTCOME_UNKNOWN)
    assert "may or may not have been applied" in hint
    assert "`get` or `history` before retrying" in hint
    assert result.stdout == ""


def test_write_refused_by_etcd_is_final_too(
    start_server: Callable[[], Server], server: Server
) -> None:
    that = start_server()
    that.servicer.fail["SetFlag"] = (grpc.StatusCode.UNAVAILABLE, "etcd refused the write: full")
    result = run("--json", "--server", f"{that.address},{server.address}", *SET_ARGS)
    assert result.exit_code == 6
    assert server.servicer.calls == []
    assert json.loads(result.stderr)["error"]["code"] == "UNAVAILABLE"


def test_read_answered_unavailable_by_a_server_is_final(
    start_server: Callable[[], Server], server: Server
) -> None:
    that = start_server()
    that.servicer.fail["GetFlag"] = ETCD_DOWN
    result = run("--server", f"{that.address},{server.address}", "flag", "get", "checkout", "x")
    assert result.exit_code == 6
    assert server.servicer.calls == []
    assert "could not use its etcd" in result.stderr
    assert OUTCOME_UNKNOWN not in result.stderr


def test_dry_run_answered_unavailable_has_no_unknown_outcome(
    start_server: Callable[[], Server], server: Server
) -> None:
    that = start_server()
    that.servicer.fail["SetFlag"] = ETCD_DOWN
    result = run("--server", f"{that.address},{server.address}", *SET_ARGS, "--dry-run")
    assert result.exit_code == 6
    assert server.servicer.calls == []
    assert OUTCOME_UNKNOWN not in result.stderr


def test_write_fails_over_when_the_first_server_cannot_be_reached(server: Server) -> None:
    result = run("--server", f"{closed_address()},{server.address}", *SET_ARGS)
    assert result.exit_code == 0, result.output
    assert result.stdout == "checkout: flag new-ui = true (was false) · rev 813\n"
    assert server.servicer.calls == ["SetFlag"]


def _stop_once_entered(target: Server) -> threading.Thread:
    def stop() -> None:
        if target.servicer.entered.wait(10):
            target.grpc_server.stop(grace=None)

    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    return thread


def test_write_whose_connection_drops_mid_call_is_not_retried_elsewhere(
    start_server: Callable[[], Server], server: Server
) -> None:
    that = start_server()
    that.servicer.hang.add("SetFlag")
    stopper = _stop_once_entered(that)
    result = run("--server", f"{that.address},{server.address}", *SET_ARGS)
    stopper.join(10)
    assert result.exit_code == 6, result.output
    assert that.servicer.calls == ["SetFlag"]
    assert server.servicer.calls == []
    assert result.stderr.startswith(f"error: {that.address}: ")
    assert "connection to the server was lost during the call" in result.stderr
    assert OUTCOME_UNKNOWN in result.stderr


def test_read_whose_connection_drops_mid_call_fails_over(
    start_server: Callable[[], Server], server: Server
) -> None:
    that = start_server()
    that.servicer.hang.add("GetFlag")
    stopper = _stop_once_entered(that)
    result = run(
        "--server", f"{that.address},{server.address}", "flag", "get", "checkout", "new-ui"
    )
    stopper.join(10)
    assert result.exit_code == 0, result.output
    assert that.servicer.calls == ["GetFlag"]
    assert server.servicer.calls == ["GetFlag"]


@pytest.mark.parametrize("dry_run", [False, True])
def test_deadline_exceeded_is_never_retried_elsewhere(
    start_server: Callable[[], Server], server: Server, dry_run: bool
) -> None:
    that = start_server()
    that.servicer.hang.add("SetFlag")
    extra = ["--dry-run"] if dry_run else []
    servers = f"{that.address},{server.address}"
    result = run("--timeout", "300ms", "--server", servers, *SET_ARGS, *extra)
    assert result.exit_code == 6, result.output
    assert that.servicer.calls == ["SetFlag"]
    assert server.servicer.calls == []
    assert result.stderr.startswith(f"error: {that.address}: Deadline Exceeded")
    assert (OUTCOME_UNKNOWN in result.stderr) is not dry_run
    assert "did not answer in time" in result.stderr or "no answer within" in result.stderr


def test_error_as_json_on_stderr(server: Server) -> None:
    result = run("--json", "--server", server.address, "flag", "get", "checkout", "missing")
    assert result.exit_code == 5
    assert result.stdout == ""
    assert json.loads(result.stderr) == {
        "error": {"code": "NOT_FOUND", "message": "flag checkout/missing: none", "exit_code": 5}
    }


def test_unimplemented_rpc_exits_12(server: Server) -> None:
    result = run(
        "--json", "--server", server.address, "rollback", "checkout", "--reason", "bad release"
    )
    assert result.exit_code == 12
    assert json.loads(result.stderr)["error"]["code"] == "UNIMPLEMENTED"
    assert result.stdout == ""


def test_missing_reason_is_a_usage_error_before_any_call(server: Server) -> None:
    result = run("--server", server.address, "flag", "set", "checkout", "new-ui", "true")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --reason is required: say why")
    assert "cpctl flag set [OPTIONS] SCOPE NAME VALUE" in result.stderr
    assert result.stdout == ""
    assert server.servicer.calls == []


@pytest.mark.parametrize("reason", ["", "   "])
def test_blank_reason_is_missing(server: Server, reason: str) -> None:
    result = run(
        "--json", "--server", server.address, "pin", "set", "checkout", "v1", "--reason", reason
    )
    assert result.exit_code == 2
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "USAGE"
    assert error["exit_code"] == 2
    assert error["message"].startswith("--reason is required: say why")
    assert server.servicer.calls == []


def test_shed_percent_out_of_range_exits_3_before_any_call(server: Server) -> None:
    result = run(
        "--server", server.address, "shed", "set", "checkout", "150", "--reason", "overload"
    )
    assert result.exit_code == 3
    assert "error: PERCENT must be between 0 and 100, got 150" in result.stderr
    assert server.servicer.calls == []


def test_invalid_json_value_exits_3_before_any_call(server: Server) -> None:
    result = run(
        "--server", server.address, "flag", "set", "global", "limits", "{max: 5}", "--reason", "x"
    )
    assert result.exit_code == 3
    assert "error: VALUE is not valid JSON" in result.stderr
    assert server.servicer.calls == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--ttl", "90"], ["Invalid value for '--ttl'", "'90' is not a duration", "1h30m"]),
        (["--ttl", "0m"], ["Invalid value for '--ttl'", "must be longer than zero"]),
        (["--until", "tonight"], ["Invalid value for '--until'", "ISO 8601"]),
        (["--ttl", "30m", "--until", "2099-01-01T00:00Z"], ["--ttl and --until", "give one"]),
        (["--expect-revision", "-1"], ["Invalid value for '--expect-revision'"]),
    ],
)
def test_bad_write_options_are_usage_errors(
    server: Server, args: list[str], expected: list[str]
) -> None:
    result = run(
        "--server", server.address, "flag", "set", "checkout", "new-ui", "false",
        "--reason", "errors", *args,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    for text in expected:
        assert text in result.stderr
    assert server.servicer.calls == []


def test_until_in_the_past_is_invalid_input(server: Server) -> None:
    result = run(
        "--server", server.address, "flag", "set", "checkout", "new-ui", "false",
        "--reason", "errors", "--until", "2020-01-01T00:00Z",
    )  # fmt: skip
    assert result.exit_code == 3
    assert "error: --until 2020-01-01T00:00:00Z is in the past" in result.stderr
    assert server.servicer.calls == []


@pytest.mark.parametrize("value", ["5", "1.5s", "abc", "0s"])
def test_bad_timeout_names_the_global_option(value: str) -> None:
    result = run("--json", "--timeout", value, "flag", "list")
    assert result.exit_code == 2
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "USAGE"
    assert "--timeout" in error["message"]


def test_write_options_reach_the_server(server: Server) -> None:
    result = run(
        "--server", server.address, "--actor", "sre-1", "flag", "set", "checkout", "new-ui",
        "true", "--reason", "recovered", "--incident", "INC-42", "--ttl", "1h30m",
        "--expect-revision", "812",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == ("checkout: flag new-ui = true (was false) · rev 813\n")
    (request,) = server.servicer.set_requests
    assert request.value.WhichOneof("kind") == "bool_value"
    assert request.value.bool_value is True
    options = request.options
    assert (options.reason, options.incident, options.actor) == ("recovered", "INC-42", "sre-1")
    assert options.ttl.ToTimedelta() == timedelta(minutes=90)
    assert not options.HasField("expires_at")
    assert options.HasField("expected_mod_revision")
    assert options.expected_mod_revision == 812
    assert options.dry_run is False


def test_expect_revision_zero_is_sent_and_absence_is_not(server: Server) -> None:
    base = ["--server", server.address, "flag", "set", "global", "limits", "5", "--reason", "r"]
    assert run(*base, "--expect-revision", "0", "--dry-run").exit_code == 0
    assert run(*base, "--until", "2099-01-01T10:00+02:00").exit_code == 0
    with_zero, without = server.servicer.set_requests
    assert with_zero.options.HasField("expected_mod_revision")
    assert with_zero.options.expected_mod_revision == 0
    assert with_zero.options.dry_run is True
    assert with_zero.value.WhichOneof("kind") == "number_value"
    assert with_zero.value.number_value == 5.0
    assert not without.options.HasField("expected_mod_revision")
    assert without.options.expires_at.ToDatetime(tzinfo=UTC) == datetime(2099, 1, 1, 8, tzinfo=UTC)


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


def test_dry_run_over_the_wire(server: Server) -> None:
    base = ["--server", server.address, "flag", "set", "checkout", "new-ui"]
    would = run(*base, "true", "--reason", "r", "--dry-run")
    assert would.exit_code == 0, would.output
    assert would.stdout == (
        "dry run: would set checkout: flag new-ui = true (was false) · nothing written\n"
    )
    same = run(*base, "false", "--reason", "r", "--dry-run")
    assert same.exit_code == 0, same.output
    assert same.stdout == (
        "dry run: unchanged (nothing would change) · checkout: flag new-ui = false\n"
    )
    assert [r.options.dry_run for r in server.servicer.set_requests] == [True, True]


def test_rerun_prints_unchanged_and_exits_0(server: Server) -> None:
    args = ["--server", server.address, "flag", "set", "checkout", "new-ui", "false"]
    result = run(*args, "--reason", "again")
    assert result.exit_code == 0, result.output
    assert result.stdout == "checkout: flag new-ui = false · unchanged\n"


def test_conflict_exits_4_with_a_hint(server: Server) -> None:
    result = run(
        "--server", server.address, "flag", "set", "checkout", "new-ui", "true",
        "--reason", "r", "--expect-revision", "3",
    )  # fmt: skip
    assert result.exit_code == 4
    assert "error: expected mod revision 3, current 812" in result.stderr
    assert "--expect-revision" in result.stderr.splitlines()[1]


def test_help_does_not_import_grpc() -> None:
    # Only checks the CLI modules themselves: importing them must not pull in gRPC stubs.
    import subprocess
    import sys

    code = (
        "import sys; import controlplane.cli; "
        "print(any(m == 'grpc' or m.startswith('controlplane.api') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_commands_are_listed_in_incident_order() -> None:
    assert isinstance(cli, click.Group)
    ctx = click.Context(cli)
    assert cli.list_commands(ctx) == [
        "flag", "shed", "pin", "known-good", "rollback", "bundle", "status", "watch", "history",
        "timeline",
    ]  # fmt: skip


# ---- --wait: outcomes, exit codes, output ----


def _instance(instance_id: str, **fields: Any) -> types_pb2.Instance:
    return types_pb2.Instance(service="checkout", instance_id=instance_id, **fields)


WAIT_APPLIED = mitigation_pb2.WaitAppliedResponse(
    all_applied=True, connected=3, applied=3, applied_at=_ts(NOW)
)
WAIT_PARTLY = mitigation_pb2.WaitAppliedResponse(
    connected=3,
    applied=1,
    pending=[_instance("i-2", applied_revision=811), _instance("i-3", applied_revision=0)],
)
WAIT_NOBODY = mitigation_pb2.WaitAppliedResponse()
WAIT_NACKED = mitigation_pb2.WaitAppliedResponse(
    connected=2, applied=1, nacks={"i-2": "limits.rps must be positive"}
)


@pytest.mark.parametrize(
    ("response", "outcome", "code"),
    [
        (WAIT_APPLIED, "applied", 0),
        (WAIT_PARTLY, "timed_out", 8),
        (WAIT_NOBODY, "no_instances", 9),
        (WAIT_NACKED, "rejected", 10),
        # A rejection is reported even when some instances are still pending.
        (mitigation_pb2.WaitAppliedResponse(connected=2, nacks={"i-1": "no"}), "rejected", 10),
        # Connected instances that all applied it, but another server has not confirmed.
        (mitigation_pb2.WaitAppliedResponse(connected=2, applied=2), "timed_out", 8),
    ],
)
def test_wait_outcome_and_its_exit_code(
    response: mitigation_pb2.WaitAppliedResponse, outcome: str, code: int
) -> None:
    assert wait_outcome(to_plain(response)) == outcome
    assert wait_exit_code(outcome) == code


def test_the_most_serious_outcome_of_several_services_wins() -> None:
    assert worst_outcome([]) == "applied"
    assert worst_outcome(["applied", "no_instances"]) == "no_instances"
    assert worst_outcome(["no_instances", "timed_out", "applied"]) == "timed_out"
    assert worst_outcome(["timed_out", "rejected", "no_instances"]) == "rejected"


def _wait_service(service: str, response: mitigation_pb2.WaitAppliedResponse) -> dict[str, Any]:
    plain = to_plain(response)
    return {"service": service, "outcome": wait_outcome(plain), "seconds": 0.123, **plain}


def test_wait_lines_say_how_many_applied_and_name_the_problems() -> None:
    applied = describe_wait(_wait_service("checkout", WAIT_APPLIED))
    assert applied == "checkout: applied by 3/3 instances in 0.12 s"
    partly = describe_wait(_wait_service("checkout", WAIT_PARTLY))
    assert partly == (
        "checkout: applied by only 1/3 instances within 0.1 s; "
        "pending: i-2 (at rev 811), i-3 (at rev 0)"
    )
    nobody = describe_wait(_wait_service("chekout", WAIT_NOBODY))
    assert nobody.startswith("chekout: no connected instance to apply it (is the service name")
    nacked = describe_wait(_wait_service("checkout", WAIT_NACKED))
    assert nacked == (
        "checkout: rejected by 1 of 2 instance(s): i-2 (limits.rps must be positive); "
        "applied by 1/2"
    )
    many = mitigation_pb2.WaitAppliedResponse(
        connected=20, pending=[_instance(f"i-{n}") for n in range(15)]
    )
    assert describe_wait(_wait_service("checkout", many)).endswith("i-9 (at rev 0) and 5 more")

    report = {
        "services": [
            _wait_service("checkout", WAIT_APPLIED),
            _wait_service("search", WAIT_PARTLY),
        ]
    }
    lines, problems = render_wait(report)
    assert [line.split(":")[0] for line in lines] == ["checkout"]
    assert [problem.split(":")[0] for problem in problems] == ["search"]


def test_wait_document_has_the_documented_shape() -> None:
    assert tuple(_wait_service("checkout", WAIT_APPLIED)) == JSON_SHAPES["WaitService"]


def test_wait_services_of_a_flag_scope() -> None:
    assert scope_wait_services("checkout", WaitArgs()) == ()
    assert scope_wait_services("checkout", WaitArgs(enabled=True)) == ("checkout",)
    both = WaitArgs(enabled=True, services=("checkout", "search"))
    assert scope_wait_services("global", both) == ("checkout", "search")
    with pytest.raises(click.UsageError, match="--wait needs a service scope; for a global"):
        scope_wait_services("global", WaitArgs(enabled=True))
    with pytest.raises(click.UsageError, match="--wait-service is for a global flag"):
        scope_wait_services("checkout", both)


def test_services_of_a_bundle() -> None:
    keys = ["flags/checkout/new-ui", "flags/global/checkout.mode", "shedding/search", "pins/a"]
    assert key_services(keys) == (["a", "checkout", "search"], True)
    assert key_services(["flags/global/kill"]) == ([], True)
    changes: list[dict[str, Any]] = [
        {"set_flag": {"scope": "global", "name": "x"}, "clear_flag": None},
        {"set_shedding": {"service": "search", "percent": 30}},
        {"unpin_version": {"service": "payments"}},
    ]
    assert change_services(changes) == (["payments", "search"], True)


def test_wait_after_a_write_waits_for_its_revision(server: Server) -> None:
    result = run(
        "--json", "--server", server.address, "flag", "set", "checkout", "new-ui", "true",
        "--reason", "r", "--wait", "--wait-timeout", "2s",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (request,) = server.servicer.wait_requests
    assert (request.service, request.revision) == ("checkout", 813)
    assert request.timeout.ToTimedelta() <= timedelta(seconds=2)
    assert request.timeout.ToTimedelta() > timedelta(seconds=1)
    wait = json.loads(result.stdout)["wait"]
    assert tuple(wait) == JSON_SHAPES["Wait"]
    assert (wait["outcome"], wait["revision"]) == ("applied", 813)
    assert [s["service"] for s in wait["services"]] == ["checkout"]


@pytest.mark.parametrize(
    ("response", "code", "name", "text"),
    [
        (WAIT_PARTLY, 8, "WAIT_TIMEOUT", "pending: i-2 (at rev 811), i-3 (at rev 0)"),
        (WAIT_NOBODY, 9, "WAIT_NO_INSTANCES", "checkout: no connected instance"),
        (WAIT_NACKED, 10, "REJECTED", "i-2 (limits.rps must be positive)"),
    ],
)
def test_wait_failures_exit_with_their_code_and_keep_the_write_result(
    server: Server, response: mitigation_pb2.WaitAppliedResponse, code: int, name: str, text: str
) -> None:
    server.servicer.waits["checkout"] = response
    args = ["flag", "set", "checkout", "new-ui", "true", "--reason", "r", "--wait"]
    human = run("--server", server.address, *args)
    assert human.exit_code == code, human.output
    assert human.stdout == "checkout: flag new-ui = true (was false) · rev 813\n"
    error, hint = human.stderr.splitlines()
    assert error.startswith("error: --wait: checkout: ")
    assert text in error
    assert hint.startswith("hint: the change is written (rev 813)")
    if code == 8:
        assert "`cpctl status checkout`" in hint

    server.servicer.flags.clear()
    as_json = run("--json", "--server", server.address, *args)
    assert as_json.exit_code == code
    assert json.loads(as_json.stdout)["wait"]["outcome"] == wait_outcome(to_plain(response))
    error_doc = json.loads(as_json.stderr)["error"]
    assert (error_doc["code"], error_doc["exit_code"]) == (name, code)


def test_no_wait_for_an_unchanged_write_or_a_dry_run(server: Server) -> None:
    server.servicer.waits["checkout"] = WAIT_NOBODY
    base = ["--server", server.address, "flag", "set", "checkout", "new-ui"]
    unchanged = run("--json", *base, "false", "--reason", "again", "--wait")
    assert unchanged.exit_code == 0, unchanged.output
    assert json.loads(unchanged.stdout)["wait"] is None
    dry = run(*base, "true", "--reason", "r", "--wait", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert server.servicer.wait_requests == []


def test_without_wait_the_document_has_no_wait_key(server: Server) -> None:
    result = run(
        "--json", "--server", server.address, "flag", "set", "checkout", "new-ui", "true",
        "--reason", "r",
    )  # fmt: skip
    assert "wait" not in json.loads(result.stdout)
    assert server.servicer.wait_requests == []


def test_wait_for_several_services_of_a_global_flag(server: Server) -> None:
    server.servicer.waits["search"] = WAIT_NOBODY
    result = run(
        "--server", server.address, "flag", "set", "global", "kill", "true", "--reason", "r",
        "--wait-service", "checkout", "--wait-service", "search",
    )  # fmt: skip
    assert result.exit_code == 9, result.output
    assert [r.service for r in server.servicer.wait_requests] == ["checkout", "search"]
    assert "checkout: applied by 3/3 instances in " in result.stdout
    assert "error: --wait: search: no connected instance" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["global", "kill", "true", "--wait"], "--wait needs a service scope"),
        (["global", "kill", "true", "--wait-service", "Checkout"], "not a service name"),
        (["global", "kill", "true", "--wait-service", "global"], "not a service name"),
        (["checkout", "kill", "true", "--wait-timeout", "6m"], "at most 5m"),
        (["checkout", "kill", "true", "--wait-timeout", "soon"], "not a duration"),
    ],
)
def test_bad_wait_options_are_usage_errors_before_any_call(
    server: Server, args: list[str], message: str
) -> None:
    result = run("--server", server.address, "flag", "set", *args, "--reason", "r")
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert server.servicer.calls == []


def test_a_failed_wait_call_says_the_change_is_written(server: Server) -> None:
    server.servicer.fail["WaitApplied"] = (grpc.StatusCode.INTERNAL, "boom")
    result = run(
        "--json", "--server", server.address, "flag", "set", "checkout", "new-ui", "true",
        "--reason", "r", "--wait",
    )  # fmt: skip
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["result"]["revision"] == 813
    assert document["wait"] is None


# ---- status ----


def _status(**fields: Any) -> mitigation_pb2.GetStatusResponse:
    return mitigation_pb2.GetStatusResponse(service="checkout", revision=900, **fields)


def test_status_marks_scope_time_left_drift_lag_and_stale_instances() -> None:
    own = types_pb2.Flag(
        scope="checkout",
        name="new-ui",
        value=types_pb2.FlagValue(bool_value=False),
        meta=types_pb2.Meta(
            actor="sre-1", reason="errors", expires_at=_ts(NOW + timedelta(minutes=29))
        ),
    )
    inherited = types_pb2.Flag(
        scope="global", name="checkout.mode", value=types_pb2.FlagValue(string_value="read-only")
    )
    response = _status(
        flags=[own, inherited],
        shedding=types_pb2.Shedding(
            service="checkout",
            tier=types_pb2.SHEDDABLE_PLUS,
            percent=30,
            meta=types_pb2.Meta(actor="sre-1", expires_at=_ts(NOW + timedelta(hours=2))),
        ),
        pin=types_pb2.Pin(service="checkout", version="v1.4.2", meta=types_pb2.Meta(actor="sre-2")),
        instances=[
            _instance("i-1", running_version="v1.4.2", applied_revision=900, connected=True,
                      server_id="s1"),
            _instance("i-2", running_version="v1.5.0", applied_revision=899, lag=1,
                      connected=True, server_id="s1"),
            _instance("i-3", running_version="v1.4.2", lag=-1, server_id="s2",
                      last_seen=_ts(NOW - timedelta(minutes=3))),
        ],
        drift={"v1.5.0": 1},
    )  # fmt: skip
    lines = list(render_status(to_plain(response), NOW).lines)
    assert lines[0] == "checkout · revision 900 · 2 of 3 instance(s) connected"
    new_ui = next(line for line in lines if line.strip().startswith("new-ui"))
    assert "checkout (own)" in new_ui
    assert "2026-11-26T17:59:00Z (in 29m)" in new_ui
    mode = next(line for line in lines if line.strip().startswith("checkout.mode"))
    assert mode.split()[1:3] == ['"read-only"', "global"]
    shedding = next(line for line in lines if line.startswith("shedding:"))
    assert shedding.startswith("shedding: SHEDDABLE_PLUS 30% (sheds all of SHEDDABLE and 30%")
    assert "expires 2026-11-26T19:30:00Z (in 2h), then off" in shedding
    assert "pin: v1.4.2" in lines
    rows = {line.split()[0]: line for line in lines if line.startswith("i-")}
    assert rows["i-1"].split() == ["i-1", "s1", "yes", "900", "0", "v1.4.2"]
    assert rows["i-2"].split()[:6] == ["i-2", "s1", "yes", "899", "1", "v1.5.0"]
    assert "DRIFT: pinned v1.4.2" in rows["i-2"] and "behind by 1 change(s)" in rows["i-2"]
    assert rows["i-3"].split()[:6] == ["i-3", "s2", "no", "-", "?", "v1.4.2"]
    assert "stale (disconnected, last seen 3m ago)" in rows["i-3"]
    assert "lag unknown" in rows["i-3"] and "DRIFT" not in rows["i-3"]
    assert "drift: 1 instance(s) run v1.5.0, not the pinned v1.4.2" in lines
    assert NO_INSTANCES not in lines


def test_status_without_connected_instances_says_so() -> None:
    lines = list(render_status(to_plain(_status()), NOW).lines)
    assert lines[0] == "checkout · revision 900 · 0 of 0 instance(s) connected"
    assert lines[2:5] == ["flags: none", "shedding: off", "pin: none"]
    assert lines[-1] == NO_INSTANCES
    stale = _status(instances=[_instance("i-1", connected=False)])
    assert render_status(to_plain(stale), NOW).lines[-1] == NO_INSTANCES


# ---- watch ----


def _entry(kind: str, before: Any, after: Any, **fields: Any) -> types_pb2.AuditEntry:
    defaults: dict[str, Any] = {"id": "a1", "revision": 812, "time": _ts(NOW), "actor": "sre-1"}
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
                expires_at=_ts(NOW + timedelta(minutes=30)),
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


# ---- bundles ----


def _bundle(**fields: Any) -> mitigation_pb2.Bundle:
    return mitigation_pb2.Bundle(
        id="20261126-164500-degrade-checkout-3fa2",
        name="degrade-checkout",
        meta=types_pb2.Meta(
            actor="sre-1", reason="payment provider timeouts", incident="INC-42",
            set_at=_ts(NOW - timedelta(minutes=45)),
        ),
        revision=812,
        changes=[
            mitigation_pb2.BundleChange(
                set_flag=mitigation_pb2.SetFlagRequest(
                    scope="checkout", name="new-ui", value=types_pb2.FlagValue(bool_value=False)
                )
            ),
            mitigation_pb2.BundleChange(
                set_shedding=mitigation_pb2.SetSheddingRequest(service="checkout", percent=30)
            ),
            mitigation_pb2.BundleChange(
                pin_version=mitigation_pb2.PinVersionRequest(service="checkout", version="v1.4.2")
            ),
            mitigation_pb2.BundleChange(
                clear_flag=mitigation_pb2.ClearFlagRequest(
                    scope="global", name="x", all_layers=True
                )
            ),
            mitigation_pb2.BundleChange(
                clear_shedding=mitigation_pb2.ClearSheddingRequest(service="search")
            ),
            mitigation_pb2.BundleChange(
                unpin_version=mitigation_pb2.UnpinVersionRequest(service="payments")
            ),
        ],
        keys=["flags/checkout/new-ui", "shedding/checkout", "pins/checkout"],
        **fields,
    )  # fmt: skip


def test_bundle_get_shows_state_changes_and_who_why_when() -> None:
    overridden = _bundle(
        state=mitigation_pb2.PARTIALLY_OVERRIDDEN, overridden_keys=["shedding/checkout"]
    )
    lines = list(
        render_bundle_get(to_plain(mitigation_pb2.GetBundleResponse(bundle=overridden)), NOW).lines
    )
    assert lines == [
        "bundle 20261126-164500-degrade-checkout-3fa2 (degrade-checkout): partially overridden "
        "(changed since by others: shedding/checkout)",
        "  applied   by sre-1, 2026-11-26T16:45:00Z (45m ago) · rev 812",
        "  reason    payment provider timeouts",
        "  incident  INC-42",
        "  changes:",
        "    checkout: flag new-ui = false",
        "    checkout: shedding SHEDDABLE 30%",
        "    checkout: pin v1.4.2",
        "    global: clear flag x (all layers)",
        "    search: shedding off",
        "    payments: unpin",
        "  keys      flags/checkout/new-ui, shedding/checkout, pins/checkout",
    ]  # fmt: skip
    reverted = _bundle(
        state=mitigation_pb2.REVERTED,
        reverted=types_pb2.Meta(
            actor="sre-2", reason="recovered", set_at=_ts(NOW - timedelta(minutes=5))
        ),
    )
    doc = to_plain(mitigation_pb2.GetBundleResponse(bundle=reverted))
    text = list(render_bundle_get(doc, NOW).lines)
    assert text[0].endswith(": reverted")
    assert "  reverted  by sre-2, 2026-11-26T17:25:00Z (5m ago): recovered" in text


@pytest.mark.parametrize(
    ("state", "text"),
    [
        (mitigation_pb2.APPLIED, "applied"),
        (mitigation_pb2.REVERTED, "reverted"),
        (mitigation_pb2.EXPIRED, "expired"),
        (mitigation_pb2.PARTIALLY_OVERRIDDEN, "partially overridden"),
    ],
)
def test_bundle_list_shows_each_state(state: int, text: str) -> None:
    response = mitigation_pb2.ListBundlesResponse(bundles=[_bundle(state=state)])
    header, row = render_bundle_list(to_plain(response), NOW).lines
    assert header.split() == [
        "ID", "STATE", "CHANGES", "APPLIED", "EXPIRES", "ACTOR", "INCIDENT", "REASON",
    ]  # fmt: skip
    assert row.startswith(f"20261126-164500-degrade-checkout-3fa2  {text}  ")
    assert " 6  " in row
    assert render_bundle_list({"bundles": []}, NOW).lines == ["no bundles"]


def test_bundle_apply_and_revert_lines() -> None:
    summary = "bundle degrade-checkout: checkout: flag new-ui = false (was true); checkout: pin v1"
    applied = mitigation_pb2.ApplyBundleResponse(
        result=types_pb2.WriteResult(changed=True, revision=812, summary=summary),
        bundle=_bundle(state=mitigation_pb2.APPLIED),
    )
    assert list(render_bundle_apply(to_plain(applied), NOW).lines) == [
        "bundle degrade-checkout applied as 20261126-164500-degrade-checkout-3fa2 · rev 812",
        "  checkout: flag new-ui = false (was true)",
        "  checkout: pin v1",
        'revert with: cpctl bundle revert 20261126-164500-degrade-checkout-3fa2 --reason "..."',
    ]
    twin = mitigation_pb2.ApplyBundleResponse(
        result=types_pb2.WriteResult(summary="bundle degrade-checkout is already applied as X")
    )
    assert list(render_bundle_apply(to_plain(twin), NOW).lines) == [
        "bundle degrade-checkout is already applied as X · unchanged"
    ]
    dry = mitigation_pb2.ApplyBundleResponse(
        result=types_pb2.WriteResult(dry_run=True, would_change=True, summary=summary),
        bundle=_bundle(),
    )
    assert render_bundle_apply(to_plain(dry), NOW).lines[0] == (
        "dry run: would apply bundle degrade-checkout · nothing written"
    )
    reverted = mitigation_pb2.RevertBundleResponse(
        result=types_pb2.WriteResult(
            changed=True,
            revision=900,
            summary="bundle degrade-checkout reverted: checkout: shedding removed",
        ),
        bundle=_bundle(state=mitigation_pb2.REVERTED),
        overwritten_keys=["shedding/checkout"],
    )
    rendered = render_bundle_revert(to_plain(reverted), NOW)
    assert list(rendered.lines) == [
        "bundle 20261126-164500-degrade-checkout-3fa2 (degrade-checkout) reverted · rev 900",
        "  checkout: shedding removed",
    ]
    assert list(rendered.warnings) == [
        "warning: --force overwrote changes made after the bundle: shedding/checkout"
    ]


def test_bundle_file_errors_exit_3_before_any_call(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("name: b\nreason: r\nchanges:\n  - shed: {service: checkout}\n")
    result = run("--server", server.address, "bundle", "apply", str(path))
    assert result.exit_code == 3
    assert result.stderr.startswith(f"error: {path}: changes[0].shed: missing percent")
    assert server.servicer.calls == []


def test_bundle_of_global_flags_needs_wait_service(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(
        json.dumps(
            {
                "name": "b",
                "reason": "r",
                "changes": [{"flag": {"scope": "global", "name": "kill", "value": True}}],
            }
        )
    )
    result = run("--server", server.address, "bundle", "apply", str(path), "--wait")
    assert result.exit_code == 2
    assert "this bundle changes only global flags" in result.stderr
    assert "--wait-service S" in result.stderr
    assert server.servicer.calls == []


def test_bundle_revert_needs_a_reason(server: Server) -> None:
    result = run("--server", server.address, "bundle", "revert", "20261126-164500-b-3fa2")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --reason is required")
    assert server.servicer.calls == []


def test_revert_with_wait_of_a_bundle_of_global_flags_needs_wait_service(server: Server) -> None:
    bundle_id = "20261126-164500-kill-3fa2"
    server.servicer.bundles[bundle_id] = mitigation_pb2.Bundle(
        id=bundle_id, name="kill", keys=["flags/global/kill"]
    )
    args = ["--server", server.address, "bundle", "revert", bundle_id, "--reason", "r"]
    result = run(*args, "--wait")
    assert result.exit_code == 2, result.output
    assert "this bundle changed only global flags" in result.stderr
    # Read, not written: the revert was never sent.
    assert server.servicer.calls == ["GetBundle"]
    missing = run(*args[:4], "20261126-164500-gone-3fa2", "--reason", "r", "--wait")
    assert missing.exit_code == 5


def test_shell_completion_comes_from_the_cli_itself() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    cpctl = Path(sys.executable).parent / "cpctl"
    env = dict(os.environ, COMP_WORDS="cpctl shed set checkout 30 --tier ", COMP_CWORD="6")
    env["_CPCTL_COMPLETE"] = "bash_complete"
    out = subprocess.run([str(cpctl)], env=env, capture_output=True, text=True, check=False)
    offered = {line.split(",", 1)[1] for line in out.stdout.splitlines() if "," in line}
    assert {"sheddable", "sheddable_plus", "critical", "critical_plus"} <= {
        o.lower() for o in offered
    }
    script = subprocess.run(
        [str(cpctl)], env=dict(os.environ, _CPCTL_COMPLETE="zsh_source"),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "compdef" in script.stdout


# ---- connection security: TLS options, the token, the plaintext rule ----

TOKEN = "cli-secret-token-0123456789"


def test_plaintext_off_loopback_is_a_usage_error_naming_insecure() -> None:
    result = run("--server", "10.0.0.1:50051", "flag", "get", "checkout", "new-ui")
    assert result.exit_code == 2
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: server 10.0.0.1:50051 is not on loopback")
    assert "--tls-ca" in first and "--tls " in first and "--insecure" in first
    assert "see: cpctl --help" in result.stderr
    assert result.stdout == ""

    as_json = run("--json", "--server", "10.0.0.1:50051", "flag", "get", "checkout", "new-ui")
    assert as_json.exit_code == 2
    error = json.loads(as_json.stderr)["error"]
    assert error["code"] == "USAGE" and error["exit_code"] == 2
    assert error["message"].startswith("server 10.0.0.1:50051 is not on loopback")


def test_every_server_of_the_list_must_be_on_loopback(server: Server) -> None:
    result = run("--server", f"{server.address},cp.internal:50051", "flag", "get", "checkout", "x")
    assert result.exit_code == 2
    assert "server cp.internal:50051 is not on loopback" in result.stderr
    assert server.servicer.calls == []  # refused before any call


@pytest.mark.parametrize("how", ["option", "environment"])
def test_with_insecure_plaintext_off_loopback_goes_on_to_the_server(how: str) -> None:
    # Nothing answers at 10.0.0.1 here: the call fails to connect, not the usage.
    args = ["--insecure"] if how == "option" else []
    env = {"CPCTL_INSECURE": "1"} if how == "environment" else {}
    result = run(
        "--json", "--timeout", "300ms", "--server", "10.0.0.1:50051", *args,
        "flag", "get", "checkout", "new-ui", env=env,
    )  # fmt: skip
    assert result.exit_code == ExitCode.UNAVAILABLE, result.output
    assert json.loads(result.stderr)["error"]["code"] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


@pytest.fixture
def pki(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


def test_bad_tls_options_are_usage_errors_naming_the_option(pki: TestCA, tmp_path: Path) -> None:
    client = pki.issue("client")
    missing = tmp_path / "missing.pem"
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["--tls-cert", str(client.cert)], {}, "--tls-cert (a client certificate) needs its "
         "--tls-key"),
        (["--tls-key", str(client.key)], {}, "--tls-key (a client key) needs its certificate: "
         "--tls-cert"),
        (["--insecure", "--tls-ca", str(pki.cert)], {}, "--insecure (plaintext) contradicts "
         "--tls-ca (TLS)"),
        (["--tls-server-name", "cp.internal"], {}, "--tls-server-name applies to TLS only"),
        (["--tls-ca", str(missing)], {}, f"cannot read --tls-ca {missing} (CA certificates): "
         "No such file or directory"),
        (["--tls-ca", str(client.key)], {}, "--tls-ca "),
        # Given in the environment, the variable is what the message names.
        ([], {"CPCTL_TLS_CA": str(missing)}, f"cannot read CPCTL_TLS_CA {missing}"),
        ([], {"CPCTL_TLS_CERT": str(client.cert)}, "CPCTL_TLS_CERT (a client certificate) "
         "needs its --tls-key"),
        (["--token-file", str(missing)], {}, f"cannot read --token-file {missing} (token file)"),
        ([], {"CPCTL_TOKEN": TOKEN, "CPCTL_TOKEN_FILE": str(client.cert)},
         "give CPCTL_TOKEN or CPCTL_TOKEN_FILE, not both"),
        ([], {"CPCTL_TOKEN": "two words"}, "CPCTL_TOKEN must be visible ASCII characters only"),
    ]  # fmt: skip
    for args, env, message in cases:
        result = run(*args, "flag", "list", env=env)
        assert result.exit_code == 2, (args, env, result.output)
        assert result.stderr.startswith(f"error: {message}"), (args, env, result.stderr)
        assert TOKEN not in result.stderr


def test_no_token_option_exists_on_purpose() -> None:
    result = run("--token", TOKEN, "flag", "list")
    assert result.exit_code == 2
    assert "No such option '--token'" in result.stderr
    text = run("--help").stdout
    for option in ("--tls ", "--tls-ca", "--tls-cert", "--tls-key", "--tls-server-name"):
        assert option in text
    for name in ("--insecure", "--token-file", "CPCTL_TOKEN_FILE", "CPCTL_TLS_CA"):
        assert name in text
    assert "no --token option" in " ".join(text.split())
    assert "`ps`" in text


def bearer_of(servicer: FakeMitigation) -> list[tuple[str, str | None]]:
    return [(method, sent.get("authorization")) for method, sent in servicer.metadata]


def test_the_token_goes_with_every_call_the_wait_and_the_watch(
    server: Server, tmp_path: Path
) -> None:
    env = {"CPCTL_TOKEN": TOKEN}
    result = run("--server", server.address, *SET_ARGS, "--wait", env=env)
    assert result.exit_code == 0, result.output
    watched = run("--server", server.address, "watch", "checkout", env=env)
    assert watched.exit_code == 6  # the fake ends the stream
    assert bearer_of(server.servicer) == [
        ("SetFlag", f"Bearer {TOKEN}"),
        ("WaitApplied", f"Bearer {TOKEN}"),
        ("WatchChanges", f"Bearer {TOKEN}"),
    ]

    # From a file; an option given for the command wins over CPCTL_TOKEN.
    token_file = tmp_path / "token"
    token_file.write_text("Bearer from-the-file-42\n")
    server.servicer.metadata.clear()
    result = run(
        "--server", server.address, "--token-file", str(token_file), "flag", "get", "checkout",
        "new-ui", env=env,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert bearer_of(server.servicer) == [("GetFlag", "Bearer from-the-file-42")]

    # Without a token, no authorization metadata at all.
    server.servicer.metadata.clear()
    assert run("--server", server.address, "flag", "get", "checkout", "new-ui").exit_code == 0
    assert bearer_of(server.servicer) == [("GetFlag", None)]


@pytest.mark.parametrize(
    ("status", "details", "token", "hint"),
    [
        (
            grpc.StatusCode.UNAUTHENTICATED,
            "unknown or revoked token",
            True,
            "hint: the server did not accept your token (unknown, expired or revoked?): check "
            "CPCTL_TOKEN or --token-file (CPCTL_TOKEN_FILE)",
        ),
        (
            grpc.StatusCode.UNAUTHENTICATED,
            "no credentials: send the metadata 'authorization: Bearer <token>'",
            False,
            "hint: no token was sent: set CPCTL_TOKEN or --token-file (CPCTL_TOKEN_FILE)",
        ),
        (
            grpc.StatusCode.PERMISSION_DENIED,
            "ro-dashboard (role viewer) may not call SetFlag: it needs the operator role",
            True,
            "hint: your token's role does not allow this (the message says what it takes): "
            "use a token with that role",
        ),
    ],
)
def test_a_refused_call_exits_7_with_the_servers_details_and_a_hint(
    server: Server, status: grpc.StatusCode, details: str, token: bool, hint: str
) -> None:
    server.servicer.fail["SetFlag"] = (status, details)
    env = {"CPCTL_TOKEN": TOKEN} if token else {}
    result = run("--server", server.address, *SET_ARGS, env=env)
    assert result.exit_code == 7
    error, hint_line = result.stderr.splitlines()
    assert error == f"error: {server.address} refused the call ({status.name}): {details}"
    assert hint_line.startswith(hint)
    assert TOKEN not in result.stderr
    as_json = run("--json", "--server", server.address, *SET_ARGS, env=env)
    assert json.loads(as_json.stderr) == {
        "error": {
            "code": status.name,
            "message": f"{server.address} refused the call ({status.name}): {details}",
            "exit_code": 7,
        }
    }


def test_a_refused_wait_says_the_change_is_written(server: Server) -> None:
    denied = "ro-dashboard (role viewer) may not call WaitApplied: it needs the viewer role"
    server.servicer.fail["WaitApplied"] = (grpc.StatusCode.PERMISSION_DENIED, denied)
    result = run("--server", server.address, *SET_ARGS, "--wait", env={"CPCTL_TOKEN": TOKEN})
    assert result.exit_code == 7
    assert f"refused the call (PERMISSION_DENIED): {denied}" in result.stderr
    assert "but --wait failed: your token's role does not allow this" in result.stderr
