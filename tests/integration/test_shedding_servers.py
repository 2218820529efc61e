"""The shedding middleware in real servers, each answering a few thousand requests.

- a ``grpc.server`` and a ``grpc.aio.server`` with the interceptors: every RPC kind
  shed before the service runs, status, details and pushback as a client sees
  them, and the shed share following a StaticAgent's level;
- the asyncio server with a real AsyncAgent on a real control server: SetShedding
  and ClearShedding show in the shed share within a second;
- an ASGI app under uvicorn (in a thread) and a WSGI app under gunicorn (two
  worker processes, each with a real Agent): the same, over HTTP.

Shares are checked within 4 points of the set percentage over 3000 requests: more
than 4.5 standard deviations at 20-30 %, so a correct shedder fails about once in
a few hundred thousand runs, and one shedding at, say, 25 % instead of 30 % fails
every time.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from prometheus_client import CollectorRegistry

from agents import AsyncAgent, Criticality
from agents.shedding import (
    DECISIONS_METRIC,
    AioShedInterceptor,
    ASGIShedder,
    ShedInterceptor,
)
from agents.testing import StaticAgent
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.server import ControlServer
from tests.helpers.shed_apps import (
    KINDS,
    ASGIApp,
    Calls,
    EchoClient,
    HttpClient,
    Reply,
    UvicornThread,
    aio_echo_handler,
    listening_socket,
    sync_echo_handler,
)

Stub = mitigation_pb2_grpc.MitigationServiceStub
ROOT = Path(__file__).resolve().parents[2]
SERVICE = "checkout"
TOLERANCE = 0.04
"""How far a measured share may be from the set one (3000 requests)."""
WITHIN = 1.0
"""Seconds from a SetShedding/ClearShedding call to its effect on requests."""
PROBE_LIMIT = 10.0
"""Seconds a probe goes on before giving up (and the test reporting how long it took)."""

Tally = collections.Counter[tuple[str, bool]]
"""(criticality, shed) -> requests."""


def plan(main: str, n: int, *others: str, every: int = 10) -> list[str]:
    """``n`` requests of ``main``, with one of each of ``others`` after every
    ``every``-th: the other tiers are checked all along, not only before or after."""
    order: list[str] = []
    for i in range(1, n + 1):
        order.append(main)
        if i % every == 0:
            order.extend(others)
    return order


def share(tally: Tally, criticality: str) -> float:
    shed, admitted = tally[(criticality, True)], tally[(criticality, False)]
    assert shed + admitted > 0, f"no {criticality} requests"
    return shed / (shed + admitted)


def assert_counted(registry: CollectorRegistry, tally: Tally) -> None:
    """The middleware's counter agrees with what the clients saw, to the request."""
    for tier in Criticality:
        for shed in (True, False):
            got = registry.get_sample_value(
                DECISIONS_METRIC,
                {"criticality": tier.name, "outcome": "shed" if shed else "admitted"},
            )
            assert got == tally[(tier.name, shed)], (tier.name, shed, got)


def write_options() -> t.WriteOptions:
    return t.WriteOptions(reason="shedding test", actor="oncall")


# ---------------------------------------------------------------- gRPC


@contextlib.asynccontextmanager
async def echo_server(
    flavour: str, agent: Any, registry: CollectorRegistry, **options: Any
) -> AsyncIterator[tuple[str, Calls]]:
    """The echo service on 127.0.0.1:0 behind the interceptor of ``flavour``."""
    calls = Calls()
    if flavour == "sync":
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            server = grpc.server(
                pool, interceptors=[ShedInterceptor(agent, registry=registry, **options)]
            )
            server.add_generic_rpc_handlers((sync_echo_handler(calls),))
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            try:
                yield f"127.0.0.1:{port}", calls
            finally:
                server.stop(None).wait()
    else:
        aio_server = grpc.aio.server(
            interceptors=[AioShedInterceptor(agent, registry=registry, **options)]
        )
        aio_server.add_generic_rpc_handlers((aio_echo_handler(calls),))
        port = aio_server.add_insecure_port("127.0.0.1:0")
        await aio_server.start()
        try:
            yield f"127.0.0.1:{port}", calls
        finally:
            await aio_server.stop(None)


def send_calls(client: EchoClient, order: list[str]) -> Tally:
    """Unary calls with these criticalities; fails on any status but OK or shed."""
    tally: Tally = collections.Counter()
    for criticality in order:
        outcome = client.call("UnaryUnary", criticality)
        assert outcome.shed or outcome.code is grpc.StatusCode.OK, outcome
        tally[(criticality, outcome.shed)] += 1
    return tally


