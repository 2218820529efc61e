"""Authentication and authorization on a real server: every RPC x every role.

The auth file is written by the test; the server runs on the test's loop (port 0) on the
session etcd. Every write in the matrix is a dry run, so the state seeded once stays as
it is whatever the order of the cases.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from prometheus_client import CollectorRegistry

from controlplane.api.v1 import agent_pb2, agent_pb2_grpc, mitigation_pb2_grpc
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server import ControlServer
from controlplane.server.auth import METHOD_RULES, hash_token
from tests.integration.conftest import server_config

TOKENS = {
    "viewer": "viewer-token-0123456789",
    "agent": "agent-token-0123456789",
    "operator": "operator-token-0123456789",
    "admin": "admin-token-0123456789",
}
WRONG_TOKEN = "not-a-known-token-0123456789"


def auth_document(**extra: dict[str, Any]) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [
        {"name": "ro-dashboard", "role": "viewer", "token_sha256": hash_token(TOKENS["viewer"])},
        {
            "name": "checkout-agents",
            "role": "agent",
            "services": ["checkout"],
            "token_sha256": hash_token(TOKENS["agent"]),
        },
        {"name": "oncall", "role": "operator", "token_sha256": hash_token(TOKENS["operator"])},
        {"name": "deploy", "role": "admin", "token_sha256": hash_token(TOKENS["admin"])},
    ]
    for name, entry in extra.items():
        entries.append({"name": name, **entry})
    return {"identities": entries}


def write_auth(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document))
    return path


def md(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


def opts(reason: str = "auth test", **kw: Any) -> t.WriteOptions:
    return t.WriteOptions(reason=reason, actor="someone-else", **kw)


def dry() -> t.WriteOptions:
    return opts(dry_run=True)


@pytest.fixture
async def auth_server(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> AsyncIterator[ControlServer]:
    path = write_auth(tmp_path / "auth.json", auth_document())
    srv = ControlServer(
        server_config(etcd.endpoint, prefix, auth_file=path), registry=CollectorRegistry()
    )
    await srv.start()
    yield srv
    await srv.stop(grace=0)


@pytest.fixture
async def auth_stub(
    auth_server: ControlServer,
) -> AsyncIterator[mitigation_pb2_grpc.MitigationServiceStub]:
    async with grpc.aio.insecure_channel(auth_server.address) as channel:
        yield mitigation_pb2_grpc.MitigationServiceStub(channel)


@dataclass
class Seeded:
    bundle_id: str
    revision: int


async def seed(stub: Any) -> Seeded:
    """State every read in the matrix finds (written with the admin token)."""
    admin = md(TOKENS["admin"])
    await stub.SetFlag(
        m.SetFlagRequest(
            scope="checkout", name="kill-x", value=t.FlagValue(bool_value=True), options=opts()
        ),
        metadata=admin,
    )
    await stub.SetShedding(
        m.SetSheddingRequest(service="checkout", tier=t.SHEDDABLE, percent=10, options=opts()),
        metadata=admin,
    )
    for version in ("v1", "v2"):
        await stub.MarkKnownGood(
            m.MarkKnownGoodRequest(service="checkout", version=version, options=opts()),
            metadata=admin,
        )
    pinned = await stub.PinVersion(
        m.PinVersionRequest(service="checkout", version="v2", options=opts(incident="INC-7")),
        metadata=admin,
    )
    bundle = await stub.ApplyBundle(
        m.ApplyBundleRequest(
            name="seed",
            changes=[
                m.BundleChange(
                    set_flag=m.SetFlagRequest(
                        scope="search", name="kill-y", value=t.FlagValue(bool_value=True)
                    )
                )
            ],
            options=opts(),
        ),
        metadata=admin,
    )
    # A trigger, fired once for the group "seeded": firing that group again writes nothing.
    await stub.SetTrigger(
        m.SetTriggerRequest(
            trigger=m.Trigger(
                name="seeded",
                matchers=[m.LabelMatcher(label="alertname", value="Seeded")],
                bundle_name="seeded",
                changes=[
                    m.BundleChange(
                        set_flag=m.SetFlagRequest(
                            scope="search", name="kill-z", value=t.FlagValue(bool_value=True)
                        )
                    )
                ],
            ),
            options=opts(),
        ),
        metadata=admin,
    )
    await stub.FireTrigger(m.FireTriggerRequest(name="seeded", group_key="seeded"), metadata=admin)
    return Seeded(bundle.bundle.id, pinned.result.revision)


def calls(seeded: Seeded) -> dict[str, Callable[[Any, Any], Any]]:
    """One valid request per MitigationService RPC; writes are dry runs."""
    flag = t.FlagValue(bool_value=False)
    return {
        "SetFlag": lambda s, k: s.SetFlag(
            m.SetFlagRequest(scope="checkout", name="kill-x", value=flag, options=dry()), **k
        ),
        "GetFlag": lambda s, k: s.GetFlag(m.GetFlagRequest(scope="checkout", name="kill-x"), **k),
        "ListFlags": lambda s, k: s.ListFlags(m.ListFlagsRequest(), **k),
        "ClearFlag": lambda s, k: s.ClearFlag(
            m.ClearFlagRequest(scope="checkout", name="kill-x", options=dry()), **k
        ),
        "SetShedding": lambda s, k: s.SetShedding(
            m.SetSheddingRequest(service="checkout", tier=t.SHEDDABLE, percent=50, options=dry()),
            **k,
        ),
        "GetShedding": lambda s, k: s.GetShedding(m.GetSheddingRequest(service="checkout"), **k),
        "ListShedding": lambda s, k: s.ListShedding(m.ListSheddingRequest(), **k),
        "ClearShedding": lambda s, k: s.ClearShedding(
            m.ClearSheddingRequest(service="checkout", options=dry()), **k
        ),
        "PinVersion": lambda s, k: s.PinVersion(
            m.PinVersionRequest(service="checkout", version="v1", options=dry()), **k
        ),
        "GetPin": lambda s, k: s.GetPin(m.GetPinRequest(service="checkout"), **k),
        "ListPins": lambda s, k: s.ListPins(m.ListPinsRequest(), **k),
        "UnpinVersion": lambda s, k: s.UnpinVersion(
            m.UnpinVersionRequest(service="checkout", options=dry()), **k
        ),
        "MarkKnownGood": lambda s, k: s.MarkKnownGood(
            m.MarkKnownGoodRequest(service="checkout", version="v3", options=dry()), **k
        ),
        "UnmarkKnownGood": lambda s, k: s.UnmarkKnownGood(
            m.UnmarkKnownGoodRequest(service="checkout", version="v1", options=dry()), **k
        ),
        "ListKnownGood": lambda s, k: s.ListKnownGood(
            m.ListKnownGoodRequest(service="checkout"), **k
        ),
        "Rollback": lambda s, k: s.Rollback(
            m.RollbackRequest(service="checkout", current_version="v2", options=dry()), **k
        ),
        "ApplyBundle": lambda s, k: s.ApplyBundle(
            m.ApplyBundleRequest(
                name="dry",
                changes=[
                    m.BundleChange(
                        set_shedding=m.SetSheddingRequest(
                            service="checkout", tier=t.SHEDDABLE, percent=90
                        )
                    )
                ],
                options=dry(),
            ),
            **k,
        ),
        "RevertBundle": lambda s, k: s.RevertBundle(
            m.RevertBundleRequest(bundle_id=seeded.bundle_id, options=dry()), **k
        ),
        "ListBundles": lambda s, k: s.ListBundles(m.ListBundlesRequest(), **k),
        "GetBundle": lambda s, k: s.GetBundle(m.GetBundleRequest(bundle_id=seeded.bundle_id), **k),
        "GetStatus": lambda s, k: s.GetStatus(m.GetStatusRequest(service="checkout"), **k),
        "ListServices": lambda s, k: s.ListServices(m.ListServicesRequest(), **k),
        "ListHistory": lambda s, k: s.ListHistory(m.ListHistoryRequest(service="checkout"), **k),
        "WatchChanges": _first_watch_response,
        "WaitApplied": lambda s, k: s.WaitApplied(
            m.WaitAppliedRequest(
                service="checkout",
                revision=seeded.revision,
                timeout=duration_pb2.Duration(seconds=2),
            ),
            **k,
        ),
        "GetTimeline": lambda s, k: s.GetTimeline(m.GetTimelineRequest(incident="INC-7"), **k),
        "ListNotifications": lambda s, k: s.ListNotifications(m.ListNotificationsRequest(), **k),
        "SetTrigger": lambda s, k: s.SetTrigger(
            m.SetTriggerRequest(
                trigger=m.Trigger(
                    name="dry",
                    matchers=[m.LabelMatcher(label="alertname", value="X")],
                    bundle_name="dry",
                    changes=[
                        m.BundleChange(
                            set_shedding=m.SetSheddingRequest(
                                service="checkout", tier=t.SHEDDABLE, percent=90
                            )
                        )
                    ],
                ),
                options=dry(),
            ),
            **k,
        ),
        "GetTrigger": lambda s, k: s.GetTrigger(m.GetTriggerRequest(name="seeded"), **k),
        "ListTriggers": lambda s, k: s.ListTriggers(m.ListTriggersRequest(), **k),
        "DeleteTrigger": lambda s, k: s.DeleteTrigger(
            m.DeleteTriggerRequest(name="seeded", options=dry()), **k
        ),
        "SetTriggerEnabled": lambda s, k: s.SetTriggerEnabled(
            m.SetTriggerEnabledRequest(name="seeded", enabled=False, options=dry()), **k
        ),
        # The group fired already: nothing new is applied (nor written).
        "FireTrigger": lambda s, k: s.FireTrigger(
            m.FireTriggerRequest(name="seeded", group_key="seeded"), **k
        ),
        # A group that never fired: nothing to revert (nor to write).
        "ResolveTrigger": lambda s, k: s.ResolveTrigger(
            m.ResolveTriggerRequest(name="seeded", group_key="never"), **k
        ),
    }


async def _first_watch_response(stub: Any, kwargs: Any) -> Any:
    call = stub.WatchChanges(m.WatchChangesRequest(service="checkout"), **kwargs)
    try:
        return await call.read()
    finally:
        call.cancel()


READ = {"viewer", "operator", "admin"}
WRITE = {"operator", "admin"}
ADMIN = {"admin"}
FIRE = {"operator", "admin", "trigger"}  # the trigger role is tested in test_triggers.py
ALLOWED: dict[str, set[str]] = {
    **{
        name: READ
        for name in [
            "GetFlag",
            "ListFlags",
            "GetShedding",
            "ListShedding",
            "GetPin",
            "ListPins",
            "ListKnownGood",
            "ListBundles",
            "GetBundle",
            "GetStatus",
            "ListServices",
            "ListHistory",
            "WatchChanges",
            "WaitApplied",
            "GetTimeline",
            "ListNotifications",
            "GetTrigger",
            "ListTriggers",
        ]
    },
    **{
        name: WRITE
        for name in [
            "SetFlag",
            "ClearFlag",
            "SetShedding",
            "ClearShedding",
            "PinVersion",
            "UnpinVersion",
            "Rollback",
            "ApplyBundle",
            "RevertBundle",
            "SetTrigger",
            "DeleteTrigger",
            "SetTriggerEnabled",
        ]
    },
    "FireTrigger": FIRE,
    "ResolveTrigger": FIRE,
    "MarkKnownGood": ADMIN,
    "UnmarkKnownGood": ADMIN,
}
CALLERS = ["none", "wrong", "viewer", "agent", "operator", "admin"]
# How the server words the roles an RPC needs ("...: it needs the <roles> role").
ROLES_NEEDED = {
    frozenset(ADMIN): "admin",
    frozenset(WRITE): "operator or admin",
    frozenset(READ): "viewer, operator or admin",
    frozenset(FIRE): "operator, admin or trigger",
}


def expected_code(rpc: str, caller: str) -> grpc.StatusCode:
    if caller in ("none", "wrong"):
        return grpc.StatusCode.UNAUTHENTICATED
    return grpc.StatusCode.OK if caller in ALLOWED[rpc] else grpc.StatusCode.PERMISSION_DENIED


def test_the_table_covers_every_rpc_of_the_service() -> None:
    service = m.DESCRIPTOR.services_by_name["MitigationService"]
    names = {method.name for method in service.methods}
    assert names == set(ALLOWED) == set(calls(Seeded("b", 1)))
    # And the server's own rules classify each of them (none is left to the default).
    for name in names:
        assert f"/{service.full_name}/{name}" in METHOD_RULES


async def test_every_rpc_for_every_caller_gets_the_exact_code(
    auth_server: ControlServer, auth_stub: Any
) -> None:
    seeded = await seed(auth_stub)
    revision_before = (
        await auth_stub.ListFlags(m.ListFlagsRequest(), metadata=md(TOKENS["admin"]))
    ).revision
    table = calls(seeded)
    failures: list[str] = []
    checked = 0
    for rpc, call in table.items():
        for caller in CALLERS:
            token = {"none": None, "wrong": WRONG_TOKEN}.get(caller, TOKENS.get(caller))
            want = expected_code(rpc, caller)
            try:
                await call(auth_stub, {"metadata": md(token), "timeout": 10})
                got = grpc.StatusCode.OK
                details = ""
            except grpc.aio.AioRpcError as exc:
                got, details = exc.code(), exc.details() or ""
            checked += 1
            if got != want:
                failures.append(f"{rpc} as {caller}: {got.name} ({details}), want {want.name}")
                continue
            if got == grpc.StatusCode.PERMISSION_DENIED:
                # The message says which role is needed, and never echoes a token.
                roles = ROLES_NEEDED[frozenset(ALLOWED[rpc])]
                assert details.endswith(f"needs the {roles} role"), (rpc, caller, details)
            for secret in (*TOKENS.values(), WRONG_TOKEN):
                assert secret not in details
    assert not failures, "\n".join(failures)
    assert checked == len(table) * len(CALLERS)
    # The dry runs wrote nothing.
    after = await auth_stub.ListFlags(m.ListFlagsRequest(), metadata=md(TOKENS["admin"]))
    assert after.revision == revision_before
    refused = auth_server.metrics.auth_refused
    assert refused.labels("SetFlag", "UNAUTHENTICATED")._value.get() == 2
    assert refused.labels("SetFlag", "PERMISSION_DENIED")._value.get() == 2


async def sync_first(address: str, service: str, token: str | None) -> agent_pb2.SyncResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Sync(metadata=md(token))
        await call.write(
            agent_pb2.SyncRequest(hello=agent_pb2.Hello(service=service, instance_id="i-1"))
        )
        try:
            response: agent_pb2.SyncResponse = await call.read()
            return response
        finally:
            call.cancel()


@pytest.mark.parametrize(
    ("caller", "service", "want"),
    [
        ("agent", "checkout", grpc.StatusCode.OK),
        ("agent", "payments", grpc.StatusCode.PERMISSION_DENIED),
        ("viewer", "checkout", grpc.StatusCode.PERMISSION_DENIED),
        ("operator", "checkout", grpc.StatusCode.PERMISSION_DENIED),
        ("admin", "checkout", grpc.StatusCode.PERMISSION_DENIED),
        ("wrong", "checkout", grpc.StatusCode.UNAUTHENTICATED),
        ("none", "checkout", grpc.StatusCode.UNAUTHENTICATED),
    ],
)
async def test_sync_needs_an_agent_token_for_that_service(
    auth_server: ControlServer, caller: str, service: str, want: grpc.StatusCode
) -> None:
    token = {"none": None, "wrong": WRONG_TOKEN}.get(caller, TOKENS.get(caller))
    try:
        response = await sync_first(auth_server.address, service, token)
        got, details = grpc.StatusCode.OK, ""
        assert response.WhichOneof("message") == "snapshot"
    except grpc.aio.AioRpcError as exc:
        got, details = exc.code(), exc.details() or ""
    assert got == want, details
    if caller == "agent" and service == "payments":
        assert details == "checkout-agents may sync checkout, not payments"


async def test_the_audit_names_the_authenticated_identity_not_the_claimed_actor(
    auth_server: ControlServer, auth_stub: Any
) -> None:
    await auth_stub.SetFlag(
        m.SetFlagRequest(
            scope="checkout", name="kill-z", value=t.FlagValue(bool_value=True), options=opts()
        ),
        metadata=md(TOKENS["operator"]),
    )
    history = await auth_stub.ListHistory(
        m.ListHistoryRequest(service="checkout"), metadata=md(TOKENS["viewer"])
    )
    entry = next(e for e in history.entries if e.name == "kill-z")
    assert entry.actor == "oncall"
    assert entry.actor_authenticated
    flag = await auth_stub.GetFlag(
        m.GetFlagRequest(scope="checkout", name="kill-z"), metadata=md(TOKENS["viewer"])
    )
    assert flag.flag.meta.actor == "oncall"


async def test_health_needs_no_token_and_reflection_needs_one(auth_server: ControlServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(auth_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert checked.status in (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        # Watch too: it reports SERVING once the server has reached etcd.
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        async for update in watch:
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                break
        watch.cancel()
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")

        async def reflect(token: str | None) -> Any:
            call = stub.ServerReflectionInfo(metadata=md(token))
            await call.write(request)
            try:
                return await call.read()
            finally:
                call.cancel()

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await reflect(None)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = await reflect(TOKENS["agent"])
        names = {s.name for s in listed.list_services_response.service}
        assert "controlplane.api.v1.MitigationService" in names


async def test_malformed_authorization_is_unauthenticated(auth_stub: Any) -> None:
    for header in ("Basic abc", "Bearer", "Bearer  ", TOKENS["viewer"]):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await auth_stub.ListPins(m.ListPinsRequest(), metadata=(("authorization", header),))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert TOKENS["viewer"] not in (refused.value.details() or "")


async def test_stream_limit_per_identity(etcd: EmbeddedEtcd, prefix: str, tmp_path: Path) -> None:
    document = auth_document(
        capped={
            "role": "agent",
            "services": ["*"],
            "token_sha256": hash_token("capped-token-0123456789"),
            "max_streams": 2,
        }
    )
    path = write_auth(tmp_path / "auth.json", document)
    srv = ControlServer(
        server_config(etcd.endpoint, prefix, auth_file=path, max_streams_per_identity=1),
        registry=CollectorRegistry(),
    )
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)

            async def open_sync(token: str, instance: str) -> Any:
                call = stub.Sync(metadata=md(token))
                await call.write(
                    agent_pb2.SyncRequest(
                        hello=agent_pb2.Hello(service="checkout", instance_id=instance)
                    )
                )
                await call.read()
                return call

            # The file's max_streams (2) overrides the server's default (1).
            first = await open_sync("capped-token-0123456789", "a")
            second = await open_sync("capped-token-0123456789", "b")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await open_sync("capped-token-0123456789", "c")
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "capped already has 2 open streams" in (refused.value.details() or "")
            # The server's default applies to identities without their own limit.
            own = await open_sync(TOKENS["agent"], "d")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await open_sync(TOKENS["agent"], "e")
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # A stream that ends frees its place.
            first.cancel()
            await _until(lambda: srv.auth is not None and srv.auth.streams.count("capped") == 1)
            third = await open_sync("capped-token-0123456789", "c")
            for call in (second, own, third):
                call.cancel()
    finally:
        await srv.stop(grace=0)


async def _until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll the server's own state (its handler ends after the client's cancel)."""
    async with asyncio.timeout(within):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


