"""The criticality of the request in hand, carried on the calls it makes.

Shedding by criticality holds across services only when a request keeps its
criticality on the calls it causes: a SHEDDABLE request to checkout that calls
payments is SHEDDABLE at payments too. The shedding middleware
(:mod:`agents.shedding`) sets the criticality it decided a request at in a
context variable for as long as the service handles the request: the handler, a
response it streams, and the tasks the handler starts. The client side below sends
it on every outbound call that does not name one already::

    from agents import criticality

    channel = grpc.intercept_channel(
        grpc.insecure_channel(target), criticality.CriticalityInterceptor()
    )
    channel = grpc.aio.insecure_channel(target, interceptors=criticality.aio_interceptors())
    client = httpx.Client(event_hooks={"request": [criticality.httpx_hook]})
    client = httpx.AsyncClient(event_hooks={"request": [criticality.httpx_async_hook]})
    session.mount("http://", criticality.CriticalityAdapter())  # a requests.Session
    session.mount("https://", criticality.CriticalityAdapter())

gRPC calls carry it as the metadata ``x-criticality``, HTTP requests as the header
``X-Criticality``: what the middleware reads. A call that names its own keeps it.
Outside a request :func:`current` is None and nothing is sent (the next service
takes the call as ``CRITICAL``, a request's default); :func:`use` sets one for work
a service starts on its own::

    with criticality.use("SHEDDABLE"):
        client.get(url)  # X-Criticality: SHEDDABLE

Context variables follow asyncio tasks, ``asyncio.to_thread`` and
``contextvars.copy_context().run``, not ``ThreadPoolExecutor.submit``: work handed
to a thread pool of one's own runs under a copied context, or under :func:`use`.

Nothing here raises on a request's path: an unknown criticality is ``CRITICAL``.
httpx and requests are not dependencies of the SDK: the httpx hooks use only the
request they are given, and :class:`CriticalityAdapter` imports requests when it is
first used.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from agents._types import Criticality

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    import httpx

    from agents._requests import CriticalityAdapter

__all__ = [
    "CRITICALITY_HEADER",
    "CRITICALITY_METADATA",
    "CriticalityAdapter",
    "CriticalityInterceptor",
    "aio_interceptors",
    "current",
    "httpx_async_hook",
    "httpx_hook",
    "use",
]

CRITICALITY_METADATA = "x-criticality"
"""The gRPC metadata key carrying a request's criticality."""
CRITICALITY_HEADER = "X-Criticality"
"""The HTTP header carrying a request's criticality."""

_CURRENT: contextvars.ContextVar[Criticality | None] = contextvars.ContextVar(
    "agents.criticality", default=None
)


def current() -> Criticality | None:
    """The criticality of the request in hand: the one the shedding middleware
    decided it at, or the one :func:`use` set; None outside both."""
    return _CURRENT.get()


@contextmanager
def use(criticality: Criticality | str | None) -> Iterator[Criticality | None]:
    """Make ``criticality`` the current one in the ``with`` block, and what outbound
    calls made in it carry; the one before it comes back at the end.

    A :class:`Criticality` or a tier name in any case (``"sheddable-plus"``);
    anything else is ``CRITICAL`` (never an error); None: no criticality, so that
    calls made in the block carry none.
    """
    value = None if criticality is None else Criticality.parse(criticality)
    token = _CURRENT.set(value)
    try:
        yield value
    finally:
        _CURRENT.reset(token)


def __getattr__(name: str) -> Any:
    # requests is imported only by a service that uses the adapter.
    if name == "CriticalityAdapter":
        from agents._requests import CriticalityAdapter

        globals()[name] = CriticalityAdapter
        return CriticalityAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- gRPC clients

_Metadata = tuple[tuple[str, str | bytes], ...]


