"""TLS, mutual TLS and the plaintext rule on a real server; SIGHUP and secrets in a real process.

Certificates are made in the test (tests/helpers/certs.py).
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd, free_port
from controlplane.server import ControlServer, ServerConfigError
from controlplane.server.auth import hash_token
from controlplane.transport import ClientSecurity
from tests.helpers.certs import TestCA
from tests.helpers.server_process import ServerProcess
from tests.integration.conftest import server_config

OPERATOR_TOKEN = "tls-operator-token-5f1d2c"


def opts(**kw: Any) -> t.WriteOptions:
    return t.WriteOptions(reason="tls test", actor="claimed", **kw)


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


def auth_file(path: Path, *entries: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"identities": list(entries)}))
    return path


async def start(etcd: EmbeddedEtcd, prefix: str, **overrides: Any) -> ControlServer:
    srv = ControlServer(server_config(etcd.endpoint, prefix, **overrides), CollectorRegistry())
    await srv.start()
    return srv


@pytest.fixture
async def tls_server(
    etcd: EmbeddedEtcd, prefix: str, ca: TestCA, tmp_path: Path
) -> AsyncIterator[ControlServer]:
    cert = ca.server_cert()
    path = auth_file(
        tmp_path / "auth.json",
        {"name": "oncall", "role": "operator", "token_sha256": hash_token(OPERATOR_TOKEN)},
    )
    srv = await start(etcd, prefix, tls_cert=cert.cert, tls_key=cert.key, auth_file=path)
    yield srv
    await srv.stop(grace=0)


async def list_pins(security: ClientSecurity, address: str) -> m.ListPinsResponse:
    async with security.aio_channel(address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        response: m.ListPinsResponse = await stub.ListPins(
            m.ListPinsRequest(), metadata=security.metadata(), timeout=5
        )
        return response


async def test_tls_end_to_end_with_a_token(tls_server: ControlServer, ca: TestCA) -> None:
    security = ClientSecurity(token=OPERATOR_TOKEN, ca=ca.cert)
    async with security.aio_channel(tls_server.address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        response = await stub.SetFlag(
            m.SetFlagRequest(
                scope="checkout",
                name="kill-tls",
                value=t.FlagValue(bool_value=True),
                options=opts(),
            ),
            metadata=security.metadata(),
            timeout=5,
        )
        assert response.result.changed
        assert response.flag.meta.actor == "oncall"
    # The server's certificate is verified: another CA's clients do not connect...
    other = TestCA(ca.directory / "other", name="other CA")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await list_pins(ClientSecurity(token=OPERATOR_TOKEN, ca=other.cert), tls_server.address)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # ...and plaintext does not either.
    with pytest.raises(grpc.aio.AioRpcError) as plain:
        await list_pins(ClientSecurity(token=OPERATOR_TOKEN), tls_server.address)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_the_certificate_subject_is_the_identity(
    etcd: EmbeddedEtcd, prefix: str, ca: TestCA, tmp_path: Path
) -> None:
    server_cert = ca.server_cert()
    pipeline = ca.issue("deploy-pipeline", organization="Example")
    stranger = ca.issue("stranger")
    path = auth_file(
        tmp_path / "auth.json",
        {"name": "deploy", "role": "admin", "cert_subject": pipeline.subject},
        {"name": "oncall", "role": "operator", "token_sha256": hash_token(OPERATOR_TOKEN)},
    )
    srv = await start(
        etcd,
        prefix,
        tls_cert=server_cert.cert,
        tls_key=server_cert.key,
        tls_client_ca=ca.cert,
        auth_file=path,
    )
    try:
        assert srv.security_summary.startswith("mutual TLS, authentication on")
        security = ClientSecurity(ca=ca.cert, cert=pipeline.cert, key=pipeline.key)
        async with security.aio_channel(srv.address) as channel:
            stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
            marked = await stub.MarkKnownGood(
                m.MarkKnownGoodRequest(service="checkout", version="v9", options=opts()),
                timeout=5,
            )
            assert marked.result.changed
            history = await stub.ListHistory(m.ListHistoryRequest(service="checkout"), timeout=5)
            assert [(e.actor, e.actor_authenticated) for e in history.entries] == [("deploy", True)]
        # A certificate the CA signed but the auth file does not name: UNAUTHENTICATED...
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await list_pins(
                ClientSecurity(ca=ca.cert, cert=stranger.cert, key=stranger.key), srv.address
            )
        assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "CN=stranger" in (unknown.value.details() or "")
        # ...unless it brings a token, which then decides the identity.
        await list_pins(
            ClientSecurity(ca=ca.cert, cert=stranger.cert, key=stranger.key, token=OPERATOR_TOKEN),
            srv.address,
        )
        # No client certificate at all: the handshake fails.
        with pytest.raises(grpc.aio.AioRpcError) as no_cert:
            await list_pins(ClientSecurity(ca=ca.cert, token=OPERATOR_TOKEN), srv.address)
        assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.stop(grace=0)


async def test_plaintext_off_loopback_needs_insecure(etcd: EmbeddedEtcd, prefix: str) -> None:
    port = free_port()
    with pytest.raises(ServerConfigError, match=r"not a loopback address.*--insecure"):
        await start(etcd, prefix, listen=f"0.0.0.0:{port}", no_auth=True)
    # Nor without authentication, unless told.
    with pytest.raises(ServerConfigError, match=r"give --auth-file.*--no-auth"):
        await start(etcd, prefix, listen=f"0.0.0.0:{port}", insecure=True)
    srv = await start(etcd, prefix, listen=f"0.0.0.0:{port}", insecure=True, no_auth=True)
    try:
        assert srv.security_summary == "plaintext, authentication off"
        # The server answers (over loopback, which 0.0.0.0 includes).
        await list_pins(ClientSecurity(), f"127.0.0.1:{srv.port}")
    finally:
        await srv.stop(grace=0)


async def test_plaintext_to_etcd_off_loopback_needs_etcd_insecure(prefix: str) -> None:
    # Refused before any connection: no etcd needs to be there.
    srv = ControlServer(server_config("10.255.255.1:2379", prefix), CollectorRegistry())
    with pytest.raises(
        ServerConfigError, match=r"10\.255\.255\.1:2379 is not on loopback.*--etcd-insecure"
    ):
        await srv.start()
    await srv.stop(grace=0)


async def test_tls_settings_that_cannot_work_fail_at_start(
    etcd: EmbeddedEtcd, prefix: str, ca: TestCA
) -> None:
    one = ca.server_cert("one")
    two = ca.server_cert("two")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tls_cert": one.cert}, "--tls-cert needs --tls-key"),
        ({"tls_key": one.key}, "need --tls-cert"),
        ({"tls_cert": one.cert, "tls_key": two.key}, "cannot be used together"),
        ({"tls_cert": one.cert, "tls_key": one.key, "insecure": True}, "contradicts"),
        (
            {"tls_cert": one.cert, "tls_key": one.key, "tls_client_ca": ca.directory / "nope"},
            "--tls-client-ca",
        ),
    ]
    for overrides, message in cases:
        srv = ControlServer(server_config(etcd.endpoint, prefix, **overrides), CollectorRegistry())
        with pytest.raises(ServerConfigError, match=message):
            await srv.start()
        await srv.stop(grace=0)


def blocking_list_pins(address: str, token: str, ca: Path | None = None) -> grpc.StatusCode:
    security = ClientSecurity(token=token, ca=ca)
    with security.channel(address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        try:
            stub.ListPins(m.ListPinsRequest(), metadata=security.metadata(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_serve_reloads_on_sighup_and_never_logs_a_secret(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path, ca: TestCA, tls: bool
) -> None:
    old, new, wrong = "old-token-9a8b7c6d5e", "new-token-1f2e3d4c5b", "wrong-token-0a0b0c0d"
    path = auth_file(
        tmp_path / "auth.json",
        {"name": "oncall", "role": "operator", "token_sha256": hash_token(old)},
    )
    metrics_port = free_port()
    args = ["--auth-file", str(path), "--metrics", f"127.0.0.1:{metrics_port}"]
    server_ca: Path | None = None
    if tls:
        cert = ca.server_cert()
        args += ["--tls-cert", str(cert.cert), "--tls-key", str(cert.key)]
        server_ca = ca.cert
    server = ServerProcess(etcd.endpoint, prefix, extra_args=args)
    try:
        server.wait_output(r"listening on .*authentication on \(1 identities")
        assert blocking_list_pins(server.address, old, server_ca) == grpc.StatusCode.OK
        assert blocking_list_pins(server.address, wrong, server_ca) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        # A broken file is refused; the old one stays in force.
        path.write_text("{not json")
        mark = len(server.output)
        server.proc.send_signal(signal.SIGHUP)
        server.wait_output(r'"event": "auth_reload_failed"', start=mark)
        assert blocking_list_pins(server.address, old, server_ca) == grpc.StatusCode.OK
        # The new file: the new token works, the old one no longer does.
        auth_file(path, {"name": "oncall", "role": "operator", "token_sha256": hash_token(new)})
        mark = len(server.output)
        server.proc.send_signal(signal.SIGHUP)
        server.wait_output(r'"event": "auth_reloaded"', start=mark)
        assert blocking_list_pins(server.address, new, server_ca) == grpc.StatusCode.OK
        assert blocking_list_pins(server.address, old, server_ca) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert 'controlplane_auth_reloads_total{result="failed"} 1.0' in metrics
        assert 'controlplane_auth_refused_total{code="UNAUTHENTICATED",method="ListPins"}' in (
            metrics
        )
    finally:
        server.stop()
    logs = "".join(server.output)
    assert '"event": "rpc_refused"' in logs
    for secret in (old, new, wrong):
        assert secret not in logs
        assert secret not in metrics
        assert hash_token(secret) not in logs


def test_token_command_prints_a_token_and_its_hash(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTROLPLANE_")}
    made = subprocess.run(
        [sys.executable, "-m", "controlplane.server", "token"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    lines = dict(line.split(":", 1) for line in made.stdout.splitlines())
    token, digest = lines["token"].strip(), lines["token_sha256"].strip()
    assert len(token) >= 40
    assert digest == hash_token(token)
    hashed = subprocess.run(
        [sys.executable, "-m", "controlplane.server", "token", "--hash"],
        input=token + "\n",
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert hashed.stdout.strip() == digest


async def test_reload_rotates_the_server_certificate_for_new_connections(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    first, second = TestCA(tmp_path / "one", "first CA"), TestCA(tmp_path / "two", "second CA")
    old = first.server_cert("server")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(old.cert.read_bytes())
    key.write_bytes(old.key.read_bytes())
    srv = await start(etcd, prefix, tls_cert=cert, tls_key=key)
    try:
        await list_pins(ClientSecurity(ca=first.cert), srv.address)
        new = second.server_cert("server")
        # A half-written rotation (the new certificate, the old key) is refused...
        cert.write_bytes(new.cert.read_bytes())
        assert not srv.reload()
        # ...and the complete one taken, for the connections made from then on.
        key.write_bytes(new.key.read_bytes())
        assert srv.reload()
        await list_pins(ClientSecurity(ca=second.cert), srv.address)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await list_pins(ClientSecurity(ca=first.cert), srv.address)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.stop(grace=0)