def probe_calls(client: EchoClient, criticality: str, *, shed: bool, since: float) -> float:
    """Call until one call's outcome is ``shed``; the seconds since ``since``."""
    while True:
        if client.call("UnaryUnary", criticality).shed is shed:
            return time.monotonic() - since
        if time.monotonic() - since > PROBE_LIMIT:
            raise AssertionError(f"no {criticality} call {'shed' if shed else 'admitted'}")


@pytest.mark.parametrize("flavour", ["sync", "aio"])
async def test_every_kind_of_call_is_shed_before_the_service_runs(flavour: str) -> None:
    registry = CollectorRegistry()
    agent = StaticAgent(service=SERVICE, shedding=("SHEDDABLE_PLUS", 30))
    async with echo_server(flavour, agent, registry, retry_after_ms=250) as (address, calls):

        def run() -> dict[str, Any]:
            with EchoClient(address) as client:
                return {
                    kind: (
                        client.call(kind, "SHEDDABLE"),
                        client.call(kind, "critical"),
                        client.call(kind),
                    )
                    for kind in KINDS
                }

        results = await asyncio.to_thread(run)
    echoed = {
        "UnaryUnary": [b"hi"],
        "UnaryStream": [b"hi", b"hi"],
        "StreamUnary": [b"hihi"],
        "StreamStream": [b"hi", b"hi"],
    }
    for kind, (shed, critical, plain) in results.items():
        assert shed.code is grpc.StatusCode.RESOURCE_EXHAUSTED, (kind, shed)
        assert shed.details == (
            "load shedding: SHEDDABLE_PLUS 30% for checkout; request criticality SHEDDABLE"
        )
        assert shed.trailing.get("grpc-retry-pushback-ms") == "250", (kind, shed.trailing)
        assert shed.responses == []
        for admitted in (critical, plain):
            assert admitted.code is grpc.StatusCode.OK, (kind, admitted)
            assert admitted.responses == echoed[kind]
            assert "grpc-retry-pushback-ms" not in admitted.trailing
        # The service's code ran for the two admitted calls only.
        assert calls[kind] == 2, kind
    assert_counted(registry, collections.Counter({("SHEDDABLE", True): 4, ("CRITICAL", False): 8}))


@pytest.mark.parametrize("flavour", ["sync", "aio"])
async def test_the_shed_share_follows_the_level(flavour: str) -> None:
    registry = CollectorRegistry()
    agent = StaticAgent(service=SERVICE)
    async with echo_server(flavour, agent, registry) as (address, calls):
        with EchoClient(address) as client:
            none = await asyncio.to_thread(send_calls, client, plan("SHEDDABLE", 500))
            agent.set_shedding("SHEDDABLE", 30)
            thirty = await asyncio.to_thread(
                send_calls, client, plan("SHEDDABLE", 3000, "SHEDDABLE_PLUS")
            )
            agent.set_shedding("CRITICAL", 20)
            twenty = await asyncio.to_thread(
                send_calls, client, plan("CRITICAL", 3000, "SHEDDABLE_PLUS", "CRITICAL_PLUS")
            )
    assert none == {("SHEDDABLE", False): 500}
    assert abs(share(thirty, "SHEDDABLE") - 0.30) < TOLERANCE, thirty
    assert share(thirty, "SHEDDABLE_PLUS") == 0
    assert abs(share(twenty, "CRITICAL") - 0.20) < TOLERANCE, twenty
    assert share(twenty, "SHEDDABLE_PLUS") == 1
    assert share(twenty, "CRITICAL_PLUS") == 0
    total = none + thirty + twenty
    assert calls["UnaryUnary"] == sum(n for (_, shed), n in total.items() if not shed)
    assert_counted(registry, total)


