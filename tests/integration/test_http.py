"""The HTTP listener (``--http``) on a real server and etcd, with a real HTTP client.

The server runs on the test's loop with gRPC and HTTP on port 0; requests go through
httpx over TCP; what they did is read back with the gRPC API and from etcd itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openapi_schema_validator
import pytest
import structlog
from openapi_spec_validator import validate
from prometheus_client import CollectorRegistry

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server import ControlServer
from controlplane.server._ofrep import BULK_PATH, EVALUATE_PATH, EVENTS_PATH
from controlplane.server._routes import ROUTES
from controlplane.server.auth import hash_token
from tests.helpers.agent_process import ROOT
from tests.helpers.certs import TestCA
from tests.helpers.raw_etcd import RawEtcd
from tests.helpers.server_process import ServerProcess
from tests.integration.conftest import server_config

OPERATOR = "http-operator-token-0123456789"
VIEWER = "http-viewer-token-0123456789"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def write_options(**extra: Any) -> dict[str, Any]:
    return {"reason": "http test", "actor": "oncall", **extra}


async def start(etcd: EmbeddedEtcd, prefix: str, **overrides: Any) -> ControlServer:
    config = server_config(etcd.endpoint, prefix, http="127.0.0.1:0", **overrides)
    srv = ControlServer(config, registry=CollectorRegistry())
    await srv.start()
    return srv


def url(srv: ControlServer) -> str:
    assert srv.http is not None
    return srv.http.url


@pytest.fixture
async def srv(etcd: EmbeddedEtcd, prefix: str) -> AsyncIterator[ControlServer]:
    server = await start(etcd, prefix)
    yield server
    await server.stop(grace=0)


@pytest.fixture
async def client(srv: ControlServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=url(srv), timeout=10) as http:
        yield http


@pytest.fixture
async def grpc_stub(srv: ControlServer) -> AsyncIterator[mitigation_pb2_grpc.MitigationServiceStub]:
    async with grpc.aio.insecure_channel(srv.address) as channel:
        yield mitigation_pb2_grpc.MitigationServiceStub(channel)


async def put_flag(
    http: httpx.AsyncClient, value: dict[str, Any], **options: Any
) -> httpx.Response:
    return await http.put(
        "/v1/flags/checkout/new-ui",
        json={"value": value, "options": write_options(**options)},
    )


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json", response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["status"] == response.status_code
    return error


# ---- round trips ----


async def test_a_flag_set_over_http_reads_back_over_grpc_and_http(
    client: httpx.AsyncClient, grpc_stub: mitigation_pb2_grpc.MitigationServiceStub
) -> None:
    written = await put_flag(client, {"boolValue": False}, incident="INC-7")
    assert written.status_code == 200, written.text
    answer = written.json()
    assert answer["result"]["changed"] is True and answer["result"]["dryRun"] is False
    assert answer["flag"]["value"] == {"boolValue": False}
    assert answer["flag"]["meta"]["actor"] == "oncall"
    assert int(answer["result"]["revision"]) > 0  # int64: a string
    over_grpc = await grpc_stub.GetFlag(m.GetFlagRequest(scope="checkout", name="new-ui"))
    assert over_grpc.flag.value.WhichOneof("kind") == "bool_value"
    assert not over_grpc.flag.value.bool_value
    assert over_grpc.flag.meta.incident == "INC-7"
    assert over_grpc.flag.meta.mod_revision == int(answer["flag"]["meta"]["modRevision"])
    read = await client.get("/v1/flags/checkout/new-ui")
    assert read.status_code == 200
    assert read.json()["flag"] == answer["flag"]
    assert read.json()["overriddenBy"] == []  # defaults are printed
    # Query parameters: the list, filtered; the same write again changes nothing.
    listed = await client.get("/v1/flags", params={"scope": "checkout", "effective": "true"})
    assert [f["name"] for f in listed.json()["flags"]] == ["new-ui"]
    again = await put_flag(client, {"boolValue": False})
    assert again.json()["result"]["changed"] is False
    # A DELETE takes its options as query parameters.
    cleared = await client.delete(
        "/v1/flags/checkout/new-ui", params={"options.reason": "over", "options.actor": "oncall"}
    )
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["removed"]["value"] == {"boolValue": False}
    gone = await grpc_stub.ListFlags(m.ListFlagsRequest(scope="checkout"))
    assert list(gone.flags) == []


async def test_every_route_answers_json(
    client: httpx.AsyncClient, grpc_stub: mitigation_pb2_grpc.MitigationServiceStub
) -> None:
    """Each route reaches its RPC: an answer of the RPC (200 or its own error), never a
    404 or 405 of the router; every answer is what /openapi.json says it is."""
    document = (await client.get("/openapi.json")).json()
    options = t.WriteOptions(reason="r", incident="INC-1")
    await grpc_stub.MarkKnownGood(
        m.MarkKnownGoodRequest(service="checkout", version="v1", options=options)
    )
    # Records to read back: nested messages, time stamps, enums, durations.
    await grpc_stub.SetFlag(
        m.SetFlagRequest(
            scope="checkout", name="x", value=t.FlagValue(bool_value=True), options=options
        )
    )
    await grpc_stub.SetShedding(
        m.SetSheddingRequest(service="checkout", tier=t.SHEDDABLE_PLUS, percent=5, options=options)
    )
    await grpc_stub.PinVersion(
        m.PinVersionRequest(service="checkout", version="v1", options=options)
    )
    dry = {"options": write_options(dryRun=True)}
    bodies: dict[str, Any] = {
        "SetFlag": {"value": {"boolValue": False}, **dry},
        "SetShedding": {"percent": 10, "tier": "SHEDDABLE", **dry},
        "PinVersion": {"version": "v1", **dry},
        "Rollback": {"currentVersion": "v2", **dry},
        "ApplyBundle": {
            "name": "b",
            "changes": [
                {"setFlag": {"scope": "checkout", "name": "x", "value": {"boolValue": True}}}
            ],
            "options": write_options(dryRun=True),
        },
        "SetTrigger": {
            "trigger": {
                "name": "x",
                "matchers": [{"label": "alertname", "value": "X"}],
                "bundleName": "b",
                "changes": [
                    {"setFlag": {"scope": "checkout", "name": "x", "value": {"boolValue": True}}}
                ],
            },
            **dry,
        },
        "FireTrigger": {"groupKey": "g"},
        "ResolveTrigger": {"groupKey": "g"},
    }
    path_values = {"scope": "checkout", "name": "x", "service": "checkout", "version": "v1",
                   "bundle_id": "20300101-000000-b-abcd", "incident": "INC-1"}  # fmt: skip
    path_values["name"] = "x"  # a flag's name, and a trigger's (none: NOT_FOUND)
    for route in ROUTES:
        if route.streaming:
            continue
        path = route.path.format(**path_values)
        if route.has_body:
            body = bodies.get(route.rpc, dry)
            response = await client.request(route.verb, path, json=body)
        else:
            params = {"options.reason": "r", "options.dry_run": "true"}
            if route.verb == "GET":
                params = {"revision": "1", "timeout": "0.1s"} if route.rpc == "WaitApplied" else {}
            response = await client.request(route.verb, path, params=params)
        assert response.headers["content-type"] == "application/json", (route, response.text)
        if response.status_code != 200:
            code = error_of(response)["code"]
            assert code in ("NOT_FOUND", "FAILED_PRECONDITION"), (route, response.text)
            assert "no route" not in response.text, route
        described = document["paths"][route.path][route.verb.lower()]["responses"]
        content = described[str(response.status_code)]["content"]["application/json"]
        schema = {**content["schema"], "components": document["components"]}
        openapi_schema_validator.validate(response.json(), schema)


# ---- errors: every status that can be provoked ----


async def test_errors_map_to_http_statuses_and_write_nothing(
    client: httpx.AsyncClient,
    grpc_stub: mitigation_pb2_grpc.MitigationServiceStub,
    raw_etcd: RawEtcd,
    prefix: str,
) -> None:
    first = await put_flag(client, {"boolValue": True})
    assert first.status_code == 200
    mod_revision = first.json()["flag"]["meta"]["modRevision"]
    before = await raw_etcd.get_prefix(prefix)

    bad_value = await client.put(
        "/v1/shedding/checkout", json={"percent": 150, "options": write_options()}
    )
    assert bad_value.status_code == 400
    error = error_of(bad_value)
    assert error["code"] == "INVALID_ARGUMENT"
    with pytest.raises(grpc.aio.AioRpcError) as over_grpc:
        await grpc_stub.SetShedding(
            m.SetSheddingRequest(
                service="checkout", percent=150, options=t.WriteOptions(reason="r")
            )
        )
    assert error["message"] == over_grpc.value.details()  # what cpctl shows
    assert error["message"].startswith("percent: 150")

    unknown = await client.get("/v1/flags/checkout/no-such-flag")
    assert unknown.status_code == 404 and error_of(unknown)["code"] == "NOT_FOUND"

    stale = await put_flag(client, {"boolValue": False}, expectedModRevision="1")
    assert stale.status_code == 409
    conflict = error_of(stale)
    assert conflict["code"] == "ABORTED"
    assert conflict["current_mod_revision"] == mod_revision
    assert stale.headers["X-Current-Mod-Revision"] == mod_revision
    assert f"current mod revision {mod_revision}" in conflict["message"]

    nothing = await client.post("/v1/services/checkout/rollback", json={"options": write_options()})
    assert nothing.status_code == 412, nothing.text
    assert error_of(nothing)["code"] == "FAILED_PRECONDITION"

    no_reason = await put_flag(client, {"boolValue": False}, reason="")
    assert no_reason.status_code == 400 and "reason" in error_of(no_reason)["message"]

    typo = await client.put(
        "/v1/flags/checkout/new-ui", json={"valeu": {"boolValue": False}, "options": {}}
    )
    assert typo.status_code == 400 and "valeu" in error_of(typo)["message"]

    not_json = await client.put(
        "/v1/flags/checkout/new-ui",
        content=b"{value: false}",
        headers={"Content-Type": "application/json"},
    )
    assert not_json.status_code == 400
    assert "not JSON" in error_of(not_json)["message"]

    form = await client.put("/v1/flags/checkout/new-ui", data={"value": "false"})
    assert form.status_code == 415
    assert "Content-Type: application/json" in error_of(form)["message"]

    too_large = await client.put(
        "/v1/flags/checkout/new-ui",
        content=b" " * (4 * 1024 * 1024 + 1),
        headers={"Content-Type": "application/json"},
    )
    assert too_large.status_code == 413
    assert "--max-message-bytes" in error_of(too_large)["message"]

    # An enum as a number beyond int32, as text or not whole, and a number too large for
    # a float: refused, not wrapped into another tier, not a 500.
    for tier in (2**32 + 2, "4294967298", 2.5, 4294967298.0):
        wrapped = await client.put(
            "/v1/shedding/checkout",
            json={"percent": 10, "tier": tier, "options": write_options()},
        )
        assert wrapped.status_code == 400, (tier, wrapped.text)
        assert "is not a value of Tier: give one of" in error_of(wrapped)["message"]
    for raw in (b'{"percent": 1e400}', b'{"percent": 10, "tier": Infinity}'):
        huge = await client.put(
            "/v1/shedding/checkout", content=raw, headers={"Content-Type": "application/json"}
        )
        assert huge.status_code == 400, (raw, huge.text)

    assert await raw_etcd.get_prefix(prefix) == before, "a refused request wrote something"


async def test_unknown_routes_and_wrong_verbs_answer_json(client: httpx.AsyncClient) -> None:
    missing = await client.get("/v1/flagz")
    assert missing.status_code == 404
    assert "/openapi.json" in error_of(missing)["message"]
    wrong = await client.post("/v1/flags/checkout/new-ui", json={})
    assert wrong.status_code == 405
    assert error_of(wrong)["code"] == "METHOD_NOT_ALLOWED"
    assert set(wrong.headers["Allow"].split(", ")) == {"GET", "HEAD", "PUT", "DELETE"}
    bad_param = await client.get("/v1/flags", params={"scop": "checkout"})
    assert bad_param.status_code == 400 and "scop" in error_of(bad_param)["message"]
    head = await client.head("/v1/flags")
    assert head.status_code == 200 and head.content == b""
    bad_timeout = await client.get("/v1/flags", headers={"X-Timeout": "soon"})
    assert bad_timeout.status_code == 400 and "X-Timeout" in error_of(bad_timeout)["message"]


async def test_tokens_and_roles_as_on_the_grpc_port(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path, raw_etcd: RawEtcd
) -> None:
    auth = tmp_path / "auth.json"
    auth.write_text(
        json.dumps(
            {
                "identities": [
                    {"name": "oncall", "role": "operator", "token_sha256": hash_token(OPERATOR)},
                    {"name": "dashboards", "role": "viewer", "token_sha256": hash_token(VIEWER)},
                ]
            }
        )
    )
    server = await start(etcd, prefix, auth_file=auth)
    try:
        async with httpx.AsyncClient(base_url=url(server), timeout=10) as http:
            anonymous = await put_flag(http, {"boolValue": False})
            assert anonymous.status_code == 401
            assert "Bearer" in error_of(anonymous)["message"]
            wrong = await http.get("/v1/flags", headers=bearer("not-a-token-0123456789"))
            assert wrong.status_code == 401 and error_of(wrong)["code"] == "UNAUTHENTICATED"
            before = await raw_etcd.get_prefix(prefix)
            viewer = await http.put(
                "/v1/flags/checkout/new-ui",
                json={"value": {"boolValue": False}, "options": write_options()},
                headers=bearer(VIEWER),
            )
            assert viewer.status_code == 403
            assert "needs the operator or admin role" in error_of(viewer)["message"]
            assert await raw_etcd.get_prefix(prefix) == before
            assert (await http.get("/v1/flags", headers=bearer(VIEWER))).status_code == 200
            written = await http.put(
                "/v1/flags/checkout/new-ui",
                json={"value": {"boolValue": False}, "options": write_options()},
                headers=bearer(OPERATOR),
            )
            assert written.status_code == 200
            meta = written.json()["flag"]["meta"]
            # The identity is the actor; the actor the client claims is ignored.
            assert (meta["actor"], meta["actorAuthenticated"]) == ("oncall", True)
    finally:
        await server.stop(grace=0)


async def test_tls_and_mutual_tls_with_the_grpc_ports_certificates(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path / "pki")
    cert = ca.server_cert()
    pipeline = ca.issue("deploy-pipeline", organization="Example")
    auth = tmp_path / "auth.json"
    auth.write_text(
        json.dumps(
            {
                "identities": [
                    {"name": "deploy", "role": "admin", "cert_subject": pipeline.subject},
                    {"name": "oncall", "role": "operator", "token_sha256": hash_token(OPERATOR)},
                ]
            }
        )
    )
    server = await start(
        etcd, prefix, tls_cert=cert.cert, tls_key=cert.key, tls_client_ca=ca.cert, auth_file=auth
    )
    try:
        assert url(server).startswith("https://127.0.0.1:")
        with_cert = ssl.create_default_context(cafile=str(ca.cert))
        with_cert.load_cert_chain(pipeline.cert, pipeline.key)
        async with httpx.AsyncClient(base_url=url(server), verify=with_cert, timeout=10) as http:
            marked = await http.put("/v1/known-good/checkout/v9", json={"options": write_options()})
            assert marked.status_code == 200, marked.text
            assert marked.json()["knownGood"]["meta"]["actor"] == "deploy"
            # A token decides the identity when sent.
            as_operator = await http.get("/v1/pins", headers=bearer(OPERATOR))
            assert as_operator.status_code == 200
        # No client certificate: the handshake fails.
        without = ssl.create_default_context(cafile=str(ca.cert))
        async with httpx.AsyncClient(base_url=url(server), verify=without) as http:
            with pytest.raises(httpx.HTTPError):
                await http.get("/v1/pins", headers=bearer(OPERATOR))
        # Plaintext to the TLS port: no answer in HTTP.
        async with httpx.AsyncClient(base_url=url(server).replace("https", "http")) as http:
            with pytest.raises(httpx.HTTPError):
                await http.get("/v1/pins", headers=bearer(OPERATOR))
    finally:
        await server.stop(grace=0)


async def test_one_log_line_per_request(client: httpx.AsyncClient) -> None:
    with structlog.testing.capture_logs() as logs:
        written = await put_flag(client, {"boolValue": True})
        missing = await client.get("/v1/flags/checkout/nothing")
    assert (written.status_code, missing.status_code) == (200, 404)
    lines = [e for e in logs if e["event"] == "http"]
    assert [(e["method"], e["route"], e["rpc"], e["status"], e["actor"]) for e in lines] == [
        ("PUT", "/v1/flags/{scope}/{name}", "SetFlag", 200, "oncall"),
        ("GET", "/v1/flags/{scope}/{name}", "GetFlag", 404, None),
    ]
    assert all(e["duration_ms"] >= 0 for e in lines)
    # The RPC's own line too, as for a gRPC call (with transport=http from the context).
    rpcs = [e for e in logs if e["event"] == "rpc"]
    assert [(e["method"], e["code"]) for e in rpcs] == [("SetFlag", "OK"), ("GetFlag", "NOT_FOUND")]


async def test_a_reload_rotates_the_https_certificate(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    first, second = TestCA(tmp_path / "one", "first CA"), TestCA(tmp_path / "two", "second CA")
    old, new = first.server_cert("server"), second.server_cert("server")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(old.cert.read_bytes())
    key.write_bytes(old.key.read_bytes())
    key.chmod(0o600)
    server = await start(etcd, prefix, tls_cert=cert, tls_key=key)

    async def pins(ca: TestCA) -> int:
        trust = ssl.create_default_context(cafile=str(ca.cert))
        async with httpx.AsyncClient(base_url=url(server), verify=trust, timeout=10) as http:
            return (await http.get("/v1/pins")).status_code

    try:
        assert await pins(first) == 200
        # A half-written rotation is refused and the HTTPS port keeps the old one...
        cert.write_bytes(new.cert.read_bytes())
        assert not server.reload()
        assert await pins(first) == 200
        # ...the complete one is taken for the connections made from then on.
        key.write_bytes(new.key.read_bytes())
        assert server.reload()
        assert await pins(second) == 200
        with pytest.raises(httpx.ConnectError):
            await pins(first)
    finally:
        await server.stop(grace=0)


# ---- the watch stream ----


async def test_watch_streams_json_lines_and_ends_when_the_server_stops(
    etcd: EmbeddedEtcd, prefix: str
) -> None:
    server = await start(etcd, prefix)
    stopped = False
    try:
        async with (
            httpx.AsyncClient(base_url=url(server), timeout=10) as watcher,
            httpx.AsyncClient(base_url=url(server), timeout=10) as writer,
            watcher.stream("GET", "/v1/changes", params={"service": "checkout"}) as stream,
        ):
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("application/x-ndjson")
            lines = stream.aiter_lines()
            start_line = json.loads(await anext(lines))
            assert start_line["changes"] == [] and int(start_line["revision"]) > 0
            written = await put_flag(writer, {"stringValue": "read-only"})
            assert written.status_code == 200
            change = json.loads(await anext(lines))
            assert change["revision"] == written.json()["result"]["revision"]
            (entry,) = change["changes"]
            assert (entry["action"], entry["scope"], entry["name"]) == (
                "flag.set", "checkout", "new-ui",
            )  # fmt: skip
            # The server stops: the stream ends at once with a last line saying so.
            stopping = asyncio.create_task(server.stop(grace=5.0))
            stopped = True
            last = json.loads(await anext(lines))
            assert last["error"]["code"] == "UNAVAILABLE" and last["error"]["status"] == 503
            with pytest.raises(StopAsyncIteration):
                await anext(lines)
            async with asyncio.timeout(4):  # well within the grace period
                await stopping
    finally:
        if not stopped:
            await server.stop(grace=0)


class _Said(logging.Handler):
    """Sets an event when a log record says ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


