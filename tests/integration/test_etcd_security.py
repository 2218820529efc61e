"""The store's connection to etcd: TLS with client certificates, and etcd users with tokens.

Each etcd here is the module's own (TLS, or auth enabled), started with certificates made in
the test. Writes are checked through raw etcd calls independent of the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from aetcd import rpc
from prometheus_client import CollectorRegistry, generate_latest

from controlplane.embedded_etcd import EmbeddedEtcd, etcd_version
from controlplane.errors import EtcdAccessError, UnavailableError
from controlplane.metrics import ServerMetrics
from controlplane.model import WriteOptions
from controlplane.store import EtcdSecurity, Store, WatchEvent
from tests.helpers.certs import CertFiles, TestCA

pytestmark = pytest.mark.etcd_fault

ROOT_PASSWORD = "Root-pw-9c41e7-never-logged"
WRONG_PASSWORD = "Wrong-pw-51d0aa-never-logged"
LIMITED_USER = "no-role"
LIMITED_PASSWORD = "Limited-pw-2be8-never-logged"
# etcd's simple tokens: 16 letters, a dot, a counter.
TOKEN_RE = re.compile(r"[A-Za-z]{16}\.\d+")
OPTS = WriteOptions(reason="security test", actor="test")


# ---------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Certs:
    ca: TestCA
    server: CertFiles
    client: CertFiles
    other_ca: TestCA
    intruder: CertFiles  # a client certificate from a CA etcd does not trust


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _credentials(certs: Certs) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        _read(certs.ca.cert), _read(certs.client.key), _read(certs.client.cert)
    )


def _set_up_users(channel: grpc.Channel) -> None:
    """root (role root) and a user without any role, then auth on: as an operator would."""
    auth: Any = rpc.AuthStub(channel)
    auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=ROOT_PASSWORD), timeout=10)
    auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=10)
    auth.UserAdd(rpc.AuthUserAddRequest(name=LIMITED_USER, password=LIMITED_PASSWORD), timeout=10)
    auth.AuthEnable(rpc.AuthEnableRequest(), timeout=10)


class Admin:
    """Raw etcd calls as root through aetcd's stubs, independent of the store."""

    def __init__(self, endpoint: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.channel = (
            grpc.aio.secure_channel(endpoint, credentials)
            if credentials is not None
            else grpc.aio.insecure_channel(endpoint)
        )
        self.kv: Any = rpc.KVStub(self.channel)
        self.auth: Any = rpc.AuthStub(self.channel)
        self.token = ""

    async def login(self) -> str:
        response = await self.auth.Authenticate(
            rpc.AuthenticateRequest(name="root", password=ROOT_PASSWORD), timeout=10
        )
        self.token = str(response.token)
        return self.token

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("token", self.token),) if self.token else None

    async def get(self, key: str) -> dict[str, Any] | None:
        response = await self.kv.Range(
            rpc.RangeRequest(key=key.encode()), timeout=10, metadata=self.metadata
        )
        return json.loads(response.kvs[0].value) if response.kvs else None

    async def put(self, key: str, value: bytes) -> int:
        response = await self.kv.Put(
            rpc.PutRequest(key=key.encode(), value=value), timeout=10, metadata=self.metadata
        )
        return int(response.header.revision)

    async def count(self, prefix: str) -> int:
        start = prefix.encode()
        end = start[:-1] + bytes([start[-1] + 1])
        response = await self.kv.Range(
            rpc.RangeRequest(key=start, range_end=end, count_only=True),
            timeout=10,
            metadata=self.metadata,
        )
        return int(response.count)

    async def invalidate_tokens(self) -> None:
        """Disable and enable auth: etcd drops every simple token it issued."""
        await self.auth.AuthDisable(rpc.AuthDisableRequest(), timeout=10, metadata=self.metadata)
        await self.auth.AuthEnable(rpc.AuthEnableRequest(), timeout=10)
        self.token = ""

    async def close(self) -> None:
        await self.channel.close(None)