async def test_a_real_agent_follows_set_shedding_within_a_second(
    server: ControlServer, stub: Stub
) -> None:
    registry = CollectorRegistry()
    async with AsyncAgent(SERVICE, [server.address]) as agent:
        assert await agent.wait_ready(10)
        async with echo_server("aio", agent, registry) as (address, _):
            with EchoClient(address) as client:
                before = await asyncio.to_thread(send_calls, client, plan("SHEDDABLE", 300))

                start = time.monotonic()
                await stub.SetShedding(
                    m.SetSheddingRequest(
                        service=SERVICE, tier="SHEDDABLE", percent=30, options=write_options()
                    )
                )
                to_thirty = await asyncio.to_thread(
                    probe_calls, client, "SHEDDABLE", shed=True, since=start
                )
                thirty = await asyncio.to_thread(
                    send_calls, client, plan("SHEDDABLE", 3000, "SHEDDABLE_PLUS")
                )

                start = time.monotonic()
                await stub.SetShedding(
                    m.SetSheddingRequest(
                        service=SERVICE, tier="SHEDDABLE_PLUS", percent=100, options=write_options()
                    )
                )
                # Never shed at 30 % of SHEDDABLE: the first one shed is the new level.
                to_all = await asyncio.to_thread(
                    probe_calls, client, "SHEDDABLE_PLUS", shed=True, since=start
                )
                everything = await asyncio.to_thread(
                    send_calls, client, plan("SHEDDABLE_PLUS", 500, "SHEDDABLE", "CRITICAL")
                )

                start = time.monotonic()
                await stub.ClearShedding(
                    m.ClearSheddingRequest(service=SERVICE, options=write_options())
                )
                # Always shed at the level before: the first one admitted is the change.
                to_none = await asyncio.to_thread(
                    probe_calls, client, "SHEDDABLE", shed=False, since=start
                )
                after = await asyncio.to_thread(send_calls, client, plan("SHEDDABLE", 300))
    assert before == {("SHEDDABLE", False): 300}
    assert to_thirty < WITHIN
    assert abs(share(thirty, "SHEDDABLE") - 0.30) < TOLERANCE, thirty
    assert share(thirty, "SHEDDABLE_PLUS") == 0
    assert to_all < WITHIN
    assert share(everything, "SHEDDABLE_PLUS") == 1
    assert share(everything, "SHEDDABLE") == 1
    assert share(everything, "CRITICAL") == 0
    assert to_none < WITHIN
    assert after == {("SHEDDABLE", False): 300}


# ---------------------------------------------------------------- HTTP


def send_requests(client: HttpClient, order: list[str], pids: set[str] | None = None) -> Tally:
    """GET / with these criticalities; fails on any status but 200 or 503."""
    tally: Tally = collections.Counter()
    for criticality in order:
        reply = client.get("/", criticality)
        assert reply.status in (200, 503), reply
        tally[(criticality, reply.status == 503)] += 1
        if pids is not None:
            pids.add(reply.headers["x-worker-pid"])
    return tally


def probe_requests(
    client: HttpClient,
    criticality: str,
    *,
    shed: bool,
    since: float,
    workers: set[str] | None = None,
) -> float:
    """GET until a reply is (or is not) a 503, from each of ``workers`` (by their
    ``X-Worker-Pid``) when given; the seconds since ``since``."""
    waiting = set(workers) if workers else {"any"}
    while True:
        reply = client.get("/", criticality)
        if (reply.status == 503) is shed:
            waiting.discard(reply.headers.get("x-worker-pid", "any") if workers else "any")
            if not waiting:
                return time.monotonic() - since
        if time.monotonic() - since > PROBE_LIMIT:
            raise AssertionError(
                f"no {criticality} request {'shed' if shed else 'admitted'} by {sorted(waiting)}"
            )


def assert_shed_reply(reply: Reply, level: str, criticality: str) -> None:
    assert reply.status == 503
    assert reply.headers["retry-after"] == "1"
    assert reply.headers["content-type"].startswith("text/plain")
    assert reply.body == (
        f"load shedding: {level} for checkout; request criticality {criticality}\n".encode()
    )


def test_asgi_app_under_uvicorn() -> None:
    registry = CollectorRegistry()
    # Everything a request could be is shed at this level; the lifespan is no request.
    agent = StaticAgent(service=SERVICE, shedding=("CRITICAL_PLUS", 100))
    app = ASGIApp()
    uvicorn_server = UvicornThread(ASGIShedder(app, agent, registry=registry))
    with uvicorn_server, HttpClient(uvicorn_server.port) as client:
        # Answered once the app's lifespan startup went through the shedder.
        everything = send_requests(client, ["CRITICAL_PLUS", "CRITICAL"])
        assert app.lifespan == ["startup"]
        assert_shed_reply(client.get("/", "sheddable"), "CRITICAL_PLUS 100%", "SHEDDABLE")
        agent.set_shedding("SHEDDABLE", 30)
        thirty = send_requests(client, plan("SHEDDABLE", 3000, "SHEDDABLE_PLUS", "CRITICAL"))
        plus_reply = client.get("/", "SHEDDABLE_PLUS")
        assert (plus_reply.status, plus_reply.body) == (200, b"ok")
        agent.clear_shedding()
        none = send_requests(client, plan("SHEDDABLE", 300))
    assert app.lifespan == ["startup", "shutdown"]
    assert everything == {("CRITICAL_PLUS", True): 1, ("CRITICAL", True): 1}
    assert abs(share(thirty, "SHEDDABLE") - 0.30) < TOLERANCE, thirty
    assert share(thirty, "SHEDDABLE_PLUS") == 0
    assert share(thirty, "CRITICAL") == 0
    assert none == {("SHEDDABLE", False): 300}
    total = everything + thirty + none
    total[("SHEDDABLE", True)] += 1  # the reply checked on its own
    total[("SHEDDABLE_PLUS", False)] += 1
    # The app saw exactly the admitted requests.
    assert app.calls["/"] == sum(n for (_, shed), n in total.items() if not shed)
    assert_counted(registry, total)


