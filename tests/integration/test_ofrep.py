"""OFREP on the HTTP listener: OpenFeature's stock OFREP provider (PyPI) against a real
server and etcd, the bulk route's ETag and 304, its event stream, and authentication."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason
from openfeature.provider import AbstractProvider

from agents import AsyncAgent
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.model import flag_value_to_proto
from controlplane.server import ControlServer
from tests.helpers.cpctl import Run
from tests.helpers.openfeature_clients import Client, npm_install
from tests.integration.test_auth import TOKENS, auth_document, write_auth
from tests.integration.test_flagd_sync import set_flag, write_options
from tests.integration.test_http import start, url

WAIT = 10.0


@pytest.fixture
async def srv(etcd: EmbeddedEtcd, prefix: str) -> AsyncIterator[ControlServer]:
    server = await start(etcd, prefix)
    yield server
    await server.stop(grace=0)


@pytest.fixture
async def stub(srv: ControlServer) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(srv.address) as channel:
        yield mitigation_pb2_grpc.MitigationServiceStub(channel)


@pytest.fixture
async def http(srv: ControlServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=url(srv), timeout=WAIT) as client:
        yield client


async def mirrored(server: ControlServer, response: Any) -> None:
    """Until the server's mirror (what OFREP answers from) holds a write's revision."""
    assert server.hub is not None
    assert await server.hub.wait_for_revision(int(response.result.revision), WAIT)


async def flip(server: ControlServer, stub: Any, scope: str, name: str, value: Any) -> None:
    """Set a flag and wait until the server's mirror has it."""
    revision = await set_flag(stub, scope, name, value)
    assert server.hub is not None
    assert await server.hub.wait_for_revision(revision, WAIT)


def of_client(provider: AbstractProvider, service: str | None) -> OpenFeatureClient:
    """A client of ``provider`` in a domain of its own, evaluating for ``service``."""
    domain = f"ofrep-{uuid.uuid4().hex}"
    api.set_provider(provider, domain)
    client = api.get_client(domain)
    attributes: dict[str, Any] = {"service": service} if service is not None else {}
    client.context = EvaluationContext("user-1", attributes)
    return client