def _store(
    endpoint: str, security: EtcdSecurity, registry: CollectorRegistry | None = None
) -> Store:
    prefix = f"/cp-test/{uuid.uuid4().hex}/"
    return Store(
        [endpoint],
        prefix,
        etcd_timeout=3.0,
        metrics=ServerMetrics(registry or CollectorRegistry()),
        security=security,
    )


async def _next_change(stream: AsyncIterator[tuple[int, list[WatchEvent]]]) -> list[WatchEvent]:
    """The next revision with events (progress notifications skipped), within 10 s."""
    async with asyncio.timeout(10):
        while True:
            _revision, events = await anext(stream)
            if events:
                return events


def _authentications(registry: CollectorRegistry) -> float:
    value = registry.get_sample_value(
        "controlplane_etcd_operation_duration_seconds_count",
        {"operation": "authenticate", "outcome": "ok"},
    )
    return value or 0.0


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("etcd-certs")
    ca = TestCA(directory / "ca")
    other = TestCA(directory / "other", name="another CA")
    return Certs(
        ca=ca,
        server=ca.server_cert("etcd-server"),
        client=ca.issue("controlplane", common_name="controlplane"),
        other_ca=other,
        intruder=other.issue("intruder"),
    )


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[EmbeddedEtcd]:
    """etcd that speaks only TLS and wants a client certificate from the test CA."""
    server = EmbeddedEtcd(
        tmp_path_factory.mktemp("etcd-tls") / "data",
        name="cp-tls",
        cert_file=certs.server.cert,
        key_file=certs.server.key,
        trusted_ca_file=certs.ca.cert,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedEtcd]:
    """Plaintext etcd with auth enabled: root (role root) and a user without a role."""
    server = EmbeddedEtcd(
        tmp_path_factory.mktemp("etcd-auth") / "data",
        name="cp-auth",
        # The lowest bcrypt cost keeps each Authenticate fast; nothing else changes.
        extra_args=["--bcrypt-cost", "4"],
    )
    server.start()
    with grpc.insecure_channel(server.endpoint) as channel:
        _set_up_users(channel)
    yield server
    server.stop()


@pytest.fixture
async def admin(auth_etcd: EmbeddedEtcd) -> AsyncIterator[Admin]:
    client = Admin(auth_etcd.endpoint)
    await client.login()
    yield client
    await client.close()


# ---------------------------------------------------------------- TLS


async def test_store_over_tls_with_a_client_certificate_writes_reads_and_watches(
    tls_etcd: EmbeddedEtcd, certs: Certs
) -> None:
    security = EtcdSecurity(ca=certs.ca.cert, cert=certs.client.cert, key=certs.client.key)
    store = _store(f"https://{tls_etcd.endpoint}", security)
    admin = Admin(tls_etcd.endpoint, _credentials(certs))
    plain = grpc.aio.insecure_channel(tls_etcd.endpoint)
    await store.connect()
    try:
        await store.set_flag("global", "kill-tls", True, OPTS)
        stored = await store.get_flag("global", "kill-tls")
        assert stored is not None
        assert stored.record.value is True
        raw = await admin.get(store.prefix + "flags/global/kill-tls")
        assert raw is not None
        assert raw["value"] is True

        async with contextlib.aclosing(store.watch(await store.revision() + 1)) as stream:
            await admin.put(store.prefix + "shedding/checkout", b"{}")
            events = await _next_change(stream)
        assert [e.path for e in events] == ["shedding/checkout"]

        # The same etcd refuses plaintext: the store really went over TLS.
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await rpc.KVStub(plain).Range(rpc.RangeRequest(key=b"x"), timeout=3)
        assert excinfo.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await store.close()
        await admin.close()
        await plain.close(None)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no client certificate", "TSI_"),
        ("client certificate from another CA", "TSI_"),
        ("server checked against another CA", "CERTIFICATE_VERIFY_FAILED"),
        ("wrong server name", "Hostname Verification"),
    ],
)
async def test_tls_misconfiguration_fails_fast_with_a_clear_error(
    tls_etcd: EmbeddedEtcd, certs: Certs, case: str, expected: str
) -> None:
    security = {
        "no client certificate": EtcdSecurity(ca=certs.ca.cert),
        "client certificate from another CA": EtcdSecurity(
            ca=certs.ca.cert, cert=certs.intruder.cert, key=certs.intruder.key
        ),
        "server checked against another CA": EtcdSecurity(
            ca=certs.other_ca.cert, cert=certs.client.cert, key=certs.client.key
        ),
        "wrong server name": EtcdSecurity(
            ca=certs.ca.cert,
            cert=certs.client.cert,
            key=certs.client.key,
            server_name="etcd.example.org",
        ),
    }[case]
    store = _store(tls_etcd.endpoint, security)
    await store.connect()
    try:
        start = time.monotonic()
        with pytest.raises(UnavailableError) as excinfo:
            await store.set_flag("global", "kill-x", True, OPTS)
        elapsed = time.monotonic() - start
    finally:
        await store.close()
    message = str(excinfo.value)
    assert message.startswith(f"etcd is unreachable at {tls_etcd.endpoint}")
    assert expected in message
    assert "TLS to etcd failed" in message
    assert elapsed < store.etcd_timeout


