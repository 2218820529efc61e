"""What every RPC of the server goes through: its etcd budget, its status, its log line.

Every unary method of the services runs inside :func:`rpc`, which gives etcd the smaller
of ``etcd_timeout`` and the call's own deadline, converts
:class:`~controlplane.errors.ControlPlaneError` to its status code (an ``ABORTED``
carries the current mod revision in the trailing metadata ``current-mod-revision``),
counts the call by method and code, and logs one ``rpc`` event with method, code,
duration and actor. Streaming methods count and log themselves with :func:`log_rpc`,
and are held in :class:`OpenStreams`, which ends them when the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
import structlog

from controlplane.errors import ConflictError, ControlPlaneError
from controlplane.metrics import ServerMetrics
from controlplane.server.auth import current_identity

log = structlog.get_logger("controlplane.rpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


def rpc(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Run a unary method of a servicer (with ``store`` and ``metrics``) as described above."""
    method = fn.__name__

    @functools.wraps(fn)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        start = time.perf_counter()
        actor = actor_of(request)
        error: ControlPlaneError | None = None
        remaining = context.time_remaining()
        caller_limited = remaining is not None and remaining < self.store.etcd_timeout
        budget = remaining if remaining is not None and caller_limited else self.store.etcd_timeout
        try:
            with self.store.budget(budget, caller_deadline=caller_limited):
                response = await fn(self, request, context)
        except ControlPlaneError as exc:
            error = exc
        except asyncio.CancelledError:
            # The client went away or its deadline passed: count and log it, then let
            # grpc finish the cancellation.
            log_rpc(self.metrics, method, "CANCELLED", start, actor, "cancelled by the client")
            raise
        except Exception:
            log.exception("rpc_failed", method=method)
            error = ControlPlaneError("internal error (logged on the server)")
        code = grpc.StatusCode.OK if error is None else error.code
        log_rpc(
            self.metrics, method, code.name, start, actor,
            error.message if error is not None else None,
        )  # fmt: skip
        if error is None:
            return response
        trailing: tuple[tuple[str, str], ...] = ()
        if isinstance(error, ConflictError):
            trailing = (("current-mod-revision", str(error.current)),)
        await context.abort(error.code, error.message, trailing_metadata=trailing)
        raise AssertionError("context.abort returned")  # pragma: no cover

    return wrapper


def actor_of(request: Any = None) -> str:
    """Who to name in the log: the authenticated identity, else what the caller says."""
    identity = current_identity.get()
    if identity is not None:
        return identity.name
    options = getattr(request, "options", None)
    return str(getattr(options, "actor", "")) if options is not None else ""


def log_rpc(
    metrics: ServerMetrics, method: str, code: str, start: float, actor: str, error: str | None
) -> None:
    """Count an RPC and log its one ``rpc`` event."""
    duration = time.perf_counter() - start
    metrics.rpcs.labels(method, code).inc()
    metrics.rpc_seconds.labels(method).observe(duration)
    log.info(
        "rpc",
        method=method,
        code=code,
        duration_ms=round(duration * 1000, 3),
        actor=actor or None,
        error=error,
    )


SHUTTING_DOWN = "the server is shutting down: try another one"
"""The details of the UNAVAILABLE that ends a stream when the server stops."""


class OpenStreams:
    """The long-lived calls of a server process (agents' ``Sync``, ``WatchChanges``),
    ended at once when it stops.

    gRPC's graceful stop waits for every call in flight; a stream lasts as long as
    its client, so any connected agent would hold every stop for its whole grace
    period. :meth:`close` cancels the streams' tasks; each handler, seeing
    :meth:`ended_by_close`, ends its call with UNAVAILABLE (:data:`SHUTTING_DOWN`),
    which agents take as "reconnect": they keep serving what they have and connect
    to another server. Unary calls are not held here: they get the grace period.
    """

    def __init__(self) -> None:
        self.closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._asked: set[asyncio.Task[Any]] = set()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the calling stream's task while the block runs."""
        task = asyncio.current_task()
        if task is None:  # pragma: no cover (handlers run in tasks)
            yield
            return
        self._tasks.add(task)
        try:
            yield
        finally:
            self._tasks.discard(task)
            self._asked.discard(task)

    def close(self) -> int:
        """End every held stream (and refuse new ones); returns how many there were."""
        self.closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return len(tasks)

    def ended_by_close(self) -> bool:
        """In a handler that caught CancelledError: whether :meth:`close` ended it and
        nothing else cancelled it too (the client going away). Then the cancellation is
        taken back (``uncancel``) and the handler is to end its call with UNAVAILABLE.
        Asked again for the same cancellation (by an outer handler), False."""
        task = asyncio.current_task()
        if not self.closing or task is None or task in self._asked:
            return False
        self._asked.add(task)
        return task.uncancel() == 0
