"""The shedding middleware over a StaticAgent: criticality, decisions, replies, counts.

Every door (WSGI, ASGI, the sync and the asyncio gRPC interceptor) is driven the
way its server drives it: a WSGI call with an environ, an ASGI call with a scope,
``intercept_service`` with the call's method and metadata. Whether a gRPC call
was shed is whether the interceptor replaced the service's handler; what a shed
call receives on the wire is in tests/integration/test_shedding_servers.py.
"""

from __future__ import annotations

import abc
import asyncio
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from agents import Criticality
from agents.shedding import (
    DECISIONS_METRIC,
    AioShedInterceptor,
    ASGIShedder,
    ShedInterceptor,
    WSGIShedder,
    request_criticality,
)
from agents.testing import StaticAgent
from tests.helpers.shed_apps import ASGIApp, Calls, Reply, wsgi_ok

TIERS = [c.name for c in Criticality]


class Ticks:
    """A random source for the tier itself: 0.00, 0.01, ..., 0.99, and again.

    100 requests of the tier see each value once, so exactly ``percent`` of
    them fall below ``percent / 100``.
    """

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> float:
        value = (self.calls % 100) / 100
        self.calls += 1
        return value


def no_rand() -> float:
    raise AssertionError("a decision by key must not draw a random number")


# ---------------------------------------------------------------- doors