async def test_server_name_overrides_the_name_checked_in_the_certificate(
    tls_etcd: EmbeddedEtcd, certs: Certs
) -> None:
    # The server certificate names 127.0.0.1 and localhost; reach it as "localhost" over
    # an IP endpoint (the wrong-name case above shows the name is checked).
    security = EtcdSecurity(
        ca=certs.ca.cert, cert=certs.client.cert, key=certs.client.key, server_name="localhost"
    )
    store = _store(tls_etcd.endpoint, security)
    await store.connect()
    try:
        assert await store.ping() > 0
    finally:
        await store.close()


# ---------------------------------------------------------------- etcd users


async def test_store_with_user_and_password_writes_reads_and_watches(
    auth_etcd: EmbeddedEtcd, admin: Admin
) -> None:
    store = _store(auth_etcd.endpoint, EtcdSecurity(user="root", password=ROOT_PASSWORD))
    await store.connect()
    try:
        await store.set_flag("global", "kill-auth", "degraded", OPTS)
        stored = await store.get_flag("global", "kill-auth")
        assert stored is not None
        assert stored.record.value == "degraded"
        raw = await admin.get(store.prefix + "flags/global/kill-auth")
        assert raw is not None
        assert raw["value"] == "degraded"

        async with contextlib.aclosing(store.watch(await store.revision() + 1)) as stream:
            await admin.put(store.prefix + "pins/checkout", b"{}")
            events = await _next_change(stream)
        assert [e.path for e in events] == ["pins/checkout"]
    finally:
        await store.close()
    # Without a token this etcd answers nothing: the store sent one with every call.
    anonymous = Admin(auth_etcd.endpoint)
    try:
        with pytest.raises(grpc.aio.AioRpcError, match="user name is empty"):
            await anonymous.get(store.prefix + "flags/global/kill-auth")
    finally:
        await anonymous.close()


async def test_a_wrong_password_is_a_clear_error_naming_the_user(
    auth_etcd: EmbeddedEtcd,
) -> None:
    store = _store(auth_etcd.endpoint, EtcdSecurity(user="root", password=WRONG_PASSWORD))
    await store.connect()
    try:
        with pytest.raises(EtcdAccessError) as write_error:
            await store.set_flag("global", "kill-x", True, OPTS)
        with pytest.raises(EtcdAccessError) as watch_error:
            async with contextlib.aclosing(store.watch(1)) as stream:
                await anext(stream)
    finally:
        await store.close()
    for error in (write_error.value, watch_error.value):
        assert str(error).startswith("etcd refused user 'root': authentication failed")
        assert error.code is grpc.StatusCode.UNAVAILABLE
        assert WRONG_PASSWORD not in str(error)