async def test_reload_takes_new_tokens_ends_revoked_streams_and_keeps_the_rest(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    path = write_auth(tmp_path / "auth.yaml", auth_document())
    srv = ControlServer(
        server_config(etcd.endpoint, prefix, auth_file=path), registry=CollectorRegistry()
    )
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
            agents = agent_pb2_grpc.AgentServiceStub(channel)
            agent_call = agents.Sync(metadata=md(TOKENS["agent"]))
            await agent_call.write(
                agent_pb2.SyncRequest(hello=agent_pb2.Hello(service="checkout", instance_id="x"))
            )
            await agent_call.read()
            watch = stub.WatchChanges(
                m.WatchChangesRequest(service="checkout"), metadata=md(TOKENS["viewer"])
            )
            await watch.read()  # the live marker

            # A file that does not parse is refused; the one in force stays.
            path.write_text("identities: [unclosed")
            assert not srv.reload()
            await stub.ListPins(m.ListPinsRequest(), metadata=md(TOKENS["viewer"]))
            assert srv.metrics.auth_reloads.labels("failed")._value.get() == 1

            # The viewer's token is revoked, a new operator token added; the agent's stays.
            document = auth_document(
                newcomer={"role": "operator", "token_sha256": hash_token("new-token-0123456789")}
            )
            document["identities"] = [
                e for e in document["identities"] if e["name"] != "ro-dashboard"
            ]
            path.write_text(json.dumps(document))
            assert srv.reload()
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await stub.ListPins(m.ListPinsRequest(), metadata=md(TOKENS["viewer"]))
            assert gone.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await stub.ListPins(m.ListPinsRequest(), metadata=md("new-token-0123456789"))
            # The revoked viewer's watch ends with UNAUTHENTICATED...
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await watch.read()
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "revoked" in (ended.value.details() or "")
            # ...while the agent's stream goes on and still gets changes.
            await stub.SetFlag(
                m.SetFlagRequest(
                    scope="checkout",
                    name="after-reload",
                    value=t.FlagValue(bool_value=True),
                    options=opts(),
                ),
                metadata=md("new-token-0123456789"),
            )
            change = await agent_call.read()
            assert change.WhichOneof("message") == "change"
            agent_call.cancel()
    finally:
        await srv.stop(grace=0)


async def test_oversized_messages_are_refused(etcd: EmbeddedEtcd, prefix: str) -> None:
    srv = ControlServer(
        server_config(etcd.endpoint, prefix, max_message_bytes=64 * 1024),
        registry=CollectorRegistry(),
    )
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.SetFlag(
                    m.SetFlagRequest(
                        scope="checkout",
                        name="big",
                        value=t.FlagValue(string_value="x" * 100_000),
                        options=opts(),
                    )
                )
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await stub.ListPins(m.ListPinsRequest())  # the server goes on
    finally:
        await srv.stop(grace=0)


async def drain(call: Any, within: float) -> None:
    """Read what was sent until the call ends with its status (raised)."""
    async with asyncio.timeout(within):
        while True:
            await call.read()


async def test_a_watch_stalled_on_a_slow_reader_is_still_ended_by_revocation(
    auth_server: ControlServer, auth_stub: Any, tmp_path: Path
) -> None:
    """The server is blocked sending to a client that stopped reading when the client's
    token is revoked: the stream still ends with UNAUTHENTICATED."""
    watch = auth_stub.WatchChanges(
        m.WatchChangesRequest(service="checkout"), metadata=md(TOKENS["viewer"])
    )
    await watch.read()  # live
    # Far more than HTTP/2's windows hold: the server's writes stall.
    big = "x" * 60_000
    for n in range(120):
        await auth_stub.SetFlag(
            m.SetFlagRequest(
                scope="checkout",
                name="big",
                value=t.FlagValue(string_value=f"{n}{big}"),
                options=opts(),
            ),
            metadata=md(TOKENS["operator"]),
        )
    assert auth_server.auth is not None
    assert auth_server.auth.streams.count("ro-dashboard") == 1
    document = auth_document()
    document["identities"] = [e for e in document["identities"] if e["name"] != "ro-dashboard"]
    write_auth(tmp_path / "auth.json", document)  # the file auth_server reads
    assert auth_server.reload()
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await drain(watch, within=10)
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert auth_server.auth.streams.count("ro-dashboard") == 0


async def test_a_break_glass_override_is_audited_as_the_agent_identity(
    auth_server: ControlServer, auth_stub: Any
) -> None:
    async with grpc.aio.insecure_channel(auth_server.address) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Sync(metadata=md(TOKENS["agent"]))
        override = agent_pb2.Override(
            active=True,
            digest="d1",
            content_json='{"flags": {"kill-x": false}}',
            actor="host-admin",
            reason="etcd down, flipping by hand",
        )
        await call.write(
            agent_pb2.SyncRequest(
                hello=agent_pb2.Hello(service="checkout", instance_id="i-9", override=override)
            )
        )
        await call.read()  # the snapshot comes after the override was audited
        call.cancel()
    history = await auth_stub.ListHistory(
        m.ListHistoryRequest(service="checkout"), metadata=md(TOKENS["viewer"])
    )
    [entry] = [e for e in history.entries if e.action == "override.applied"]
    assert (entry.actor, entry.actor_authenticated) == ("checkout-agents", True)
    assert "override file names host-admin" in entry.reason