class CallDetails(grpc.HandlerCallDetails):
    """What a gRPC server gives an interceptor: the method and the metadata."""

    def __init__(self, method: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = method
        self.invocation_metadata = metadata


class Door(abc.ABC):
    """One kind of middleware around a service that counts the requests it serves.

    ``route`` and ``user`` read a request as the door hands it to ``classifier``
    and ``key`` (environ, scope, call details).
    """

    name = ""

    def __init__(self) -> None:
        self.calls = Calls()
        self.loop = asyncio.new_event_loop()

    @abc.abstractmethod
    def build(self, agent: Any, **kwargs: Any) -> None:
        """Wrap the door's app or server with the middleware under test."""

    @abc.abstractmethod
    def shed(
        self, criticality: str | None = None, path: str = "/", user: str | None = None
    ) -> bool:
        """Send one request; whether it was shed."""

    @abc.abstractmethod
    def route(self, request: Any) -> str:
        """The request's path, as the door's classifier sees it."""

    @abc.abstractmethod
    def user(self, request: Any) -> str | None:
        """The request's user, as the door's key function sees it."""

    def close(self) -> None:
        self.loop.close()


class WSGIDoor(Door):
    name = "wsgi"

    def build(self, agent: Any, **kwargs: Any) -> None:
        self.app = WSGIShedder(wsgi_ok(self.calls), agent, **kwargs)

    def reply(
        self, criticality: str | None = None, path: str = "/", user: str | None = None
    ) -> Reply:
        environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": path}
        if criticality is not None:
            environ["HTTP_X_CRITICALITY"] = criticality
        if user is not None:
            environ["HTTP_X_USER"] = user
        started: list[tuple[str, list[tuple[str, str]]]] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            started.append((status, headers))

        body = b"".join(self.app(environ, start_response))
        ((status, headers),) = started
        return Reply(int(status.split()[0]), {k.lower(): v for k, v in headers}, body)

    def shed(
        self, criticality: str | None = None, path: str = "/", user: str | None = None
    ) -> bool:
        before = self.calls.total()
        reply = self.reply(criticality, path, user)
        assert (reply.status == 503) == (self.calls.total() == before)
        return reply.status == 503

    def route(self, request: Any) -> str:
        return str(request["PATH_INFO"])

    def user(self, request: Any) -> str | None:
        user = request.get("HTTP_X_USER")
        return None if user is None else str(user)


class ASGIDoor(Door):
    name = "asgi"

    def build(self, agent: Any, **kwargs: Any) -> None:
        self.inner = ASGIApp()
        self.calls = self.inner.calls
        self.app = ASGIShedder(self.inner, agent, **kwargs)

    def run(self, scope: dict[str, Any], inbox: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return inbox.pop(0)

        async def send(message: Any) -> None:
            sent.append(dict(message))

        self.loop.run_until_complete(self.app(scope, receive, send))
        return sent

    def reply(
        self, criticality: str | None = None, path: str = "/", user: str | None = None
    ) -> Reply:
        headers = [(b"host", b"example")]
        if criticality is not None:
            headers.append((b"x-criticality", criticality.encode()))
        if user is not None:
            headers.append((b"x-user", user.encode()))
        scope = {"type": "http", "method": "GET", "path": path, "headers": headers}
        sent = self.run(scope, [{"type": "http.request", "body": b"", "more_body": False}])
        start, body = sent
        assert start["type"] == "http.response.start" and body["type"] == "http.response.body"
        return Reply(
            start["status"],
            {k.decode(): v.decode() for k, v in start["headers"]},
            body["body"],
        )

    def shed(
        self, criticality: str | None = None, path: str = "/", user: str | None = None
    ) -> bool:
        before = self.calls.total()
        reply = self.reply(criticality, path, user)
        assert (reply.status == 503) == (self.calls.total() == before)
        return reply.status == 503

    def route(self, request: Any) -> str:
        return str(request["path"])

    def user(self, request: Any) -> str | None:
        for name, value in request["headers"]:
            if name == b"x-user":
                return str(value.decode())
        return None


def _identity(message: bytes) -> bytes:
    return message


class GrpcDoor(Door):
    name = "grpc"

    def build(self, agent: Any, **kwargs: Any) -> None:
        self.interceptor = ShedInterceptor(agent, **kwargs)
        self.handler = self.echo_handler()

    def echo_handler(self) -> Any:
        def serve(request: bytes, context: Any) -> Iterator[bytes]:
            self.calls.add(request.decode())
            yield request

        return grpc.unary_stream_rpc_method_handler(
            serve, request_deserializer=_identity, response_serializer=_identity
        )

    def details(self, criticality: str | None, path: str, user: str | None) -> CallDetails:
        metadata = [("user-agent", "test")]
        if criticality is not None:
            metadata.append(("x-criticality", criticality))
        if user is not None:
            metadata.append(("x-user", user))
        return CallDetails(path, tuple(metadata))

    def intercept(self, details: CallDetails) -> Any:
        return self.interceptor.intercept_service(lambda _: self.handler, details)

    def shed(
        self, criticality: str | None = None, path: str = "/", user: str | None = None
    ) -> bool:
        got = self.intercept(self.details(criticality, path, user))
        assert (got.request_streaming, got.response_streaming) == (False, True)
        assert got.unary_stream is not None
        if got.response_serializer is _identity:
            # The service's handler, run under the request's criticality: it runs.
            before = self.calls.total()
            assert list(got.unary_stream(path.encode(), None)) == [path.encode()]
            assert self.calls.total() == before + 1
            return False
        # A handler of the same kind that ends the call instead, without (de)serializers.
        assert got.request_deserializer is None
        return True

    def route(self, request: Any) -> str:
        return str(request.method)

    def user(self, request: Any) -> str | None:
        return dict(request.invocation_metadata).get("x-user")


class AioGrpcDoor(GrpcDoor):
    name = "grpc.aio"

    def build(self, agent: Any, **kwargs: Any) -> None:
        self.interceptor = AioShedInterceptor(agent, **kwargs)  # type: ignore[assignment]
        self.handler = self.echo_handler()

    def intercept(self, details: CallDetails) -> Any:
        async def continuation(_: Any) -> Any:
            return self.handler

        return self.loop.run_until_complete(
            self.interceptor.intercept_service(continuation, details)  # type: ignore[arg-type]
        )


DOORS: dict[str, type[Door]] = {d.name: d for d in (WSGIDoor, ASGIDoor, GrpcDoor, AioGrpcDoor)}


@pytest.fixture(params=list(DOORS))
def door(request: pytest.FixtureRequest) -> Iterator[Door]:
    made = DOORS[request.param]()
    yield made
    made.close()


@pytest.fixture(params=["wsgi", "asgi"])
def http_door(request: pytest.FixtureRequest) -> Iterator[WSGIDoor | ASGIDoor]:
    made = DOORS[request.param]()
    assert isinstance(made, WSGIDoor | ASGIDoor)
    yield made
    made.close()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def decisions(registry: CollectorRegistry, criticality: str, outcome: str) -> float | None:
    return registry.get_sample_value(
        DECISIONS_METRIC, {"criticality": criticality, "outcome": outcome}
    )


# ---------------------------------------------------------------- criticality


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("SHEDDABLE", Criticality.SHEDDABLE),
        ("sheddable", Criticality.SHEDDABLE),
        ("Sheddable_Plus", Criticality.SHEDDABLE_PLUS),
        ("critical_plus", Criticality.CRITICAL_PLUS),
        ("CRITICAL", Criticality.CRITICAL),
        (b"SHEDDABLE_PLUS", Criticality.SHEDDABLE_PLUS),
        (None, Criticality.CRITICAL),
        ("", Criticality.CRITICAL),
        ("low", Criticality.CRITICAL),
        ("SHEDDABLE, CRITICAL", Criticality.CRITICAL),
        ("4", Criticality.CRITICAL),
        (b"\xff\xfe", Criticality.CRITICAL),
    ],
    ids=repr,
)
def test_request_criticality_reads_the_four_tier_names_in_any_case(
    value: str | bytes | None, expected: Criticality
) -> None:
    assert request_criticality(value) is expected