async def test_a_user_without_permission_is_a_clear_error_naming_the_user(
    auth_etcd: EmbeddedEtcd,
) -> None:
    security = EtcdSecurity(user=LIMITED_USER, password=LIMITED_PASSWORD)
    registry = CollectorRegistry()
    store = _store(auth_etcd.endpoint, security, registry)
    await store.connect()
    try:
        with pytest.raises(EtcdAccessError) as read_error:
            await store.get_flag("global", "kill-x")
        assert _authentications(registry) == 1
        with pytest.raises(EtcdAccessError) as watch_error:
            async with contextlib.aclosing(store.watch(1)) as stream:
                await anext(stream)
        # A watch refused as "permission denied" may be a dead token (etcd 3.5 says so for
        # one): renewed once, and only the second refusal is the user's permissions.
        assert _authentications(registry) == 2
    finally:
        await store.close()
    assert str(read_error.value).startswith(f"etcd refused user '{LIMITED_USER}' range access")
    assert str(watch_error.value).startswith(f"etcd refused user '{LIMITED_USER}' watch access")
    assert "permission denied" in str(read_error.value)


async def test_an_invalidated_token_is_renewed_transparently(
    auth_etcd: EmbeddedEtcd, admin: Admin
) -> None:
    registry = CollectorRegistry()
    store = _store(auth_etcd.endpoint, EtcdSecurity(user="root", password=ROOT_PASSWORD), registry)
    await store.connect()
    try:
        await store.set_flag("global", "kill-renew", True, OPTS)
        assert _authentications(registry) == 1
        old_admin_token = admin.token

        await admin.invalidate_tokens()
        # Tokens issued before are dead now (the store's was issued the same way).
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await admin.kv.Range(
                rpc.RangeRequest(key=b"x"), timeout=10, metadata=(("token", old_admin_token),)
            )
        assert excinfo.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert excinfo.value.details() == "etcdserver: invalid auth token"
        await admin.login()

        with structlog.testing.capture_logs() as logs:
            # A write: rejected over its token before being applied, then retried once.
            await store.set_flag("global", "kill-renew", False, OPTS)
        assert _authentications(registry) == 2
        assert [entry["event"] for entry in logs].count("etcd_token_renewed") == 1
        raw = await admin.get(store.prefix + "flags/global/kill-renew")
        assert raw is not None
        assert raw["value"] is False
        assert await admin.count(store.prefix + "audit/") == 2  # each write applied once

        # A new watch (as the hub opens after a break) with a dead token renews it too.
        await admin.invalidate_tokens()
        await admin.login()
        revision = await admin.put(store.prefix + "pins/a", b"{}")
        async with contextlib.aclosing(store.watch(revision)) as stream:
            events = await _next_change(stream)
        assert [e.path for e in events] == ["pins/a"]
        assert _authentications(registry) == 3
    finally:
        await store.close()


async def test_leases_and_the_status_call_renew_an_invalidated_token(
    auth_etcd: EmbeddedEtcd, admin: Admin
) -> None:
    registry = CollectorRegistry()
    store = _store(auth_etcd.endpoint, EtcdSecurity(user="root", password=ROOT_PASSWORD), registry)
    await store.connect()
    try:
        lease = await store.grant_lease(60)
        assert _authentications(registry) == 1

        # Each kind of call meets a dead token: renewed once, then it goes through.
        await admin.invalidate_tokens()
        await admin.login()
        assert await store.keep_lease_alive(lease) > 0  # a stream of its own
        # etcd 3.4.23 and 3.5.1 do not check a keep-alive's token; a release that does
        # makes the store renew it once.
        renewed = _authentications(registry)
        assert renewed in (1, 2)

        await admin.invalidate_tokens()
        await admin.login()
        second = await store.grant_lease(60)
        assert second != lease
        assert _authentications(registry) == renewed + 1

        await admin.invalidate_tokens()
        await admin.login()
        [(endpoint, version)] = await store.etcd_versions()
        assert endpoint == auth_etcd.endpoint
        assert auth_etcd.binary is not None
        assert version == "{}.{}.{}".format(*etcd_version(auth_etcd.binary))
        # Neither release checks the status call's token either: at most one renewal.
        assert _authentications(registry) - (renewed + 1) in (0, 1)
    finally:
        await store.close()