def _outbound_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> _Metadata | None:
    """A call's metadata with the current criticality added, or None to leave the
    call as it is: no criticality in hand, or the call names its own."""
    criticality = _CURRENT.get()
    if criticality is None:
        return None
    try:
        entries = tuple(metadata) if metadata else ()
        for key, _ in entries:
            if isinstance(key, str) and key.lower() == CRITICALITY_METADATA:
                return None
    except Exception:  # metadata gRPC refuses anyway: its error to tell, not ours
        return None
    return (*entries, (CRITICALITY_METADATA, criticality.name))


class _CallDetails(grpc.ClientCallDetails):
    """A sync call's details with other metadata."""

    def __init__(self, details: grpc.ClientCallDetails, metadata: _Metadata) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


def _sync_details(details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
    metadata = _outbound_metadata(details.metadata)
    return details if metadata is None else _CallDetails(details, metadata)


class CriticalityInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Sends the current criticality as ``x-criticality`` on every call of a
    ``grpc`` channel (the four kinds) that does not name one::

        channel = grpc.intercept_channel(channel, CriticalityInterceptor())
    """

    def intercept_unary_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        return continuation(_sync_details(client_call_details), request)

    def intercept_unary_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        return continuation(_sync_details(client_call_details), request)

    def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return continuation(_sync_details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return continuation(_sync_details(client_call_details), request_iterator)


def _aio_details(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    metadata = _outbound_metadata(details.metadata)
    if metadata is None:
        return details
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*metadata),
        details.credentials,
        details.wait_for_ready,
    )


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(_aio_details(client_call_details), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(_aio_details(client_call_details), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(_aio_details(client_call_details), request_iterator)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(_aio_details(client_call_details), request_iterator)


def aio_interceptors() -> list[Any]:
    """The interceptors that send the current criticality as ``x-criticality`` on
    every call of a ``grpc.aio`` channel that does not name one, one per kind of
    call (a ``grpc.aio`` channel takes each interceptor for one kind only)::

        channel = grpc.aio.insecure_channel(target, interceptors=aio_interceptors())
    """
    return [_AioUnaryUnary(), _AioUnaryStream(), _AioStreamUnary(), _AioStreamStream()]


# ---------------------------------------------------------------- HTTP clients


def _add_header(headers: MutableMapping[str, str]) -> None:
    """``X-Criticality`` into a request's headers (case-insensitive), unless there."""
    criticality = _CURRENT.get()
    if criticality is not None and CRITICALITY_HEADER not in headers:
        headers[CRITICALITY_HEADER] = criticality.name


def httpx_hook(request: httpx.Request) -> None:
    """The request hook of an ``httpx.Client`` that sends the current criticality::

        httpx.Client(event_hooks={"request": [httpx_hook]})

    An event hook, not a transport: it applies whatever transport or proxy mount
    sends the request, and to each request of a redirect.
    """
    _add_header(request.headers)


async def httpx_async_hook(request: httpx.Request) -> None:
    """:func:`httpx_hook` for an ``httpx.AsyncClient``."""
    _add_header(request.headers)


# ---------------------------------------------------------------- in a request (servers)
#
# The shedding middleware's side: run a request's handling under its criticality.
# Synchronous code runs in a copy of the caller's context with the criticality
# set, and so does each step of an iterator it returns, whichever thread takes the
# step (grpc's sync server calls interceptors and handlers in different threads,
# and grpc.aio runs synchronous handlers in its thread pool). Asynchronous code sets
# it in its task's context and resets it before giving control back: an async
# generator is resumed by whoever iterates it, and a token is reset where it was set.


class _InContext:
    """An iterable (a streamed response, a WSGI body) whose steps run in a context."""

    __slots__ = ("_context", "_iterable", "_iterator")

    def __init__(self, context: contextvars.Context, iterable: Iterable[Any]) -> None:
        self._context = context
        self._iterable = iterable
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> _InContext:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._context.run(iter, self._iterable)
        return self._context.run(next, self._iterator)

    def close(self) -> None:
        # WSGI servers call it once the body is sent (or not): the app's close().
        close = getattr(self._iterable, "close", None)
        if close is not None:
            self._context.run(close)


def _sync_in(criticality: Criticality, behaviour: Callable[..., Any], streaming: bool) -> Any:
    def run(request: Any, servicer_context: Any) -> Any:
        context = contextvars.copy_context()
        context.run(_CURRENT.set, criticality)
        result = context.run(behaviour, request, servicer_context)
        if streaming and result is not None:
            return _InContext(context, result)
        return result

    return run


def _coroutine_in(criticality: Criticality, behaviour: Callable[..., Any]) -> Any:
    async def run(request: Any, servicer_context: Any) -> Any:
        token = _CURRENT.set(criticality)
        try:
            return await behaviour(request, servicer_context)
        finally:
            _CURRENT.reset(token)

    return run


def _async_generator_in(criticality: Criticality, behaviour: Callable[..., Any]) -> Any:
    async def run(request: Any, servicer_context: Any) -> AsyncIterator[Any]:
        inner = behaviour(request, servicer_context)
        try:
            while True:
                token = _CURRENT.set(criticality)
                try:
                    item = await anext(inner)
                except StopAsyncIteration:
                    return
                finally:
                    _CURRENT.reset(token)
                yield item
        finally:
            token = _CURRENT.set(criticality)
            try:
                await inner.aclose()
            finally:
                _CURRENT.reset(token)

    return run


_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def _handler_in(
    handler: grpc.RpcMethodHandler[Any, Any], criticality: Criticality
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` (of a ``grpc`` or a ``grpc.aio`` server) with its behaviour run
    under ``criticality``: the same kind, the same (de)serializers, and a
    coroutine, async generator or plain function as the behaviour is (what
    ``grpc.aio`` tells them apart by).

    Made once per handler and criticality: a server's handlers are the same objects
    call after call, and making one costs more than the rest of the interceptor.
    """
    try:
        return _cached_handler_in(handler, criticality)
    except TypeError:  # a handler of the service's own that cannot be hashed
        return _make_handler_in(handler, criticality)


def _make_handler_in(
    handler: grpc.RpcMethodHandler[Any, Any], criticality: Criticality
) -> grpc.RpcMethodHandler[Any, Any]:
    streaming = handler.response_streaming
    attribute, factory = _KINDS[(bool(handler.request_streaming), bool(streaming))]
    behaviour = getattr(handler, attribute, None)
    if behaviour is None:  # a handler that does not say what runs: left to gRPC
        return handler
    if inspect.iscoroutinefunction(behaviour):
        wrapped = _coroutine_in(criticality, behaviour)
    elif inspect.isasyncgenfunction(behaviour):
        wrapped = _async_generator_in(criticality, behaviour)
    else:
        wrapped = _sync_in(criticality, behaviour, bool(streaming))
    made: grpc.RpcMethodHandler[Any, Any] = factory(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return made


_cached_handler_in = functools.lru_cache(maxsize=1024)(_make_handler_in)


async def _asgi_in(
    criticality: Criticality,
    app: Callable[[Any, Any, Any], Any],
    scope: Any,
    receive: Any,
    send: Any,
) -> None:
    """The ASGI app's handling of a request, under ``criticality``: the tasks it
    starts (a streamed body, a thread it hands work to) copy it."""
    token = _CURRENT.set(criticality)
    try:
        await app(scope, receive, send)
    finally:
        _CURRENT.reset(token)


def _wsgi_in(
    criticality: Criticality,
    app: WSGIApplication,
    environ: WSGIEnvironment,
    start_response: StartResponse,
) -> Iterable[bytes]:
    """The WSGI app's call and the iteration of its body, under ``criticality``.

    A list or tuple body is returned as it is (nothing of the app runs while it is
    sent), and so is a ``wsgi.file_wrapper`` (the server may send it by sendfile).
    """
    context = contextvars.copy_context()
    context.run(_CURRENT.set, criticality)
    body = context.run(app, environ, start_response)
    if isinstance(body, list | tuple):
        return body
    file_wrapper = environ.get("wsgi.file_wrapper")
    if isinstance(file_wrapper, type) and isinstance(body, file_wrapper):
        return body
    return _InContext(context, body)