async def test_a_request_in_flight_when_the_server_stops_is_answered(
    etcd: EmbeddedEtcd, prefix: str, raw_etcd: RawEtcd
) -> None:
    """Streams end at once; a request the server is reading gets the grace period. The
    request is seen in flight by its 100 Continue (sent when the handler reads the body),
    and its body is sent once uvicorn waits for the connections left."""
    server = await start(etcd, prefix)
    assert server.http is not None
    body = json.dumps({"value": {"boolValue": True}, "options": write_options()}).encode()
    head = (
        "PUT /v1/flags/checkout/late HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    uvicorn_log = logging.getLogger("uvicorn.error")
    level, waiting = uvicorn_log.level, _Said("Waiting for connections to close")
    uvicorn_log.setLevel(logging.INFO)
    uvicorn_log.addHandler(waiting)
    stopping: asyncio.Task[None] | None = None
    try:
        async with (
            httpx.AsyncClient(base_url=url(server), timeout=10) as watcher,
            watcher.stream("GET", "/v1/changes") as stream,
        ):
            lines = stream.aiter_lines()
            await anext(lines)  # live
            reader, writer = await asyncio.open_connection(server.http.host, server.http.port)
            writer.write(head)
            await writer.drain()
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            stopping = asyncio.create_task(server.stop(grace=5.0))
            last = json.loads(await anext(lines))  # the stream ended at once...
            assert last["error"]["code"] == "UNAVAILABLE"
            async with asyncio.timeout(5):
                await waiting.event.wait()  # ...the request is still in flight
            writer.write(body)
            await writer.drain()
            status = await reader.readuntil(b"\r\n")
            assert status == b"HTTP/1.1 200 OK\r\n"
            answer = await reader.read()  # the headers, the body, then the connection closes
            assert b'"changed":true' in answer
            writer.close()
        async with asyncio.timeout(4):  # not held for the grace period once all is answered
            await stopping
        assert await raw_etcd.get(f"{prefix}flags/checkout/late") is not None
    finally:
        uvicorn_log.removeHandler(waiting)
        uvicorn_log.setLevel(level)
        if stopping is None:
            await server.stop(grace=0)


async def test_watch_streams_count_against_the_identitys_limit(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    auth = tmp_path / "auth.json"
    entry = {"name": "dashboards", "role": "viewer", "token_sha256": hash_token(VIEWER)}
    auth.write_text(json.dumps({"identities": [{**entry, "max_streams": 1}]}))
    server = await start(etcd, prefix, auth_file=auth)
    try:
        async with (
            httpx.AsyncClient(base_url=url(server), headers=bearer(VIEWER), timeout=10) as http,
            http.stream("GET", "/v1/changes") as first,
        ):
            assert first.status_code == 200
            await anext(first.aiter_lines())  # live
            second = await http.get("/v1/changes")
            assert second.status_code == 429
            assert "limit" in error_of(second)["message"]
            # Unary calls are not streams: still served.
            assert (await http.get("/v1/flags")).status_code == 200
    finally:
        await server.stop(grace=0)


async def test_a_watch_whose_token_is_revoked_ends_with_unauthenticated(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    auth = tmp_path / "auth.json"
    viewer = {"name": "dashboards", "role": "viewer", "token_sha256": hash_token(VIEWER)}
    operator = {"name": "oncall", "role": "operator", "token_sha256": hash_token(OPERATOR)}
    auth.write_text(json.dumps({"identities": [viewer, operator]}))
    server = await start(etcd, prefix, auth_file=auth)
    try:
        async with (
            httpx.AsyncClient(base_url=url(server), timeout=10) as http,
            http.stream("GET", "/v1/changes", headers=bearer(VIEWER)) as stream,
        ):
            lines = stream.aiter_lines()
            await anext(lines)  # live
            auth.write_text(json.dumps({"identities": [operator]}))
            assert server.reload()
            last = json.loads(await anext(lines))
            assert last["error"]["code"] == "UNAUTHENTICATED"
            assert "revoked" in last["error"]["message"]
            with pytest.raises(StopAsyncIteration):
                await anext(lines)
            assert (await http.get("/v1/flags", headers=bearer(VIEWER))).status_code == 401
    finally:
        await server.stop(grace=0)


async def test_a_bad_watch_is_refused_before_streaming(client: httpx.AsyncClient) -> None:
    refused = await client.get("/v1/changes", params={"service": "Not A Service"})
    assert refused.status_code == 400
    assert error_of(refused)["code"] == "INVALID_ARGUMENT"


async def test_an_incident_that_is_no_incident_id_is_refused(
    client: httpx.AsyncClient, grpc_stub: mitigation_pb2_grpc.MitigationServiceStub
) -> None:
    """GetTimeline and ListHistory's incident filter take an incident id, as /openapi.json
    says: anything else is a 400 (it answered 200 with an empty timeline)."""
    timeline = await client.get("/v1/incidents/%C2%8D%C3%99/timeline")
    assert timeline.status_code == 400, timeline.text
    assert error_of(timeline)["message"].startswith("incident: ")
    history = await client.get("/v1/history", params={"incident": "INC 7"})
    assert history.status_code == 400, history.text
    assert error_of(history)["message"].startswith("incident: 'INC 7' is not an incident id")
    with pytest.raises(grpc.aio.AioRpcError) as over_grpc:
        await grpc_stub.GetTimeline(m.GetTimelineRequest(incident="INC\n7"))
    assert over_grpc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    # As the document's pattern says: a read takes the id as written, with no spaces.
    padded = await client.get("/v1/incidents/%20INC-7/timeline")
    assert padded.status_code == 400, padded.text


# ---- the document ----


async def test_openapi_is_served_valid_and_covers_every_route(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    served = {(verb.upper(), path) for path, item in document["paths"].items() for verb in item}
    ofrep = {("POST", EVALUATE_PATH), ("POST", BULK_PATH), ("GET", EVENTS_PATH)}
    ofrep.add(("POST", "/v1/alertmanager"))
    assert served == {(route.verb, route.path) for route in ROUTES} | ofrep


# ---- the command ----


def test_serve_http_in_a_process_and_a_port_in_use(etcd: EmbeddedEtcd, prefix: str) -> None:
    server = ServerProcess(etcd.endpoint, prefix, extra_args=["--http", "127.0.0.1:0"])
    try:
        line = server.wait_output(r"listening on .*; HTTP (http://127\.0\.0\.1:(\d+))\)")
        base, port = line.group(1), line.group(2)
        listed = httpx.get(f"{base}/v1/flags", timeout=10)
        assert listed.status_code == 200 and listed.json()["flags"] == []
        # A second server on that HTTP port: one line naming the port, holder and option.
        second = subprocess.run(
            [
                sys.executable, "-m", "controlplane.server", "serve", "--listen", "127.0.0.1:0",
                "--etcd", etcd.endpoint, "--prefix", prefix, "--metrics", "off",
                "--http", f"127.0.0.1:{port}",
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 1
        errors = [line for line in second.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, second.stderr
        assert re.fullmatch(
            rf"Error: 127\.0\.0\.1:{port} \(HTTP\) is in use by pid {server.proc.pid} \(\S+\): "
            r"stop it or pick another port with --http HOST:PORT, or leave --http out",
            errors[0],
        ), errors[0]
    finally:
        server.stop()


def test_every_worker_serves_http(etcd: EmbeddedEtcd, prefix: str) -> None:
    """--workers 2: the HTTP port is shared (SO_REUSEPORT) like the gRPC one; new
    connections reach both workers (each logs its own `http` lines)."""
    server = ServerProcess(
        etcd.endpoint, prefix, extra_args=["--workers", "2", "--http", "127.0.0.1:0"]
    )
    try:
        line = server.wait_output(r"listening on .*\(2 workers.*; HTTP (http://127\.0\.0\.1:\d+)\)")
        base = line.group(1)
        served_by: set[int] = set()
        for _ in range(200):  # each request on a connection of its own
            before = len(server.output)
            assert httpx.get(f"{base}/v1/flags", timeout=10).status_code == 200
            # Its log line names the worker that served it.
            logged = server.wait_output(r'"event": "http"', start=before)
            worker = re.search(r'"worker": (\d+)', logged.string)
            assert worker is not None, logged.string
            served_by.add(int(worker.group(1)))
            if served_by == {0, 1}:
                break
        assert served_by == {0, 1}
    finally:
        server.stop()
