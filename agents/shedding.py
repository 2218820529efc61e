"""Load shedding at the door: gRPC server interceptors and ASGI/WSGI middleware.

Each request gets a criticality, the agent decides (``Agent.should_shed``), and a
shed request ends before the service's code runs::

    from agents.shedding import AioShedInterceptor, ASGIShedder, ShedInterceptor, WSGIShedder

    server = grpc.aio.server(interceptors=[AioShedInterceptor(agent)])
    server = grpc.server(executor, interceptors=[ShedInterceptor(agent)])
    app = ASGIShedder(app, agent)
    app = WSGIShedder(app, agent)

Criticality of a request, first match wins:

1. the service's ``classifier``, given the request (gRPC ``HandlerCallDetails``,
   ASGI scope, WSGI environ), when it returns one (a :class:`Criticality` or a
   tier name), e.g. by method or route;
2. the gRPC metadata ``x-criticality`` / HTTP header ``X-Criticality``: a tier
   name in any case;
3. ``CRITICAL``: no header, or anything else in it.

An admitted request is handled under its criticality: :func:`agents.criticality.current`
gives it in the handler (a streamed response and the tasks the handler starts
included), and the client interceptors and hooks of :mod:`agents.criticality` send
it on the calls the request makes, so that the next service sheds it as this one
would.

The decision is the agent's ``should_shed(criticality, key)``: at random for the
tier itself, or stable per request when the service passes a ``key`` function
(a user or session id; a request it returns None for is decided at random).

What a shed request gets::

    gRPC   RESOURCE_EXHAUSTED, details naming the level, trailing metadata
           grpc-retry-pushback-ms: <retry_after_ms>
    HTTP   503, Retry-After: <retry_after_ms in seconds, rounded up>, a text body
           naming the level

    load shedding: SHEDDABLE_PLUS 30% for checkout; request criticality SHEDDABLE

The agent's read path has no metric: the middleware counts each
decision in ``controlplane_shed_decisions_total{criticality,outcome}`` (outcome
``shed`` or ``admitted``) on the registry it is given (default: prometheus's
default registry). Middleware sharing a registry share the counter.

The agent is duck-typed: anything with ``should_shed(criticality, key=None)``
(:class:`agents.Agent`, :class:`agents.AsyncAgent`,
:class:`agents.testing.StaticAgent`). Exceptions of ``classifier`` and ``key``
propagate: the request fails as it would with any error of the service's own.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeAlias, TypeVar

import grpc
import grpc.aio
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from agents._types import Criticality, SheddingLevel
from agents.criticality import (
    CRITICALITY_HEADER,
    CRITICALITY_METADATA,
    _asgi_in,
    _handler_in,
    _wsgi_in,
)

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "CRITICALITY_HEADER",
    "CRITICALITY_METADATA",
    "DECISIONS_METRIC",
    "RETRY_PUSHBACK_METADATA",
    "ASGIApp",
    "ASGIMessage",
    "ASGIReceive",
    "ASGIScope",
    "ASGISend",
    "ASGIShedder",
    "AioShedInterceptor",
    "Classifier",
    "KeyFunction",
    "ShedInterceptor",
    "SheddingAgent",
    "WSGIShedder",
    "request_criticality",
]

RETRY_PUSHBACK_METADATA = "grpc-retry-pushback-ms"
"""The trailing metadata of a shed gRPC call: when to retry, in milliseconds (gRFC A6)."""
DECISIONS_METRIC = "controlplane_shed_decisions_total"
"""The counter of decisions, labelled ``criticality`` and ``outcome`` (shed/admitted)."""

_ASGI_HEADER = CRITICALITY_HEADER.lower().encode("latin-1")
_WSGI_KEY = "HTTP_" + CRITICALITY_HEADER.upper().replace("-", "_")

ASGIScope: TypeAlias = MutableMapping[str, Any]
ASGIMessage: TypeAlias = MutableMapping[str, Any]
ASGIReceive: TypeAlias = Callable[[], Awaitable[ASGIMessage]]
ASGISend: TypeAlias = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[ASGIScope, ASGIReceive, ASGISend], Awaitable[None]]

_R = TypeVar("_R")
Classifier: TypeAlias = Callable[[_R], Criticality | str | None]
"""Given the request, its criticality, or None to leave it to the header."""
KeyFunction: TypeAlias = Callable[[_R], str | None]
"""Given the request, a stable key (user, session), or None to decide at random."""


class SheddingAgent(Protocol):
    """What the middleware needs of an agent: its shedding decision."""

    def should_shed(self, criticality: Criticality | str, key: str | None = None) -> bool:
        """Whether to shed a request of this criticality; stable per ``key`` when given."""
        ...


def request_criticality(value: str | bytes | None) -> Criticality:
    """The criticality a header or metadata value names.

    A tier name in any case (``sheddable_plus``, ``SHEDDABLE-PLUS``); a missing
    value or anything else is ``CRITICAL``, the default of a request. Never raises.
    """
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return Criticality.parse(value)


# ---------------------------------------------------------------- decisions and counts

_COUNTERS: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()
_COUNTERS_LOCK = threading.Lock()


def _decisions_counter(registry: CollectorRegistry) -> Counter:
    # One counter per registry: a service with a gRPC and an HTTP door (or two
    # apps) registers the metric once.
    with _COUNTERS_LOCK:
        counter = _COUNTERS.get(registry)
        if counter is None:
            counter = Counter(
                DECISIONS_METRIC,
                "Load-shedding decisions of the middleware, by request criticality and outcome.",
                ["criticality", "outcome"],
                registry=registry,
            )
            _COUNTERS[registry] = counter
        return counter


class _Shedder(Generic[_R]):
    """The part every door shares: classify, decide, count, describe."""

    __slots__ = (
        "_admitted",
        "_agent",
        "_classifier",
        "_key",
        "_shed",
        "_should_shed",
    )

    def __init__(
        self,
        agent: SheddingAgent,
        classifier: Classifier[_R] | None,
        key: KeyFunction[_R] | None,
        retry_after_ms: int,
        registry: CollectorRegistry | None,
    ) -> None:
        should_shed = getattr(agent, "should_shed", None)
        if not callable(should_shed):
            raise TypeError(f"{agent!r} has no should_shed(criticality, key=None)")
        if (
            not isinstance(retry_after_ms, int)
            or isinstance(retry_after_ms, bool)
            or retry_after_ms < 0
        ):
            raise ValueError(f"retry_after_ms {retry_after_ms!r} is not a non-negative int")
        self._agent = agent
        self._should_shed: Callable[[Criticality, str | None], bool] = should_shed
        self._classifier = classifier
        self._key = key
        counter = _decisions_counter(REGISTRY if registry is None else registry)
        # Bound once, indexed by the criticality's value: a decision costs one
        # list index and one increment, and every series exists from the start.
        shed: list[Callable[[], None]] = [_nothing] * (max(Criticality) + 1)
        admitted = list(shed)
        for c in Criticality:
            shed[c] = counter.labels(c.name, "shed").inc
            admitted[c] = counter.labels(c.name, "admitted").inc
        self._shed = tuple(shed)
        self._admitted = tuple(admitted)

    def classify(self, request: _R) -> Criticality | None:
        """The classifier's criticality for the request, or None (no classifier, or
        it left the request to the header)."""
        if self._classifier is None:
            return None
        given = self._classifier(request)
        return None if given is None else Criticality.parse(given)

    def decide(self, criticality: Criticality, request: _R) -> bool:
        """The agent's decision for the request, counted."""
        key = None if self._key is None else self._key(request)
        if self._should_shed(criticality, key):
            self._shed[criticality]()
            return True
        self._admitted[criticality]()
        return False

    def message(self, criticality: Criticality) -> str:
        """What a shed request is told: the level in force and its criticality."""
        level, service = _describe(self._agent)
        where = f" for {service}" if service else ""
        if level is None:  # cleared since the decision, or an agent that does not say
            return f"load shedding{where}; request criticality {criticality.name}"
        return (
            f"load shedding: {level.tier.name} {level.percent:g}%{where}; "
            f"request criticality {criticality.name}"
        )


