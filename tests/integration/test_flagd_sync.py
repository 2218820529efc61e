"""OpenFeature's stock flagd provider (in-process mode, a process of its own) against the
control server's flagd sync service: the values our agents get, flips, a server killed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from agents import AsyncAgent
from controlplane.api.flagd.sync.v1 import sync_pb2, sync_pb2_grpc
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.model import flag_value_to_proto
from controlplane.server import ControlServer
from tests.helpers.cpctl import Run
from tests.helpers.openfeature_clients import WAIT, Client, npm_install
from tests.integration.conftest import server_config
from tests.integration.test_auth import TOKENS, auth_document, md, write_auth
from tests.integration.test_docs_runnable import README, code_blocks


@pytest.fixture(scope="session")
def node_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Node client with its npm packages (OpenFeature's server SDK and flagd provider),
    installed once per session from the registry."""
    return npm_install("flagd_node", tmp_path_factory)


async def start_provider(
    address: str, selector: str, language: str = "python", node: Path | None = None
) -> Client:
    host, port = address.rsplit(":", 1)
    if language == "node":
        assert node is not None
        return await Client.start("node", str(node / "client.mjs"), host, port, selector)
    return await Client.start(
        sys.executable, "-m", "tests.helpers.flagd_client", host, port, selector
    )


@pytest.fixture
async def mitigation(server: ControlServer) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield mitigation_pb2_grpc.MitigationServiceStub(channel)


def write_options() -> t.WriteOptions:
    return t.WriteOptions(reason="test", actor="oncall")


async def set_flag(stub: Any, scope: str, name: str, value: Any) -> int:
    response = await stub.SetFlag(
        m.SetFlagRequest(
            scope=scope, name=name, value=flag_value_to_proto(value), options=write_options()
        )
    )
    return int(response.result.revision)


@pytest.mark.parametrize("language", ["python", "node"])
async def test_a_stock_flagd_provider_reads_what_our_agents_read(
    server: ControlServer,
    mitigation: Any,
    cpctl: Run,
    language: str,
    request: pytest.FixtureRequest,
) -> None:
    node = request.getfixturevalue("node_client") if language == "node" else None
    await set_flag(mitigation, "global", "new-ui", True)
    await set_flag(mitigation, "checkout", "mode", "lite")
    await set_flag(mitigation, "checkout", "rate", 0.25)
    await set_flag(mitigation, "checkout", "limits", {"burst": 5, "tags": ["a"]})
    await set_flag(mitigation, "global", "hidden", False)
    await set_flag(mitigation, "checkout", "hidden", True)  # the service's own wins
    await mitigation.SetShedding(
        m.SetSheddingRequest(
            service="checkout", tier=t.SHEDDABLE, percent=50, options=write_options()
        )
    )
    await mitigation.PinVersion(
        m.PinVersionRequest(service="checkout", version="v1.4.2", options=write_options())
    )
    provider = await start_provider(server.address, "checkout", language, node)
    try:
        await provider.event("INITIALIZED")
        async with AsyncAgent("checkout", [server.address]) as agent:
            assert await agent.wait_ready(WAIT)
            for kind, key, default in (
                ("boolean", "new-ui", False),
                ("string", "mode", "full"),
                ("float", "rate", 1.0),
                ("object", "limits", {}),
                ("boolean", "hidden", False),
            ):
                answer = await provider.resolve(kind, key, default)
                assert answer["value"] == agent.value(key), (key, answer)
                assert (answer["reason"], answer["error_code"]) == ("STATIC", None), answer
        shedding = await provider.resolve("object", "controlplane.shedding", {})
        assert shedding["value"] == {"tier": "SHEDDABLE", "percent": 50}
        pin = await provider.resolve("string", "controlplane.pin", "")
        assert pin["value"] == "v1.4.2"
        # A flag that is not set: the caller's default, FLAG_NOT_FOUND.
        missing = await provider.resolve("boolean", "nope", True)
        assert (missing["value"], missing["error_code"]) == (True, "FLAG_NOT_FOUND")

        # A flip reaches the provider as a configuration change.
        await set_flag(mitigation, "global", "new-ui", False)
        changed = await provider.event("PROVIDER_CONFIGURATION_CHANGED")
        assert "new-ui" in changed["flags"]
        assert (await provider.resolve("boolean", "new-ui", True))["value"] is False

        # Status lists the sync client apart from agents; --wait says it did not count it.
        status = await cpctl("status", "checkout")
        assert "0 of 0 instance(s) connected · 1 OpenFeature sync client(s), no confirmation" in (
            status.stdout
        )
        waited = await cpctl(
            "flag", "set", "checkout", "mode", "full", "--reason", "r", "--wait",
            "--wait-timeout", "1s",
        )  # fmt: skip
        # (The agent above may or may not be gone yet: the line says either way.)
        assert "1 OpenFeature sync client(s) not counted: they confirm nothing" in (
            waited.stdout + waited.stderr
        )
    finally:
        await provider.close()