async def test_auth_turned_off_and_on_under_a_running_store(
    auth_etcd: EmbeddedEtcd, admin: Admin
) -> None:
    registry = CollectorRegistry()
    store = _store(auth_etcd.endpoint, EtcdSecurity(user="root", password=ROOT_PASSWORD), registry)
    await store.connect()
    try:
        await store.set_flag("global", "kill-toggle", 1.0, OPTS)
        await admin.auth.AuthDisable(rpc.AuthDisableRequest(), timeout=10, metadata=admin.metadata)
        admin.token = ""
        with structlog.testing.capture_logs() as logs:
            # Its token is refused; etcd says auth is off: the store goes on without one.
            await store.set_flag("global", "kill-toggle", 2.0, OPTS)
        assert "etcd_auth_not_enabled" in [entry["event"] for entry in logs]
        await admin.auth.AuthEnable(rpc.AuthEnableRequest(), timeout=10)
        await admin.login()
        # No token now ("user name is empty"): it authenticates again.
        await store.set_flag("global", "kill-toggle", 3.0, OPTS)
        assert _authentications(registry) == 3  # first token, "not enabled", new token
        raw = await admin.get(store.prefix + "flags/global/kill-toggle")
        assert raw is not None
        assert raw["value"] == 3
        assert await admin.count(store.prefix + "audit/") == 3
    finally:
        await store.close()
        # Leave auth on for the other tests, whatever failed above.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await admin.auth.AuthEnable(rpc.AuthEnableRequest(), timeout=10)


async def test_a_user_on_an_etcd_without_auth_goes_on_without_a_token(
    etcd: EmbeddedEtcd, prefix: str
) -> None:
    store = Store(
        [etcd.endpoint],
        prefix,
        metrics=ServerMetrics(CollectorRegistry()),
        security=EtcdSecurity(user="root", password=ROOT_PASSWORD),
    )
    await store.connect()
    try:
        with structlog.testing.capture_logs() as logs:
            await store.set_flag("global", "kill-noauth", True, OPTS)
            stored = await store.get_flag("global", "kill-noauth")
    finally:
        await store.close()
    assert stored is not None
    assert stored.record.value is True
    warnings = [entry for entry in logs if entry["event"] == "etcd_auth_not_enabled"]
    assert len(warnings) == 1
    assert warnings[0]["user"] == "root"


async def test_passwords_and_tokens_never_reach_logs_errors_or_metrics(
    auth_etcd: EmbeddedEtcd, admin: Admin
) -> None:
    registries = [CollectorRegistry(), CollectorRegistry()]
    security = EtcdSecurity(user="root", password=ROOT_PASSWORD)
    good = _store(auth_etcd.endpoint, security, registries[0])
    bad = _store(
        auth_etcd.endpoint, EtcdSecurity(user="root", password=WRONG_PASSWORD), registries[1]
    )
    errors: list[str] = []
    with structlog.testing.capture_logs() as logs:
        await good.connect()
        await bad.connect()
        try:
            await good.set_flag("global", "kill-log", True, OPTS)
            await admin.invalidate_tokens()
            await admin.login()
            await good.set_flag("global", "kill-log", False, OPTS)  # renews its token
            try:
                await bad.ping()
            except EtcdAccessError as exc:
                errors.append(str(exc))
                errors.append(repr(exc))
        finally:
            await good.close()
            await bad.close()
    events = [entry["event"] for entry in logs]
    # The scenario did log about security: the check below looked at something.
    assert "etcd_security" in events
    assert "etcd_token_renewed" in events
    assert len(errors) == 2
    texts = [
        *(repr(entry) for entry in logs),
        *errors,
        repr(good.security),
        repr(bad.security),
        *(generate_latest(registry).decode() for registry in registries),
    ]
    for text in texts:
        assert ROOT_PASSWORD not in text
        assert WRONG_PASSWORD not in text
        assert not TOKEN_RE.search(text), text
    assert any("'root'" in text for text in errors)