@pytest.mark.parametrize(
    ("header", "shed"),
    [
        ("SHEDDABLE", True),
        ("sheddable", True),
        ("Sheddable_Plus", True),
        ("CRITICAL", False),
        ("critical_plus", False),
        (None, False),
        ("", False),
        ("sheddable-ish", False),
        ("SHEDDABLE_PLUS_PLUS", False),
    ],
    ids=repr,
)
def test_the_header_names_the_criticality_anything_else_is_critical(
    door: Door, registry: CollectorRegistry, header: str | None, shed: bool
) -> None:
    door.build(StaticAgent(shedding=("SHEDDABLE_PLUS", 100)), registry=registry)
    assert door.shed(header) is shed
    # Counted under the criticality the header gave (CRITICAL for anything else).
    counted = request_criticality(header).name
    assert decisions(registry, counted, "shed" if shed else "admitted") == 1


# ---------------------------------------------------------------- the shedding table


@pytest.mark.parametrize(
    ("level", "shed_per_hundred"),
    [
        (
            ("SHEDDABLE", 30),
            {"SHEDDABLE": 30, "SHEDDABLE_PLUS": 0, "CRITICAL": 0, "CRITICAL_PLUS": 0},
        ),
        (
            ("SHEDDABLE_PLUS", 100),
            {"SHEDDABLE": 100, "SHEDDABLE_PLUS": 100, "CRITICAL": 0, "CRITICAL_PLUS": 0},
        ),
        (
            ("CRITICAL", 20),
            {"SHEDDABLE": 100, "SHEDDABLE_PLUS": 100, "CRITICAL": 20, "CRITICAL_PLUS": 0},
        ),
        (None, {"SHEDDABLE": 0, "SHEDDABLE_PLUS": 0, "CRITICAL": 0, "CRITICAL_PLUS": 0}),
    ],
    ids=["30", "100-SHEDDABLE_PLUS", "20-CRITICAL", "none"],
)
def test_design_table(
    door: Door,
    registry: CollectorRegistry,
    level: tuple[str, float] | None,
    shed_per_hundred: dict[str, int],
) -> None:
    ticks = Ticks()
    door.build(StaticAgent(service="checkout", shedding=level, rand=ticks), registry=registry)
    seen = {tier: sum(door.shed(tier) for _ in range(100)) for tier in TIERS}
    assert seen == shed_per_hundred
    # Only the tier itself is decided at random.
    tier_requests = 100 if level is not None and level[1] not in (0, 100) else None
    if tier_requests is not None:
        assert ticks.calls == tier_requests
    # Served: exactly the admitted ones.
    assert door.calls.total() == 400 - sum(seen.values())
    for tier, shed in seen.items():
        assert decisions(registry, tier, "shed") == shed
        assert decisions(registry, tier, "admitted") == 100 - shed


def test_a_flip_applies_to_the_next_request(door: Door, registry: CollectorRegistry) -> None:
    agent = StaticAgent(service="checkout")
    door.build(agent, registry=registry)
    assert not door.shed("SHEDDABLE")
    agent.set_shedding("SHEDDABLE", 100)
    assert door.shed("SHEDDABLE")
    agent.clear_shedding()
    assert not door.shed("SHEDDABLE")


# ---------------------------------------------------------------- classifier and key