async def test_the_stock_ofrep_provider_reads_what_our_agents_read(
    srv: ControlServer, stub: Any
) -> None:
    await set_flag(stub, "global", "new-ui", True)
    await set_flag(stub, "checkout", "mode", "lite")
    await set_flag(stub, "checkout", "rate", 0.25)
    await set_flag(stub, "checkout", "workers", 8)
    await set_flag(stub, "checkout", "limits", {"burst": 5, "tags": ["a"]})
    await set_flag(stub, "global", "hidden", False)
    await set_flag(stub, "checkout", "hidden", True)  # the service's own wins
    await stub.SetShedding(
        m.SetSheddingRequest(
            service="checkout", tier=t.SHEDDABLE, percent=50, options=write_options()
        )
    )
    pinned = await stub.PinVersion(
        m.PinVersionRequest(service="checkout", version="v1.4.2", options=write_options())
    )
    await mirrored(srv, pinned)
    provider = OFREPProvider(url(srv), timeout=WAIT)
    client = of_client(provider, "checkout")
    async with AsyncAgent("checkout", [srv.address]) as agent:
        assert await agent.wait_ready(WAIT)
        resolutions = {
            "new-ui": lambda: client.get_boolean_details("new-ui", False),
            "mode": lambda: client.get_string_details("mode", "full"),
            "rate": lambda: client.get_float_details("rate", 1.0),
            # Numbers are JSON numbers as agents read them (8.0): Python's provider
            # takes them as floats (its integer call refuses 8.0, a float).
            "workers": lambda: client.get_float_details("workers", 1.0),
            "limits": lambda: client.get_object_details("limits", {}),
            "hidden": lambda: client.get_boolean_details("hidden", False),
        }
        for key, resolve in resolutions.items():
            details = await asyncio.to_thread(resolve)
            assert details.value == agent.value(key), (key, details)
            assert type(details.value) is type(agent.value(key)), (key, details)
            assert (details.reason, details.error_code) == (Reason.STATIC, None), details
        details = await asyncio.to_thread(client.get_boolean_details, "hidden", False)
        assert details.flag_metadata["scope"] == "checkout"
        assert details.flag_metadata["setBy"] == "oncall"
    shedding = await asyncio.to_thread(client.get_object_details, "controlplane.shedding", {})
    assert shedding.value == {"tier": "SHEDDABLE", "percent": 50}
    pin = await asyncio.to_thread(client.get_string_details, "controlplane.pin", "")
    assert pin.value == "v1.4.2"

    # Not set: the caller's default, FLAG_NOT_FOUND, and the closest name in the details.
    missing = await asyncio.to_thread(client.get_boolean_details, "new-iu", True)
    assert (missing.value, missing.error_code) == (True, ErrorCode.FLAG_NOT_FOUND)
    assert "did you mean new-ui?" in (missing.error_message or "")

    # A flip is read at the next evaluation.
    await flip(srv, stub, "global", "new-ui", False)
    assert (await asyncio.to_thread(client.get_boolean_details, "new-ui", True)).value is False

    # Another service sees the global flags only.
    other = of_client(provider, "payments")
    assert (await asyncio.to_thread(other.get_string_details, "mode", "full")).value == "full"
    assert (await asyncio.to_thread(other.get_boolean_details, "hidden", True)).value is False

    # No service in the context and no agent identity to take it from: INVALID_CONTEXT.
    nameless = of_client(provider, None)
    refused = await asyncio.to_thread(nameless.get_boolean_details, "new-ui", True)
    assert (refused.value, refused.error_code) == (True, ErrorCode.INVALID_CONTEXT)
    assert "the evaluation context attribute 'service'" in (refused.error_message or "")


@pytest.fixture(scope="session")
def web_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OpenFeature's web SDK and OFREP web provider under Node, installed once per session."""
    return npm_install("ofrep_web", tmp_path_factory)


async def test_the_stock_ofrep_web_provider_follows_the_event_stream(
    srv: ControlServer, stub: Any, web_client: Path
) -> None:
    """The web provider (bulk evaluation, ETag, event stream), as a browser page runs it:
    the values our agents read, and a flip seen through the event stream with no polling."""
    await set_flag(stub, "global", "new-ui", True)
    await set_flag(stub, "checkout", "mode", "lite")
    await set_flag(stub, "checkout", "rate", 0.25)
    await flip(srv, stub, "checkout", "limits", {"burst": 5, "tags": ["a"]})
    client = await Client.start("node", str(web_client / "client.mjs"), url(srv), "checkout")
    try:
        await client.event("INITIALIZED")
        first = await client.fetch()
        assert (first["fetch"], first["status"]) == ("/ofrep/v1/evaluate/flags", 200)
        async with AsyncAgent("checkout", [srv.address]) as agent:
            assert await agent.wait_ready(WAIT)
            for kind, key, default in (
                ("boolean", "new-ui", False),
                ("string", "mode", "full"),
                ("float", "rate", 1.0),
                ("object", "limits", {}),
            ):
                answer = await client.resolve(kind, key, default)
                assert answer["value"] == agent.value(key), (key, answer)
                assert (answer["reason"], answer["error_code"]) == ("STATIC", None), answer
        missing = await client.resolve("boolean", "nope", True)
        assert (missing["value"], missing["error_code"]) == (True, "FLAG_NOT_FOUND")

        # The stream's first event: a refetch with the etag it has, answered 304.
        again = await client.fetch()
        assert again["if_none_match"] is not None and again["status"] == 304, again
        assert again["query"]["flagConfigEtag"] == again["if_none_match"]

        # A flip: the event stream says refetch, the provider refetches (with the event's
        # etag) and announces the change; no polling (pollInterval 0).
        await set_flag(stub, "global", "new-ui", False)
        changed = await client.event("PROVIDER_CONFIGURATION_CHANGED")
        assert "new-ui" in changed["flags"], changed
        refetch = await client.fetch()
        assert refetch["status"] == 200 and "flagConfigEtag" in refetch["query"], refetch
        assert (await client.resolve("boolean", "new-ui", True))["value"] is False
    finally:
        await client.close()


