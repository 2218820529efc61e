"""The clients over TLS, mutual TLS and tokens, against a real server: cpctl, the agent, cp-agent.

The server is the real ``ControlServer`` on the session etcd with an auth file and
certificates made in the test (tests/helpers/certs.py). cpctl and cp-agent run as
processes of their own; the agent runs in the test's loop, its log read through a handler.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agents import AgentState, AsyncAgent
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server import ControlServer
from controlplane.server.auth import hash_token
from controlplane.transport import ClientSecurity
from tests.helpers.agent_log import AgentLog
from tests.helpers.agent_waits import serving
from tests.helpers.certs import TestCA
from tests.integration.conftest import server_config
from tests.integration.test_sidecar import SidecarProcess

CPCTL = Path(sys.executable).parent / "cpctl"
TOKENS = {
    "operator": "client-tls-operator-0123456789",
    "viewer": "client-tls-viewer-0123456789",
    "checkout-agent": "client-tls-checkout-agent-0123",
    "payments-agent": "client-tls-payments-agent-0123",
}
WRONG = "client-tls-not-a-token-0123456789"
WAIT = 15.0


def auth_document(*, without: str = "") -> dict[str, Any]:
    entries: list[dict[str, Any]] = [
        {"name": "oncall", "role": "operator", "token_sha256": hash_token(TOKENS["operator"])},
        {"name": "dashboard", "role": "viewer", "token_sha256": hash_token(TOKENS["viewer"])},
        {
            "name": "checkout-agents",
            "role": "agent",
            "services": ["checkout"],
            "token_sha256": hash_token(TOKENS["checkout-agent"]),
        },
        {
            "name": "payments-agents",
            "role": "agent",
            "services": ["payments"],
            "token_sha256": hash_token(TOKENS["payments-agent"]),
        },
    ]
    return {"identities": [e for e in entries if e["name"] != without]}


@dataclass
class TLSServer:
    server: ControlServer
    ca: TestCA
    auth_file: Path

    @property
    def address(self) -> str:
        return self.server.address


async def _start(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path, *, mutual: bool
) -> tuple[ControlServer, TestCA, Path]:
    ca = TestCA(tmp_path / "pki")
    cert = ca.server_cert()
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps(auth_document()))
    overrides: dict[str, Any] = {"tls_cert": cert.cert, "tls_key": cert.key, "auth_file": auth_file}
    if mutual:
        overrides["tls_client_ca"] = ca.cert
    srv = ControlServer(server_config(etcd.endpoint, prefix, **overrides), CollectorRegistry())
    await srv.start()
    return srv, ca, auth_file


@pytest.fixture
async def tls_server(etcd: EmbeddedEtcd, prefix: str, tmp_path: Path) -> AsyncIterator[TLSServer]:
    srv, ca, auth_file = await _start(etcd, prefix, tmp_path, mutual=False)
    yield TLSServer(srv, ca, auth_file)
    await srv.stop(grace=0)


@pytest.fixture
async def mtls_server(etcd: EmbeddedEtcd, prefix: str, tmp_path: Path) -> AsyncIterator[TLSServer]:
    srv, ca, auth_file = await _start(etcd, prefix, tmp_path, mutual=True)
    yield TLSServer(srv, ca, auth_file)
    await srv.stop(grace=0)


async def cpctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed cpctl, in a process of its own (the server runs on this loop)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CPCTL_")}
    argv = [str(CPCTL), *args]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**clean, **(env or {})},
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(argv, proc.returncode, stdout.decode(), stderr.decode())


def write_token(path: Path, token: str) -> Path:
    path.write_text(f"{token}\n")
    return path


SET = ("flag", "set", "checkout", "tls-kill", "false", "--reason", "client tls test")


# ---------------------------------------------------------------- cpctl


async def test_cpctl_over_tls_with_a_token_file(tls_server: TLSServer, tmp_path: Path) -> None:
    token_file = write_token(tmp_path / "token", TOKENS["operator"])
    base = ["--server", tls_server.address, "--tls-ca", str(tls_server.ca.cert)]
    done = await cpctl(*base, "--token-file", str(token_file), "--json", *SET)
    assert done.returncode == 0, done.stderr
    # The server took the token's identity as the actor, not the OS user.
    assert json.loads(done.stdout)["flag"]["meta"]["actor"] == "oncall"
    # The same from the environment.
    env = {"CPCTL_TLS_CA": str(tls_server.ca.cert), "CPCTL_TOKEN": TOKENS["viewer"]}
    got = await cpctl(
        "--server", tls_server.address, "flag", "get", "checkout", "tls-kill", env=env
    )
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith("checkout: flag tls-kill = false")


async def test_cpctl_verifies_the_servers_certificate(tls_server: TLSServer) -> None:
    env = {"CPCTL_TOKEN": TOKENS["viewer"]}
    read = ("--server", tls_server.address, "flag", "list")
    # The system's roots do not know the test CA: verification fails, and the hint says so.
    system_roots = await cpctl("--tls", *read, env=env)
    assert system_roots.returncode == 6, system_roots.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in system_roots.stderr
    assert "hint: the TLS handshake failed: --tls-ca must be the CA" in system_roots.stderr
    # Another CA: the same.
    other = TestCA(tls_server.ca.directory / "other", name="other CA")
    wrong_ca = await cpctl("--tls-ca", str(other.cert), *read, env=env)
    assert wrong_ca.returncode == 6, wrong_ca.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca.stderr
    # A name the certificate does not carry fails; one it does carry passes.
    ca = ("--tls-ca", str(tls_server.ca.cert))
    misnamed = await cpctl(*ca, "--tls-server-name", "cp.example.com", *read, env=env)
    assert misnamed.returncode == 6, misnamed.stderr
    assert "hint: the TLS handshake failed" in misnamed.stderr
    named = await cpctl(*ca, "--tls-server-name", "localhost", *read, env=env)
    assert named.returncode == 0, named.stderr
    # Plaintext to a TLS server (on loopback, so allowed) is closed by the server.
    plaintext = await cpctl(*read, env=env)
    assert plaintext.returncode == 6, plaintext.stderr
    assert "hint: the server closed the connection: if it requires TLS" in plaintext.stderr


async def test_cpctl_refusals_exit_7_with_the_servers_reason_and_a_hint(
    tls_server: TLSServer,
) -> None:
    base = ("--server", tls_server.address, "--tls-ca", str(tls_server.ca.cert))
    cases = [
        (WRONG, "unknown or revoked token", "hint: the server did not accept your token"),
        ("", "no credentials", "hint: no token was sent: set CPCTL_TOKEN or --token-file"),
        (
            TOKENS["viewer"],
            "dashboard (role viewer) may not call SetFlag: it needs the operator or admin role",
            "hint: your token's role does not allow this",
        ),
    ]
    for token, reason, hint in cases:
        env = {"CPCTL_TOKEN": token} if token else {}
        refused = await cpctl(*base, *SET, env=env)
        assert refused.returncode == 7, refused.stderr
        error, hint_line = refused.stderr.splitlines()
        assert error.startswith(f"error: {tls_server.address} refused the call (")
        assert reason in error
        assert hint_line.startswith(hint)
        assert WRONG not in refused.stderr
        as_json = await cpctl("--json", *base, *SET, env=env)
        assert as_json.returncode == 7
        assert json.loads(as_json.stderr)["error"]["exit_code"] == 7


async def test_mutual_tls_needs_a_client_certificate(
    mtls_server: TLSServer, tmp_path: Path
) -> None:
    ca = mtls_server.ca
    client = ca.issue("cpctl-client")
    env = {"CPCTL_TOKEN": TOKENS["viewer"]}
    base = ("--server", mtls_server.address, "--tls-ca", str(ca.cert))
    without = await cpctl(*base, "flag", "list", env=env)
    assert without.returncode == 6, without.stderr
    assert "hint: the server closed the connection during the TLS handshake" in without.stderr
    assert "(--tls-cert and --tls-key)" in without.stderr
    with_cert = await cpctl(
        *base, "--tls-cert", str(client.cert), "--tls-key", str(client.key), "flag", "list",
        env=env,
    )  # fmt: skip
    assert with_cert.returncode == 0, with_cert.stderr
    # A certificate from another CA is refused by the server.
    stranger = TestCA(tmp_path / "stranger", name="stranger CA").issue("stranger")
    foreign = await cpctl(
        *base, "--tls-cert", str(stranger.cert), "--tls-key", str(stranger.key), "flag", "list",
        env=env,
    )  # fmt: skip
    assert foreign.returncode == 6, foreign.stderr

    # ClientSecurity itself, as the SDK uses it.
    security = ClientSecurity(token=TOKENS["viewer"], ca=ca.cert, cert=client.cert, key=client.key)
    async with security.aio_channel(mtls_server.address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        await stub.ListPins(m.ListPinsRequest(), metadata=security.metadata(), timeout=5)


# ---------------------------------------------------------------- the agent


async def set_flag(address: str, ca: TestCA, name: str, value: bool) -> int:
    client = ca.issue("operator-client")  # for a server that requires one
    security = ClientSecurity(
        token=TOKENS["operator"], ca=ca.cert, cert=client.cert, key=client.key
    )
    async with security.aio_channel(address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        response = await stub.SetFlag(
            m.SetFlagRequest(
                scope="checkout",
                name=name,
                value=t.FlagValue(bool_value=value),
                options=t.WriteOptions(reason="client tls test"),
            ),
            metadata=security.metadata(),
            timeout=5,
        )
        revision: int = response.result.revision
        return revision


async def test_the_agent_over_tls_logs_a_refused_token_and_picks_up_a_rotated_one(
    tls_server: TLSServer, tmp_path: Path, agent_log: AgentLog
) -> None:
    ca = tls_server.ca.cert
    revision = await set_flag(tls_server.address, tls_server.ca, "tls-agent", True)
    token_file = write_token(tmp_path / "agent-token", WRONG)
    agent = AsyncAgent("checkout", [tls_server.address], tls_ca=ca, token_file=token_file)
    await agent.start()
    try:
        # A refused token: an ERROR that says so, and the agent keeps trying.
        refused = await agent_log.wait(
            "agent_auth_failed", "the server refused the token", level=logging.ERROR, within=WAIT
        )
        assert "UNAUTHENTICATED: unknown or revoked token" in refused.getMessage()
        assert "token_file/CONTROLPLANE_TOKEN_FILE" in refused.getMessage()
        assert agent.state is AgentState.CONNECTING
        # Rotated in place: the next connection reads it, no restart.
        write_token(token_file, TOKENS["checkout-agent"])
        assert await agent.wait_ready(WAIT)
        await serving(agent, revision, WAIT)
        assert agent.enabled("tls-agent") is True

        # The agent's token is revoked and the file now holds another service's token:
        # the stream ends, the reconnect is refused for the service; the last state stays.
        write_token(token_file, TOKENS["payments-agent"])
        tls_server.auth_file.write_text(json.dumps(auth_document(without="checkout-agents")))
        assert tls_server.server.reload()
        denied = await agent_log.wait(
            "agent_auth_failed",
            "the token does not allow service checkout",
            level=logging.ERROR,
            within=WAIT,
        )
        assert "PERMISSION_DENIED: payments-agents may sync payments, not checkout" in (
            denied.getMessage()
        )
        # Logged after the state changed: the state is the connection's, lost.
        assert str(agent.state) == "STALE"  # (mypy kept the CONNECTING asserted above)
        assert agent.enabled("tls-agent") is True
        # Retried with the refused-token backoff (1 s, then 2 s... at most), logged
        # once at ERROR (then DEBUG) per server.
        first = len(agent_log.messages("agent_auth_failed"))
        await agent_log.wait("agent_auth_failed", count=first + 2, within=WAIT)
        errors = agent_log.messages("agent_auth_failed", level=logging.ERROR)
        assert len([e for e in errors if "does not allow service checkout" in e]) == 1
    finally:
        await agent.close()
    every = " ".join(r.getMessage() for r in agent_log.records)
    for token in TOKENS.values():
        assert token not in every
    assert WRONG not in every


async def test_the_agent_over_mutual_tls_and_its_connect_errors(
    mtls_server: TLSServer, tmp_path: Path, agent_log: AgentLog
) -> None:
    ca = mtls_server.ca
    client = ca.issue("checkout-agent")
    token = TOKENS["checkout-agent"]
    # Without a client certificate the handshake fails: the log says why.
    bare = AsyncAgent("checkout", [mtls_server.address], tls_ca=ca.cert, token=token)
    await bare.start()
    try:
        failed = await agent_log.wait(
            "agent_connect_failed", "could not", level=logging.WARNING, within=WAIT
        )
        assert "could not connect: failed to connect to all addresses" in failed.getMessage()
        assert bare.state is AgentState.CONNECTING
    finally:
        await bare.close()
    agent = AsyncAgent(
        "checkout",
        [mtls_server.address],
        tls_ca=ca.cert,
        tls_cert=client.cert,
        tls_key=client.key,
        token=token,
    )
    await agent.start()
    try:
        assert await agent.wait_ready(WAIT)
    finally:
        await agent.close()


# ---------------------------------------------------------------- cp-agent


async def test_cp_agent_over_mutual_tls_with_a_token_file(
    mtls_server: TLSServer, tmp_path: Path
) -> None:
    ca = mtls_server.ca
    client = ca.issue("sidecar")
    await set_flag(mtls_server.address, ca, "tls-sidecar", True)
    token_file = write_token(tmp_path / "token", TOKENS["checkout-agent"])
    tls = [
        *("--tls-ca", str(ca.cert), "--tls-cert", str(client.cert)),
        *("--tls-key", str(client.key), "--token-file", str(token_file)),
    ]
    car = await SidecarProcess.start(mtls_server.address, *tls)
    refused: SidecarProcess | None = None
    try:
        await car.wait_http("/healthz", lambda status, _: status == 200)
        status, body = await car.get("/v1/flags/tls-sidecar")
        assert status == 200 and body["value"] is True

        # A token the server refuses: an error in the log, and not READY.
        wrong = write_token(tmp_path / "wrong", WRONG)
        refused = await SidecarProcess.start(
            mtls_server.address, *tls[:-1], str(wrong), "--log-level", "info"
        )
        await refused.wait_log(r"ERROR agents agent_auth_failed.*refused the token", WAIT)
        assert (await refused.get("/healthz"))[0] == 503
        assert WRONG not in refused.output
    finally:
        assert await car.stop() == 0
        if refused is not None:
            await refused.kill()
