"""cpctl's connection: failover between servers, TLS options, the token and refusals."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from controlplane.cli import OUTCOME_UNKNOWN, ExitCode
from tests.helpers.certs import TestCA
from tests.unit.cli.support import FakeMitigation, Server, closed_address, run


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