async def test_bad_contexts_get_the_error_codes_of_the_spec(http: httpx.AsyncClient) -> None:
    evaluate = "/ofrep/v1/evaluate/flags/new-ui"
    for body, status, code, text in (
        ({"context": {"service": "Not A Service"}}, 400, "INVALID_CONTEXT", "not a service name"),
        ({"context": {"service": 7}}, 400, "INVALID_CONTEXT", "must be a string, not int"),
        ({"context": {"service": "global"}}, 400, "INVALID_CONTEXT", "scope of every service"),
        ({"context": []}, 400, "INVALID_CONTEXT", "context must be a JSON object"),
        (
            {"context": {"targetingKey": 7, "service": "x"}},
            400,
            "INVALID_CONTEXT",
            "targetingKey must be a string (OFREP), not int",
        ),
        ([], 400, "PARSE_ERROR", "the body must be a JSON object"),
        ({}, 400, "INVALID_CONTEXT", "name the service"),
    ):
        answer = await http.post(evaluate, json=body)
        assert (answer.status_code, answer.json()["errorCode"]) == (status, code), answer.text
        assert text in answer.json()["errorDetails"], answer.text
        assert answer.json()["key"] == "new-ui"
        bulk = await http.post("/ofrep/v1/evaluate/flags", json=body)
        assert (bulk.status_code, bulk.json()["errorCode"]) == (status, code), bulk.text
        assert "key" not in bulk.json()
    broken = await http.post(evaluate, content=b"{not json", headers={"Content-Type": "x"})
    assert (broken.status_code, broken.json()["errorCode"]) == (400, "PARSE_ERROR")
    assert "is not JSON" in broken.json()["errorDetails"]
    deep = await http.post(evaluate, content=b"[" * 100_000)
    assert (deep.status_code, deep.json()["errorCode"]) == (400, "PARSE_ERROR"), deep.text
    # An etag of ours has ASCII digits: anything else is not one (and no reason to wait).
    context = {"context": {"service": "checkout"}}
    for odd in ("\u00b2-0123456789abcdef", "9" * 5000 + "-0123456789abcdef", "W/x"):
        bulk = await http.post(
            "/ofrep/v1/evaluate/flags", json=context, params={"flagConfigEtag": odd}
        )
        assert bulk.status_code == 200, bulk.text