@contextlib.contextmanager
def gunicorn(tmp_path: Path, servers: str, workers: int) -> Iterator[int]:
    """``tests.helpers.shed_wsgi_app`` under gunicorn on a socket bound here (its
    port is yielded): requests wait in the backlog until a worker serves them."""
    sock = listening_socket()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTROLPLANE_")}
    env.update(
        CONTROLPLANE_SERVICE=SERVICE,
        CONTROLPLANE_SERVERS=servers,
        CONTROLPLANE_VERSION="v-shed",
        PYTHONUNBUFFERED="1",
        # Newer gunicorn opens a control socket under $HOME/.gunicorn: keep it in the test's.
        HOME=str(tmp_path),
    )
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--workers",
                str(workers),
                "--bind",
                f"fd://{sock.fileno()}",
                "--graceful-timeout",
                "5",
                "tests.helpers.shed_wsgi_app:app",
            ],
            cwd=ROOT,
            env=env,
            pass_fds=(sock.fileno(),),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        yield sock.getsockname()[1]
    except BaseException:
        print(log_path.read_text()[-5000:])
        raise
    finally:
        sock.close()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ready_workers(client: HttpClient, workers: int, within: float) -> set[str]:
    """Ask ``/agent`` until ``workers`` distinct workers answered READY."""
    ready: set[str] = set()
    deadline = time.monotonic() + within
    while len(ready) < workers:
        assert time.monotonic() < deadline, f"ready workers: {sorted(ready)} of {workers}"
        answer = json.loads(client.get("/agent").body)
        if answer["state"] == "READY":
            ready.add(str(answer["pid"]))
        else:
            ready.discard(str(answer["pid"]))
    return ready


async def test_wsgi_app_under_gunicorn_with_real_agents(
    server: ControlServer, stub: Stub, tmp_path: Path
) -> None:
    workers = 2
    with gunicorn(tmp_path, server.address, workers) as port, HttpClient(port) as client:
        pids = await asyncio.to_thread(ready_workers, client, workers, 30)
        before = await asyncio.to_thread(send_requests, client, plan("SHEDDABLE", 300))

        start = time.monotonic()
        await stub.SetShedding(
            m.SetSheddingRequest(
                service=SERVICE, tier="SHEDDABLE_PLUS", percent=30, options=write_options()
            )
        )
        to_thirty = await asyncio.to_thread(
            probe_requests, client, "SHEDDABLE", shed=True, since=start, workers=pids
        )
        answered: set[str] = set()
        thirty = await asyncio.to_thread(
            send_requests,
            client,
            plan("SHEDDABLE_PLUS", 3000, "SHEDDABLE", "CRITICAL"),
            answered,
        )
        shed_reply = await asyncio.to_thread(client.get, "/", "SHEDDABLE")

        start = time.monotonic()
        await stub.ClearShedding(m.ClearSheddingRequest(service=SERVICE, options=write_options()))
        # Every SHEDDABLE request was shed at the level before: the first one each
        # worker admits is the change reaching it.
        to_none = await asyncio.to_thread(
            probe_requests, client, "SHEDDABLE", shed=False, since=start, workers=pids
        )
        after = await asyncio.to_thread(send_requests, client, plan("SHEDDABLE", 300))
    assert before == {("SHEDDABLE", False): 300}
    assert to_thirty < WITHIN
    assert abs(share(thirty, "SHEDDABLE_PLUS") - 0.30) < TOLERANCE, thirty
    assert share(thirty, "SHEDDABLE") == 1
    assert share(thirty, "CRITICAL") == 0
    # Both workers answered and both shed (every SHEDDABLE request was shed).
    assert answered == pids
    assert_shed_reply(shed_reply, "SHEDDABLE_PLUS 30%", "SHEDDABLE")
    assert shed_reply.headers["x-worker-pid"] in pids
    assert to_none < WITHIN
    assert after == {("SHEDDABLE", False): 300}