async def test_tls_and_user_together(tmp_path: Path, certs: Certs) -> None:
    etcd = EmbeddedEtcd(
        tmp_path / "data",
        name="cp-tls-auth",
        cert_file=certs.server.cert,
        key_file=certs.server.key,
        extra_args=["--bcrypt-cost", "4"],
    )
    etcd.start()
    try:
        server_only = grpc.ssl_channel_credentials(_read(certs.ca.cert))
        with grpc.secure_channel(etcd.endpoint, server_only) as channel:
            _set_up_users(channel)
        store = _store(
            etcd.endpoint, EtcdSecurity(ca=certs.ca.cert, user="root", password=ROOT_PASSWORD)
        )
        admin = Admin(etcd.endpoint, server_only)
        await admin.login()
        await store.connect()
        try:
            await store.set_flag("global", "kill-both", True, OPTS)
            raw = await admin.get(store.prefix + "flags/global/kill-both")
            assert raw is not None
            assert raw["value"] is True
        finally:
            await store.close()
            await admin.close()
    finally:
        etcd.stop()


def test_serve_reaches_etcd_over_mutual_tls_as_an_etcd_user(tmp_path: Path, certs: Certs) -> None:
    """The command line end to end: etcd with --client-cert-auth and auth on."""
    from controlplane.api.v1 import mitigation_pb2 as m
    from controlplane.api.v1 import mitigation_pb2_grpc
    from controlplane.api.v1 import types_pb2 as t
    from tests.helpers.server_process import ServerProcess

    etcd = EmbeddedEtcd(
        tmp_path / "data",
        name="cp-serve-tls",
        cert_file=certs.server.cert,
        key_file=certs.server.key,
        trusted_ca_file=certs.ca.cert,
        extra_args=["--bcrypt-cost", "4"],
    )
    etcd.start()
    try:
        with grpc.secure_channel(etcd.endpoint, _credentials(certs)) as channel:
            _set_up_users(channel)
        password_file = tmp_path / "etcd-password"
        password_file.write_text(ROOT_PASSWORD + "\n")
        server = ServerProcess(
            f"https://{etcd.endpoint}",
            "/cp-serve-tls/",
            extra_args=[
                "--etcd-ca", str(certs.ca.cert),
                "--etcd-cert", str(certs.client.cert),
                "--etcd-key", str(certs.client.key),
                "--etcd-user", "root",
                "--etcd-password-file", str(password_file),
            ],
        )  # fmt: skip
        try:
            with grpc.insecure_channel(server.address) as channel:
                stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
                written = stub.SetFlag(
                    m.SetFlagRequest(
                        scope="checkout",
                        name="kill-over-tls",
                        value=t.FlagValue(bool_value=True),
                        options=t.WriteOptions(reason="etcd over mutual TLS"),
                    ),
                    timeout=10,
                    wait_for_ready=True,
                )
                assert written.result.changed
                read = stub.GetFlag(
                    m.GetFlagRequest(scope="checkout", name="kill-over-tls"), timeout=10
                )
                assert read.flag.value.bool_value is True
        finally:
            server.stop()
        logs = "".join(server.output)
        assert '"etcd_security"' in logs
        assert ROOT_PASSWORD not in logs
    finally:
        etcd.stop()