def test_the_classifier_overrides_the_header_when_it_returns_a_criticality(
    door: Door, registry: CollectorRegistry
) -> None:
    seen: list[str] = []

    def classifier(request: Any) -> Criticality | str | None:
        route = door.route(request)
        seen.append(route)
        if route == "/batch":
            return "sheddable"
        if route == "/checkout":
            return Criticality.CRITICAL_PLUS
        if route == "/odd":
            return "no-such-tier"
        return None  # the header decides

    door.build(StaticAgent(shedding=("CRITICAL", 100)), classifier=classifier, registry=registry)
    # "/batch" is SHEDDABLE whatever the header says.
    assert door.shed("CRITICAL_PLUS", path="/batch") is True
    # "/checkout" is CRITICAL_PLUS whatever the header says.
    assert door.shed("SHEDDABLE", path="/checkout") is False
    # Anything else the classifier returns counts as CRITICAL (shed at this level), not
    # as the header's CRITICAL_PLUS.
    assert door.shed("CRITICAL_PLUS", path="/odd") is True
    # None: the header.
    assert door.shed("CRITICAL_PLUS", path="/other") is False
    assert door.shed("SHEDDABLE", path="/other") is True
    assert seen == ["/batch", "/checkout", "/odd", "/other", "/other"]
    assert decisions(registry, "SHEDDABLE", "shed") == 2
    assert decisions(registry, "CRITICAL_PLUS", "admitted") == 2
    assert decisions(registry, "CRITICAL", "shed") == 1


def test_a_key_makes_the_decision_stable_per_request_key(
    door: Door, registry: CollectorRegistry
) -> None:
    agent = StaticAgent(shedding=("SHEDDABLE", 30), rand=no_rand)
    door.build(agent, key=door.user, registry=registry)
    users = [f"user-{i}" for i in range(2000)]
    first = {u for u in users if door.shed("SHEDDABLE", user=u)}
    # The same users again, and again: the same decisions.
    assert {u for u in users if door.shed("SHEDDABLE", user=u)} == first
    assert {u for u in reversed(users) if door.shed("SHEDDABLE", user=u)} == first
    # About the set share of the keys (a fixed hash: no chance involved).
    assert abs(len(first) / len(users) - 0.30) < 0.03
    # A smaller share sheds a subset of the same users.
    agent.set_shedding("SHEDDABLE", 20)
    fewer = {u for u in users if door.shed("SHEDDABLE", user=u)}
    assert fewer < first
    assert abs(len(fewer) / len(users) - 0.20) < 0.03
    # Other tiers follow the table whatever the key.
    assert not door.shed("SHEDDABLE_PLUS", user=next(iter(first)))
    assert decisions(registry, "SHEDDABLE", "shed") == 3 * len(first) + len(fewer)


def test_a_key_function_returning_none_leaves_the_decision_to_chance(
    door: Door, registry: CollectorRegistry
) -> None:
    ticks = Ticks()
    door.build(
        StaticAgent(shedding=("SHEDDABLE", 50), rand=ticks), key=door.user, registry=registry
    )
    shed = sum(door.shed("SHEDDABLE") for _ in range(100))
    assert ticks.calls == 100
    assert shed == 50


