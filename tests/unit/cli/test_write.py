"""cpctl writes: the write options, and --wait (outcomes, exit codes, output)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from controlplane.api.v1 import mitigation_pb2
from controlplane.cli import wait_exit_code
from controlplane.cli._output import JSON_SHAPES, to_plain
from controlplane.cli._write import describe_wait, render_wait, wait_outcome, worst_outcome
from tests.unit.cli.support import NOW, Server, instance_message, run, ts


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


WAIT_APPLIED = mitigation_pb2.WaitAppliedResponse(
    all_applied=True, connected=3, applied=3, applied_at=ts(NOW)
)


WAIT_PARTLY = mitigation_pb2.WaitAppliedResponse(
    connected=3,
    applied=1,
    pending=[
        instance_message("i-2", applied_revision=811),
        instance_message("i-3", applied_revision=0),
    ],
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
    return {
        "service": service,
        "outcome": wait_outcome(plain),
        "revision": 813,
        "seconds": 0.123,
        **plain,
    }


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
        connected=20, pending=[instance_message(f"i-{n}") for n in range(15)]
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
    assert tuple(wait["services"][0]) == JSON_SHAPES["WaitService"]
    assert wait["services"][0]["revision"] == 813


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


def test_an_unchanged_write_waits_too_and_a_dry_run_does_not(server: Server) -> None:
    # The question --wait answers is "is what is in force applied everywhere": re-running a
    # write to a service nobody runs must not look like success.
    server.servicer.waits["checkout"] = WAIT_NOBODY
    base = ["--server", server.address, "flag", "set", "checkout", "new-ui"]
    unchanged = run("--json", *base, "false", "--reason", "again", "--wait")
    assert unchanged.exit_code == 9, unchanged.output
    doc = json.loads(unchanged.stdout)
    assert doc["result"]["changed"] is False
    assert doc["wait"]["outcome"] == "no_instances"
    assert [r.revision for r in server.servicer.wait_requests] == [doc["result"]["mod_revision"]]
    human = run(*base, "false", "--reason", "again", "--wait")
    assert human.exit_code == 9, human.output
    assert "hint: the change is in force (rev " in human.stderr
    server.servicer.wait_requests.clear()
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