async def test_the_provider_keeps_the_last_rules_while_the_server_is_down(
    etcd: EmbeddedEtcd, prefix: str
) -> None:
    first = ControlServer(server_config(etcd.endpoint, prefix), registry=CollectorRegistry())
    await first.start()
    address = first.address
    async with grpc.aio.insecure_channel(address) as channel:
        await set_flag(mitigation_pb2_grpc.MitigationServiceStub(channel), "checkout", "k", True)
    provider = await start_provider(address, "service=checkout")
    second: ControlServer | None = None
    try:
        await provider.event("INITIALIZED")
        await first.stop(grace=0)
        # Down: the provider answers from the last configuration it had.
        assert (await provider.resolve("boolean", "k", False))["value"] is True
        second = ControlServer(
            server_config(etcd.endpoint, prefix, listen=address), registry=CollectorRegistry()
        )
        await second.start()
        async with grpc.aio.insecure_channel(address) as channel:
            await set_flag(
                mitigation_pb2_grpc.MitigationServiceStub(channel), "checkout", "k", False
            )
        # Recovered: the new server's configuration, with the flip made while it was away.
        async with asyncio.timeout(WAIT):
            while (await provider.resolve("boolean", "k", True))["value"] is not False:
                await provider.events.get()  # the next event: a reconnection or a change
    finally:
        await provider.close()
        if second is not None:
            await second.stop(grace=0)


async def test_a_service_without_flags_and_bad_selectors(server: ControlServer) -> None:
    provider = await start_provider(server.address, "empty")
    try:
        await provider.event("INITIALIZED")
        answer = await provider.resolve("string", "anything", "default")
        assert (answer["value"], answer["error_code"]) == ("default", "FLAG_NOT_FOUND")
    finally:
        await provider.close()
    async with grpc.aio.insecure_channel(server.address) as channel:
        # The names providers read shedding and the pin under are not for flags.
        with pytest.raises(grpc.aio.AioRpcError) as reserved:
            await set_flag(
                mitigation_pb2_grpc.MitigationServiceStub(channel), "x", "controlplane.pin", "v9"
            )
        assert reserved.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "starts with 'controlplane.', which is reserved" in (reserved.value.details() or "")
        stub = sync_pb2_grpc.FlagSyncServiceStub(channel)
        fetched = await stub.FetchAllFlags(
            sync_pb2.FetchAllFlagsRequest(), metadata=(("flagd-selector", "empty"),)
        )
        document = json.loads(fetched.flag_configuration)
        assert document["flags"] == {} and document["metadata"]["service"] == "empty"
        for selector, text in (
            ("", "name the service whose flags to sync"),
            ("app=checkout", "names no service"),
            ("Not A Service", "is not a service name"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.FetchAllFlags(sync_pb2.FetchAllFlagsRequest(selector=selector))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert text in (refused.value.details() or ""), refused.value.details()


async def test_with_authentication_a_sync_client_is_an_agent_of_its_service(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    path = write_auth(tmp_path / "auth.json", auth_document())
    srv = ControlServer(
        server_config(etcd.endpoint, prefix, auth_file=path), registry=CollectorRegistry()
    )
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = sync_pb2_grpc.FlagSyncServiceStub(channel)

            async def fetch(token: str | None, selector: str) -> Any:
                return await stub.FetchAllFlags(
                    sync_pb2.FetchAllFlagsRequest(),
                    metadata=(*md(token), ("flagd-selector", selector)),
                )

            # checkout's agent token: checkout's flags, on the fetch and on the stream.
            assert json.loads((await fetch(TOKENS["agent"], "checkout")).flag_configuration)
            stream = stub.SyncFlags(
                sync_pb2.SyncFlagsRequest(),
                metadata=(*md(TOKENS["agent"]), ("flagd-selector", "checkout")),
            )
            first = await stream.read()
            assert json.loads(first.flag_configuration)["metadata"]["service"] == "checkout"
            stream.cancel()
            for token, selector, code in (
                (TOKENS["agent"], "payments", grpc.StatusCode.PERMISSION_DENIED),
                (TOKENS["operator"], "checkout", grpc.StatusCode.PERMISSION_DENIED),
                (None, "checkout", grpc.StatusCode.UNAUTHENTICATED),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await fetch(token, selector)
                assert refused.value.code() == code, (token, selector)
            denied = stub.SyncFlags(
                sync_pb2.SyncFlagsRequest(),
                metadata=(*md(TOKENS["agent"]), ("flagd-selector", "payments")),
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await denied.read()
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "may sync checkout, not payments" in (refused.value.details() or "")
    finally:
        await srv.stop(grace=0)


async def test_the_readme_node_service_runs_as_printed(
    server: ControlServer, mitigation: Any, node_client: Path
) -> None:
    """The README's Node service, as printed (the server's port for make run's), reads
    the kill switch we set, not its default."""
    (block,) = [b for b in code_blocks(README) if b.lang == "js"]
    assert "host: '127.0.0.1', port: 50051" in block.text
    await set_flag(mitigation, "checkout", "new-ui", False)
    port = server.address.rsplit(":", 1)[1]
    script = block.text.replace("port: 50051", f"port: {port}")
    script += "console.log(JSON.stringify({ newUi }));\nawait OpenFeature.close();\n"
    (node_client / "readme.mjs").write_text(script)
    proc = await asyncio.create_subprocess_exec(
        "node", "readme.mjs", cwd=node_client, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert json.loads(out.decode().strip().splitlines()[-1]) == {"newUi": False}, out
