"""cpctl: exit codes, the gRPC status table, and how errors are reported."""

from __future__ import annotations

import json
import re

import grpc
import pytest

from controlplane.cli import ExitCode, exit_code_for_status
from tests.unit.cli.support import Server, run

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