async def test_bulk_answers_carry_an_etag_and_an_event_stream(
    srv: ControlServer, stub: Any, http: httpx.AsyncClient, cpctl: Run
) -> None:
    bulk = "/ofrep/v1/evaluate/flags"
    context = {"context": {"targetingKey": "u", "service": "checkout"}}
    await flip(srv, stub, "checkout", "mode", "lite")
    first = await http.post(bulk, json=context)
    assert first.status_code == 200, first.text
    etag = first.headers["etag"]
    document = first.json()
    assert document["flags"] == [
        {
            "key": "mode",
            "value": "lite",
            "reason": "STATIC",
            "variant": "value",
            "metadata": {"scope": "checkout", "setBy": "oncall", "reason": "test"},
        }
    ]
    assert document["eventStreams"] == [
        {
            "type": "sse",
            "endpoint": {"requestUri": "/ofrep/v1/events?service=checkout"},
            "inactivityDelaySec": 120,
        }
    ]
    # Unchanged: 304 with no body, for the tag and for a list holding it.
    for tags in (etag, f'"other", W/{etag}', "*"):
        same = await http.post(bulk, json=context, headers={"If-None-Match": tags})
        assert (same.status_code, same.content, same.headers["etag"]) == (304, b"", etag)
    # A flag of another service changes nothing here.
    await set_flag(stub, "payments", "mode", "lite")
    same = await http.post(bulk, json=context, headers={"If-None-Match": etag})
    assert same.status_code == 304

    async with http.stream("GET", document["eventStreams"][0]["endpoint"]["requestUri"]) as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        lines = events.aiter_lines()

        async def next_event() -> dict[str, Any]:
            async with asyncio.timeout(WAIT):
                fields: dict[str, str] = {}
                async for line in lines:
                    if line == "" and "data" in fields:
                        return {**fields, "data": json.loads(fields["data"])}
                    if line and not line.startswith(":"):
                        name, _, value = line.partition(": ")
                        fields[name] = value
            raise AssertionError("the event stream ended")

        # The first event at once: the current etag (a refetch with it gets a 304).
        now = await next_event()
        assert now["data"] == {"type": "refetchEvaluation", "etag": etag}
        assert (now["event"], now["id"]) == ("message", etag.strip('"'))
        status = await cpctl("status", "checkout")
        assert "1 OpenFeature sync client(s), no confirmation" in status.stdout

        # A change for checkout: an event with the new etag, and the refetch it triggers
        # (with the event's etag, as providers send it) has the new value.
        await set_flag(stub, "global", "kill", True)
        changed = await next_event()
        new_etag = changed["data"]["etag"]
        assert new_etag != etag
        refetch = await http.post(
            bulk,
            json=context,
            params={"flagConfigEtag": new_etag},
            headers={"If-None-Match": etag},
        )
        assert refetch.status_code == 200 and refetch.headers["etag"] == new_etag
        assert {f["key"]: f["value"] for f in refetch.json()["flags"]} == {
            "kill": True,
            "mode": "lite",
        }


async def test_a_time_boxed_value_ends_on_the_event_stream(
    srv: ControlServer, stub: Any, http: httpx.AsyncClient
) -> None:
    """Expiry: the stream says refetch when the time-boxed value ends, and the refetch
    has the value it replaced (even before a server has written the restore)."""
    await set_flag(stub, "checkout", "mode", "full")
    boxed = await stub.SetFlag(
        m.SetFlagRequest(
            scope="checkout",
            name="mode",
            value=flag_value_to_proto("lite"),
            options=t.WriteOptions(reason="test", actor="oncall", ttl={"nanos": 800_000_000}),
        )
    )
    await mirrored(srv, boxed)
    context = {"context": {"service": "checkout"}}
    answer = await http.post("/ofrep/v1/evaluate/flags/mode", json=context)
    assert answer.json()["value"] == "lite" and "expiresAt" in answer.json()["metadata"]
    async with http.stream("GET", "/ofrep/v1/events?service=checkout") as events:
        data = [line async for line in _data_lines(events, 2)]
    assert data[0]["etag"] != data[1]["etag"]
    answer = await http.post("/ofrep/v1/evaluate/flags/mode", json=context)
    assert answer.json()["value"] == "full"

    # Shedding ends the same way: controlplane.shedding is gone once its time is up,
    # even before a server has written the restore.
    shedding = await stub.SetShedding(
        m.SetSheddingRequest(
            service="checkout",
            tier=t.SHEDDABLE,
            percent=50,
            options=t.WriteOptions(reason="test", actor="oncall", ttl={"nanos": 800_000_000}),
        )
    )
    await mirrored(srv, shedding)
    shed = await http.post("/ofrep/v1/evaluate/flags/controlplane.shedding", json=context)
    assert shed.json()["value"] == {"tier": "SHEDDABLE", "percent": 50}, shed.text
    async with http.stream("GET", "/ofrep/v1/events?service=checkout") as events:
        [line async for line in _data_lines(events, 2)]
    gone = await http.post("/ofrep/v1/evaluate/flags/controlplane.shedding", json=context)
    assert gone.status_code == 404, gone.text