class RecordingAgent:
    """An agent of our own: answers ``answer`` and records what it was asked."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.asked: list[tuple[object, object]] = []

    def should_shed(self, criticality: Criticality | str, key: str | None = None) -> bool:
        self.asked.append((criticality, key))
        return self.answer


@pytest.mark.parametrize("answer", [True, False])
def test_the_agents_decision_is_the_one_applied(
    door: Door, registry: CollectorRegistry, answer: bool
) -> None:
    agent = RecordingAgent(answer)
    door.build(agent, key=door.user, registry=registry)
    assert door.shed("sheddable_plus", user="u-7") is answer
    assert door.shed(None) is answer
    # The parsed criticality (a member, not the raw header) and the key.
    assert agent.asked == [(Criticality.SHEDDABLE_PLUS, "u-7"), (Criticality.CRITICAL, None)]
    assert all(type(c) is Criticality for c, _ in agent.asked)
    outcome = "shed" if answer else "admitted"
    assert decisions(registry, "SHEDDABLE_PLUS", outcome) == 1
    assert decisions(registry, "CRITICAL", outcome) == 1


def test_an_error_of_the_classifier_propagates(door: Door, registry: CollectorRegistry) -> None:
    def classifier(request: Any) -> str:
        raise LookupError("no route")

    door.build(StaticAgent(), classifier=classifier, registry=registry)
    with pytest.raises(LookupError, match="no route"):
        door.shed("SHEDDABLE")
    assert door.calls.total() == 0


# ---------------------------------------------------------------- metrics


def test_every_series_exists_from_the_start(door: Door, registry: CollectorRegistry) -> None:
    door.build(StaticAgent(), registry=registry)
    for tier in TIERS:
        assert decisions(registry, tier, "shed") == 0
        assert decisions(registry, tier, "admitted") == 0


def test_middleware_on_one_registry_share_the_counter(registry: CollectorRegistry) -> None:
    agent = StaticAgent(shedding=("SHEDDABLE", 100))
    doors = [WSGIDoor(), ASGIDoor(), GrpcDoor(), AioGrpcDoor()]
    try:
        for d in doors:
            d.build(agent, registry=registry)
        for d in doors:
            assert d.shed("SHEDDABLE")
            assert not d.shed("CRITICAL")
    finally:
        for d in doors:
            d.close()
    assert decisions(registry, "SHEDDABLE", "shed") == 4
    assert decisions(registry, "CRITICAL", "admitted") == 4


def test_without_a_registry_the_default_one_counts() -> None:
    before = REGISTRY.get_sample_value(
        DECISIONS_METRIC, {"criticality": "SHEDDABLE_PLUS", "outcome": "shed"}
    )
    d = WSGIDoor()
    try:
        d.build(StaticAgent(shedding=("SHEDDABLE_PLUS", 100)))
        d.build(StaticAgent(shedding=("SHEDDABLE_PLUS", 100)))  # registered once, not twice
        assert d.shed("SHEDDABLE_PLUS")
        assert d.shed("SHEDDABLE_PLUS")
    finally:
        d.close()
    after = REGISTRY.get_sample_value(
        DECISIONS_METRIC, {"criticality": "SHEDDABLE_PLUS", "outcome": "shed"}
    )
    assert after == (before or 0) + 2


def test_the_agents_read_path_counts_nothing(registry: CollectorRegistry) -> None:
    agent = StaticAgent(shedding=("SHEDDABLE", 100))
    WSGIDoor().build(agent, registry=registry)
    for _ in range(10):
        assert agent.should_shed("SHEDDABLE")  # a read of its own, not through the door
    assert decisions(registry, "SHEDDABLE", "shed") == 0


# ---------------------------------------------------------------- HTTP replies


def test_a_shed_http_request_gets_503_retry_after_and_the_level(
    http_door: WSGIDoor | ASGIDoor, registry: CollectorRegistry
) -> None:
    http_door.build(
        StaticAgent(service="checkout", shedding=("SHEDDABLE_PLUS", 30)), registry=registry
    )
    reply = http_door.reply("SHEDDABLE")
    assert reply.status == 503
    assert reply.headers["retry-after"] == "1"
    assert reply.headers["content-type"] == "text/plain; charset=utf-8"
    assert reply.headers["content-length"] == str(len(reply.body))
    assert reply.body == (
        b"load shedding: SHEDDABLE_PLUS 30% for checkout; request criticality SHEDDABLE\n"
    )
    assert http_door.calls.total() == 0
    ok = http_door.reply("CRITICAL")
    assert (ok.status, ok.body, "retry-after" in ok.headers) == (200, b"ok", False)
    assert http_door.calls.total() == 1


@pytest.mark.parametrize(
    ("retry_after_ms", "header"), [(1000, "1"), (1500, "2"), (1, "1"), (0, "0"), (60_000, "60")]
)
def test_retry_after_is_in_seconds_rounded_up(
    http_door: WSGIDoor | ASGIDoor, registry: CollectorRegistry, retry_after_ms: int, header: str
) -> None:
    http_door.build(
        StaticAgent(shedding=("SHEDDABLE", 100)), retry_after_ms=retry_after_ms, registry=registry
    )
    assert http_door.reply("SHEDDABLE").headers["retry-after"] == header


@pytest.mark.parametrize(
    ("level", "criticality", "text"),
    [
        (
            ("SHEDDABLE", 12.5),
            "SHEDDABLE",
            "SHEDDABLE 12.5% for shop; request criticality SHEDDABLE",
        ),
        (("CRITICAL", 100), None, "CRITICAL 100% for shop; request criticality CRITICAL"),
        (("CRITICAL", 0), "SHEDDABLE", "CRITICAL 0% for shop; request criticality SHEDDABLE"),
    ],
)
def test_the_body_names_the_level_in_force(
    http_door: WSGIDoor | ASGIDoor,
    registry: CollectorRegistry,
    level: tuple[str, float],
    criticality: str | None,
    text: str,
) -> None:
    # rand 0.0: the tier itself is shed at any percentage above 0.
    agent = StaticAgent(service="shop", shedding=level, rand=lambda: 0.0)
    http_door.build(agent, registry=registry)
    assert http_door.reply(criticality).body == f"load shedding: {text}\n".encode()


def test_an_agent_that_does_not_describe_its_level_still_gets_a_reply(
    http_door: WSGIDoor | ASGIDoor, registry: CollectorRegistry
) -> None:
    http_door.build(RecordingAgent(True), registry=registry)
    reply = http_door.reply("SHEDDABLE")
    assert reply.status == 503
    assert reply.body == b"load shedding; request criticality SHEDDABLE\n"


@pytest.mark.parametrize("scope_type", ["websocket", "lifespan"])
def test_asgi_passes_other_scopes_through_undecided(
    registry: CollectorRegistry, scope_type: str
) -> None:
    door = ASGIDoor()
    try:
        # Everything a request could be is shed at this level...
        door.build(StaticAgent(shedding=("CRITICAL_PLUS", 100)), registry=registry)
        assert door.shed("CRITICAL_PLUS")
        seen: list[str] = []

        async def inner(scope: Any, receive: Any, send: Any) -> None:
            seen.append(scope["type"])

        door.app.app = inner
        # ... but not a websocket or the lifespan.
        sent = door.run({"type": scope_type, "headers": [(b"x-criticality", b"SHEDDABLE")]}, [])
    finally:
        door.close()
    assert (seen, sent) == ([scope_type], [])
    assert decisions(registry, "SHEDDABLE", "shed") == 0
    assert decisions(registry, "CRITICAL_PLUS", "shed") == 1


def test_grpc_passes_unknown_methods_to_the_server_undecided(registry: CollectorRegistry) -> None:
    interceptor = ShedInterceptor(StaticAgent(shedding=("CRITICAL_PLUS", 100)), registry=registry)
    details = CallDetails("/no.Such/Method", (("x-criticality", "SHEDDABLE"),))
    # No handler: the server answers UNIMPLEMENTED, as without the interceptor.
    assert interceptor.intercept_service(lambda _: None, details) is None
    assert decisions(registry, "SHEDDABLE", "shed") == 0


# ---------------------------------------------------------------- arguments and imports


@pytest.mark.parametrize("retry_after_ms", [-1, 1.5, True, "1000"], ids=repr)
@pytest.mark.parametrize("door_name", list(DOORS))
def test_retry_after_must_be_a_non_negative_int(
    registry: CollectorRegistry, door_name: str, retry_after_ms: Any
) -> None:
    door = DOORS[door_name]()
    try:
        with pytest.raises(ValueError, match="retry_after_ms"):
            door.build(StaticAgent(), retry_after_ms=retry_after_ms, registry=registry)
    finally:
        door.close()


def test_an_agent_without_should_shed_is_refused(registry: CollectorRegistry) -> None:
    with pytest.raises(TypeError, match="should_shed"):
        WSGIShedder(wsgi_ok(Calls()), object(), registry=registry)  # type: ignore[arg-type]


def test_the_middleware_is_importable_from_agents_without_a_heavy_import_agents() -> None:
    code = (
        "import sys, agents\n"
        "print(sorted(m for m in ('agents.shedding', 'grpc', 'prometheus_client')"
        " if m in sys.modules))\n"
        "import agents.shedding as s\n"
        "print(agents.ShedInterceptor is s.ShedInterceptor, agents.WSGIShedder is s.WSGIShedder,"
        " agents.ASGIShedder is s.ASGIShedder, agents.AioShedInterceptor is s.AioShedInterceptor)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split("\n")[:2] == ["[]", "True True True True"]