def _nothing() -> None:
    pass


_MISSING: Any = object()


def _describe(agent: object) -> tuple[SheddingLevel | None, str]:
    """The agent's shedding level and service, for a shed request's message.

    The agents have no public read of the level yet: a ``shedding`` attribute is
    used when there is one, else the current snapshot (``Agent``, ``AsyncAgent``
    and ``StaticAgent`` all hold one in ``_snapshot``).
    """
    snapshot = getattr(agent, "_snapshot", None)
    level = getattr(agent, "shedding", _MISSING)
    if level is _MISSING:
        level = getattr(snapshot, "shedding", None)
    service = getattr(agent, "service", None) or getattr(snapshot, "service", None)
    return (
        level if isinstance(level, SheddingLevel) else None,
        service if isinstance(service, str) else "",
    )


# ---------------------------------------------------------------- gRPC


def _metadata_criticality(metadata: Iterable[tuple[str, str | bytes]] | None) -> Criticality:
    if metadata:
        for name, value in metadata:
            if name == CRITICALITY_METADATA:
                return request_criticality(value)
    return Criticality.CRITICAL


_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _shed_handler(
    handler: grpc.RpcMethodHandler[Any, Any], behaviour: Callable[..., Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as ``handler`` that runs ``behaviour`` instead.

    Without (de)serializers: the request is never looked at and nothing is sent.
    """
    factory = _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(behaviour)


class ShedInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Sheds calls to a ``grpc.server`` before its handlers run.

    Args:
        agent: The agent deciding (``should_shed(criticality, key=None)``).
        classifier: Given the call's ``grpc.HandlerCallDetails`` (``method``,
            ``invocation_metadata``), its criticality, or None to use the
            ``x-criticality`` metadata.
        key: Given the call details, a stable key for the decision, or None
            to decide at random.
        retry_after_ms: The ``grpc-retry-pushback-ms`` of a shed call.
        registry: Where to count decisions (default: prometheus's default registry).

    Raises:
        TypeError: ``agent`` has no ``should_shed``.
        ValueError: ``retry_after_ms`` is not a non-negative int.
    """

    def __init__(
        self,
        agent: SheddingAgent,
        *,
        classifier: Classifier[grpc.HandlerCallDetails] | None = None,
        key: KeyFunction[grpc.HandlerCallDetails] | None = None,
        retry_after_ms: int = 1000,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._shedder: _Shedder[grpc.HandlerCallDetails] = _Shedder(
            agent, classifier, key, retry_after_ms, registry
        )
        self._trailing = ((RETRY_PUSHBACK_METADATA, str(retry_after_ms)),)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:  # no such method: gRPC answers UNIMPLEMENTED
            return None
        shedder = self._shedder
        criticality = shedder.classify(handler_call_details)
        if criticality is None:
            criticality = _metadata_criticality(handler_call_details.invocation_metadata)
        if not shedder.decide(criticality, handler_call_details):
            return _handler_in(handler, criticality)
        message = shedder.message(criticality)
        trailing = self._trailing

        def shed(request: Any, context: grpc.ServicerContext) -> Any:
            context.set_trailing_metadata(trailing)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

        return _shed_handler(handler, shed)


class AioShedInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """:class:`ShedInterceptor` for ``grpc.aio`` servers; the same arguments."""

    def __init__(
        self,
        agent: SheddingAgent,
        *,
        classifier: Classifier[grpc.HandlerCallDetails] | None = None,
        key: KeyFunction[grpc.HandlerCallDetails] | None = None,
        retry_after_ms: int = 1000,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._shedder: _Shedder[grpc.HandlerCallDetails] = _Shedder(
            agent, classifier, key, retry_after_ms, registry
        )
        self._trailing = ((RETRY_PUSHBACK_METADATA, str(retry_after_ms)),)

    async def intercept_service(  # type: ignore[override]
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        shedder = self._shedder
        criticality = shedder.classify(handler_call_details)
        if criticality is None:
            criticality = _metadata_criticality(handler_call_details.invocation_metadata)
        if not shedder.decide(criticality, handler_call_details):
            return _handler_in(handler, criticality)
        message = shedder.message(criticality)
        trailing = self._trailing

        async def shed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, message, trailing_metadata=trailing
            )

        return _shed_handler(handler, shed)


# ---------------------------------------------------------------- HTTP


def _retry_after(retry_after_ms: int) -> str:
    return str(-(-retry_after_ms // 1000))


class ASGIShedder:
    """ASGI middleware: shed HTTP requests get a 503 before ``app`` sees them.

    Only ``http`` scopes are decided (and handled under their criticality);
    ``websocket`` and ``lifespan`` pass through, without one.

    Args:
        app: The ASGI application.
        agent: The agent deciding (``should_shed(criticality, key=None)``).
        classifier: Given the ASGI scope (``path``, ``method``, ``headers``), its
            criticality, or None to use the ``X-Criticality`` header.
        key: Given the scope, a stable key for the decision, or None to decide
            at random.
        retry_after_ms: The delay a shed request is told, sent as ``Retry-After``
            in whole seconds, rounded up.
        registry: Where to count decisions (default: prometheus's default registry).

    Raises:
        TypeError: ``agent`` has no ``should_shed``.
        ValueError: ``retry_after_ms`` is not a non-negative int.
    """

    def __init__(
        self,
        app: ASGIApp,
        agent: SheddingAgent,
        *,
        classifier: Classifier[ASGIScope] | None = None,
        key: KeyFunction[ASGIScope] | None = None,
        retry_after_ms: int = 1000,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.app = app
        self._shedder: _Shedder[ASGIScope] = _Shedder(
            agent, classifier, key, retry_after_ms, registry
        )
        self._retry_after = _retry_after(retry_after_ms).encode("latin-1")

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        shedder = self._shedder
        criticality = shedder.classify(scope)
        if criticality is None:
            criticality = Criticality.CRITICAL
            for name, value in scope.get("headers", ()):
                if name == _ASGI_HEADER:
                    criticality = request_criticality(value)
                    break
        if not shedder.decide(criticality, scope):
            await _asgi_in(criticality, self.app, scope, receive, send)
            return
        body = (shedder.message(criticality) + "\n").encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode("latin-1")),
                    (b"retry-after", self._retry_after),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class WSGIShedder:
    """WSGI middleware: shed requests get a 503 before ``app`` sees them.

    Args:
        app: The WSGI application.
        agent: The agent deciding (``should_shed(criticality, key=None)``).
        classifier: Given the WSGI environ (``PATH_INFO``, ``REQUEST_METHOD``,
            ``HTTP_*``), its criticality, or None to use the ``X-Criticality``
            header.
        key: Given the environ, a stable key for the decision, or None to
            decide at random.
        retry_after_ms: The delay a shed request is told, sent as ``Retry-After``
            in whole seconds, rounded up.
        registry: Where to count decisions (default: prometheus's default registry).

    Raises:
        TypeError: ``agent`` has no ``should_shed``.
        ValueError: ``retry_after_ms`` is not a non-negative int.
    """

    def __init__(
        self,
        app: WSGIApplication,
        agent: SheddingAgent,
        *,
        classifier: Classifier[WSGIEnvironment] | None = None,
        key: KeyFunction[WSGIEnvironment] | None = None,
        retry_after_ms: int = 1000,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.app = app
        self._shedder: _Shedder[WSGIEnvironment] = _Shedder(
            agent, classifier, key, retry_after_ms, registry
        )
        self._retry_after = _retry_after(retry_after_ms)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        shedder = self._shedder
        criticality = shedder.classify(environ)
        if criticality is None:
            criticality = request_criticality(environ.get(_WSGI_KEY))
        if not shedder.decide(criticality, environ):
            return _wsgi_in(criticality, self.app, environ, start_response)
        body = (shedder.message(criticality) + "\n").encode()
        start_response(
            "503 Service Unavailable",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Retry-After", self._retry_after),
            ],
        )
        return [body]