async def _data_lines(events: httpx.Response, count: int) -> AsyncIterator[dict[str, Any]]:
    seen = 0
    async with asyncio.timeout(WAIT):
        async for line in events.aiter_lines():
            if line.startswith("data: "):
                yield json.loads(line.removeprefix("data: "))
                seen += 1
                if seen == count:
                    return


async def test_a_stop_ends_the_event_stream(etcd: EmbeddedEtcd, prefix: str) -> None:
    server = await start(etcd, prefix)
    stopped = False
    try:
        async with (
            httpx.AsyncClient(base_url=url(server), timeout=WAIT) as client,
            client.stream("GET", "/ofrep/v1/events?service=checkout") as events,
        ):
            lines = events.aiter_lines()
            async with asyncio.timeout(WAIT):
                async for line in lines:
                    if line.startswith("data: "):
                        break
                loop = asyncio.get_running_loop()
                began = loop.time()
                await server.stop(grace=5)
                stopped = True
                rest = [line async for line in lines]
            assert loop.time() - began < 2.0, "the stream held the stop"
            assert not [line for line in rest if line.startswith("data: ")]
    finally:
        if not stopped:
            await server.stop(grace=0)


async def test_with_authentication_an_ofrep_client_is_an_agent_of_its_service(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    path = write_auth(tmp_path / "auth.json", auth_document())
    server = await start(etcd, prefix, auth_file=path)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
            written = await stub.SetFlag(
                m.SetFlagRequest(
                    scope="checkout",
                    name="mode",
                    value=flag_value_to_proto("lite"),
                    options=write_options(),
                ),
                metadata=(("authorization", f"Bearer {TOKENS['operator']}"),),
            )
            await mirrored(server, written)

        def token(name: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {TOKENS[name]}"}

        # checkout's agent token names the service: no context needed (the stock
        # provider sends none without one).
        provider = OFREPProvider(url(server), headers_factory=lambda: token("agent"))
        client = of_client(provider, None)
        details = await asyncio.to_thread(client.get_string_details, "mode", "full")
        assert (details.value, details.reason) == ("lite", Reason.STATIC)
        async with httpx.AsyncClient(base_url=url(server), timeout=WAIT) as http:
            for headers, body, status, text in (
                ({}, {}, 401, "no credentials"),
                (token("agent"), {"context": {"service": "payments"}}, 403, "not payments"),
                (token("operator"), {"context": {"service": "checkout"}}, 403, "agent role"),
            ):
                for route in ("/ofrep/v1/evaluate/flags/mode", "/ofrep/v1/evaluate/flags"):
                    answer = await http.post(route, json=body, headers=headers)
                    assert answer.status_code == status, (route, answer.text)
                    assert text in answer.json()["errorDetails"], answer.text
                service = body.get("context", {}).get("service", "checkout")
                events = await http.get(
                    "/ofrep/v1/events", params={"service": service}, headers=headers
                )
                assert events.status_code == status, events.text
            async with http.stream("GET", "/ofrep/v1/events", headers=token("agent")) as events:
                first = [line async for line in _data_lines(events, 1)]
                assert first[0]["type"] == "refetchEvaluation"
        # The stock provider on a refused token: an error, the default.
        refused = OFREPProvider(url(server), headers_factory=lambda: token("operator"))
        denied = await asyncio.to_thread(
            of_client(refused, "checkout").get_string_details, "mode", "full"
        )
        assert (denied.value, denied.error_code) == ("full", ErrorCode.GENERAL)
    finally:
        await server.stop(grace=0)


@pytest.mark.etcd_fault
async def test_answers_go_on_while_etcd_is_down(fresh_etcd: EmbeddedEtcd, prefix: str) -> None:
    """OFREP answers from the server's mirror: etcd down, the last values still served."""
    server = await start(fresh_etcd, prefix, etcd_timeout=1.0)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
            revision = await set_flag(stub, "x", "kill", True)
        # The mirror holds the write before etcd goes away.
        assert server.hub is not None and await server.hub.wait_for_revision(revision, WAIT)
        async with httpx.AsyncClient(base_url=url(server), timeout=WAIT) as http:
            context = {"context": {"service": "x"}}
            head = await http.head("/ofrep/v1/events?service=x")
            assert (head.status_code, head.content) == (200, b"")
            assert head.headers["content-type"].startswith("text/event-stream")
            fresh_etcd.stop()
            answer = await http.post("/ofrep/v1/evaluate/flags/kill", json=context)
            assert (answer.status_code, answer.json()["value"]) == (200, True), answer.text
            bulk = await http.post("/ofrep/v1/evaluate/flags", json=context)
            assert [f["key"] for f in bulk.json()["flags"]] == ["kill"], bulk.text
            # The mirror is what a write would change: the HTTP mirror's write is refused.
            refused = await http.put(
                "/v1/flags/x/kill", json={"value": {"boolValue": False}, "options": {"reason": "r"}}
            )
            assert refused.status_code == 503, refused.text
            fresh_etcd.restart()
    finally:
        await server.stop(grace=0)


async def test_web_pages_of_the_origins_given_may_call_the_ofrep_routes(
    etcd: EmbeddedEtcd, prefix: str
) -> None:
    page = "https://app.example.com"
    server = await start(etcd, prefix, http_cors_origins=(page,))
    try:
        async with httpx.AsyncClient(base_url=url(server), timeout=WAIT) as http:
            preflight = {
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, if-none-match",
            }
            allowed = await http.options(
                "/ofrep/v1/evaluate/flags", headers={"Origin": page, **preflight}
            )
            assert allowed.status_code == 200, allowed.text
            assert allowed.headers["access-control-allow-origin"] == page
            assert "if-none-match" in allowed.headers["access-control-allow-headers"].lower()
            other = await http.options(
                "/ofrep/v1/evaluate/flags", headers={"Origin": "https://evil.example", **preflight}
            )
            assert other.status_code == 400
            assert "access-control-allow-origin" not in other.headers
            context = {"context": {"service": "checkout"}}
            bulk = await http.post(
                "/ofrep/v1/evaluate/flags", json=context, headers={"Origin": page}
            )
            assert bulk.status_code == 200 and bulk.headers["access-control-allow-origin"] == page
            assert bulk.headers["access-control-expose-headers"] == "ETag"
            # The mirror of MitigationService is not opened to web pages by it.
            listed = await http.get("/v1/flags", headers={"Origin": page})
            assert "access-control-allow-origin" not in listed.headers
    finally:
        await server.stop(grace=0)
    # Without the option, no page may: no CORS headers at all.
    plain = await start(etcd, prefix)
    try:
        async with httpx.AsyncClient(base_url=url(plain), timeout=WAIT) as http:
            bulk = await http.post(
                "/ofrep/v1/evaluate/flags",
                json={"context": {"service": "checkout"}},
                headers={"Origin": page},
            )
            assert bulk.status_code == 200 and "access-control-allow-origin" not in bulk.headers
    finally:
        await plain.stop(grace=0)


def test_a_bad_cors_origin_is_refused_before_anything_starts() -> None:
    for argv, text in (
        (["--http", "127.0.0.1:0", "--http-cors-origin", "app.example.com"], "not a web origin"),
        (["--http", "127.0.0.1:0", "--http-cors-origin", "https://a.example/x"], "no path"),
        (["--http-cors-origin", "https://app.example.com"], "needs --http"),
    ):
        ran = subprocess.run(
            [sys.executable, "-m", "controlplane.server", "serve", "--metrics", "off", *argv],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert ran.returncode == 2, ran.stderr
        assert text in ran.stderr and "Traceback" not in ran.stderr, ran.stderr
