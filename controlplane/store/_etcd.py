"""The store's etcd client: channels, endpoint failover, deadlines, tokens, raw calls.

The store builds its own gRPC channels to etcd (aetcd 1.0's client opens a plaintext
channel to a single host:port) and uses aetcd's generated etcd v3 stubs on them, so
that several endpoints fail over, every call gets its own deadline, and TLS and
etcd users are handled here alone.

Deadlines: each etcd call gets what is left of the current budget
(:meth:`Etcd.budget`, set per RPC by the service to the smaller of ``etcd_timeout``
and the RPC's own deadline), else ``etcd_timeout``. A call that gets no answer in time
raises :class:`UnavailableError` (:class:`DeadlineExceededError` when the caller's own
deadline ran out first).

With several endpoints the client talks to one at a time and moves to the next when
one does not answer (refused, or no answer within the etcd timeout), so a dead or hung
member costs one failed call, not an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from aetcd import rpc

from controlplane.errors import (
    ControlPlaneError,
    DeadlineExceededError,
    EtcdAccessError,
    UnavailableError,
)
from controlplane.metrics import ServerMetrics
from controlplane.store._auth import Tokens, token_metadata, token_rejected
from controlplane.store._security import EtcdSecurity
from controlplane.store.keys import range_end

__all__ = [
    "AnswerTooLargeError",
    "Etcd",
    "WatchEvent",
    "delete",
    "etcd_version_risk",
    "put",
    "unchanged_since",
]

log = structlog.get_logger("controlplane.store")

_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # gRPC's own reconnect backoff grows to 120 s; etcd coming back must be
    # noticed within about a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]

_deadline: contextvars.ContextVar[tuple[float, bool] | None] = contextvars.ContextVar(
    "controlplane_etcd_deadline", default=None
)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One key's change seen by a watch (``value`` None: deleted)."""

    path: str  # relative to the prefix
    value: bytes | None
    mod_revision: int


def put(key: bytes, value: bytes, *, lease: int = 0) -> Any:
    """A transaction's put of an absolute key."""
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def delete(key: bytes) -> Any:
    """A transaction's delete of an absolute key."""
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))


def unchanged_since(key: bytes, mod_revision: int) -> Any:
    """A transaction's compare: the key's mod revision is still ``mod_revision`` (0: absent)."""
    return rpc.Compare(
        key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, mod_revision=mod_revision
    )


def _looks_like_tls_failure(details: str) -> bool:
    # gRPC's words when a handshake fails or etcd drops a connection over its client cert.
    return any(
        text in details for text in ("TSI_", "andshake", "SSL", "certificate", "Verification")
    )


_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")


def etcd_version_risk(version: str) -> str | None:
    """What is known to be wrong with an etcd release, or None.

    Args:
        version: The version an etcd member reports (``Maintenance.Status``), e.g. ``3.5.1``.

    Returns:
        One sentence for operators, or None when nothing is known against it (an
        unparsable version included).
    """
    match = _VERSION_RE.match(version)
    if match is None:
        return None
    major, minor, patch = (int(part) for part in match.groups())
    if (major, minor) == (3, 5) and patch <= 2:
        return (
            f"etcd {version} can lose acknowledged writes when a member crashes under load "
            "(fixed in 3.5.3): upgrade etcd to 3.5.3 or later"
        )
    return None


class AnswerTooLargeError(ControlPlaneError):
    """etcd's answer was over the size this client accepts (ask for fewer keys)."""


class Etcd:
    """etcd under a key prefix, over one channel per endpoint.

    Lifecycle: build, ``await connect()`` once (opens the channels; does not wait for
    etcd, which may come later), use, ``await close()`` (idempotent).

    ``security`` adds TLS and an etcd user (see :class:`EtcdSecurity`): ``connect()``
    reads the TLS files (raising :class:`EtcdAccessError` for one it cannot read);
    the first call to each endpoint authenticates, and a refused user or password
    fails that call with :class:`EtcdAccessError` naming the user.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str,
        *,
        etcd_timeout: float,
        metrics: ServerMetrics,
        security: EtcdSecurity,
        on_etcd_health: Callable[[bool], None] | None = None,
    ) -> None:
        self.endpoints = list(endpoints)
        self.prefix = prefix
        self.etcd_timeout = etcd_timeout
        self.security = security
        self._metrics = metrics
        self._on_etcd_health = on_etcd_health
        self._etcd_ok: bool | None = None
        self._channels: list[grpc.aio.Channel] = []
        self._kvs: list[Any] = []
        self._leases: list[Any] = []
        self._tokens = Tokens(security, self.endpoints, [], metrics)
        self._current = 0

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return bool(self._channels)

    @property
    def current(self) -> int:
        """The endpoint calls go to now (an index into ``endpoints``)."""
        return self._current

    @property
    def tokens(self) -> Tokens:
        return self._tokens

    def channel(self, index: int) -> grpc.aio.Channel:
        return self._channels[index]

    def lease_stub(self, index: int) -> Any:
        return self._leases[index]

    async def connect(self) -> None:
        """Open the channels to etcd. Call once.

        Raises:
            EtcdAccessError: A TLS file cannot be read.
        """
        if self._channels:
            raise RuntimeError("Store.connect() called twice")
        security = self.security
        credentials = security.channel_credentials() if security.uses_tls else None
        options = list(_CHANNEL_OPTIONS)
        if security.server_name:
            options.append(("grpc.ssl_target_name_override", security.server_name))
        auths = []
        for endpoint in self.endpoints:
            channel = (
                grpc.aio.secure_channel(endpoint, credentials, options=options)
                if credentials is not None
                else grpc.aio.insecure_channel(endpoint, options=options)
            )
            self._channels.append(channel)
            self._kvs.append(rpc.KVStub(channel))
            self._leases.append(rpc.LeaseStub(channel))
            auths.append(rpc.AuthStub(channel))
        self._tokens = Tokens(security, self.endpoints, auths, self._metrics)
        if security.uses_tls or security.uses_auth:
            log.info(
                "etcd_security",
                tls=security.uses_tls,
                client_cert=security.cert is not None,
                user=security.user,
            )

    async def close(self) -> None:
        """Close the channels. Idempotent."""
        channels, self._channels, self._kvs, self._leases = self._channels, [], [], []
        self._tokens = Tokens(self.security, self.endpoints, [], self._metrics)
        for channel in channels:
            await channel.close(grace=None)

    # -- deadlines and failover ----------------------------------------------------

    @contextlib.contextmanager
    def budget(self, seconds: float, *, caller_deadline: bool = False) -> Iterator[None]:
        """Give the etcd calls made inside at most ``seconds`` in all.

        ``caller_deadline``: the limit is the caller's own deadline (shorter than
        the etcd timeout). Running out of it then says DEADLINE_EXCEEDED and says
        nothing about etcd's health.
        """
        token = _deadline.set((time.monotonic() + max(seconds, 0.0), caller_deadline))
        try:
            yield
        finally:
            _deadline.reset(token)

    def timeout(self) -> tuple[float, bool]:
        budget = _deadline.get()
        if budget is None:
            return self.etcd_timeout, False
        deadline, caller = budget
        left = deadline - time.monotonic()
        if left <= 0:
            if caller:
                raise DeadlineExceededError("the call's deadline ran out before etcd answered")
            raise UnavailableError(self.unreachable(f"no answer within {self.etcd_timeout:g}s"))
        return left, caller

    def _spent(self) -> bool:
        budget = _deadline.get()
        return budget is not None and budget[0] - time.monotonic() <= 0.001

    def unreachable(self, detail: str) -> str:
        message = f"etcd is unreachable at {','.join(self.endpoints)}: {detail}"
        if self.security.uses_tls and _looks_like_tls_failure(detail):
            message += (
                " (TLS to etcd failed: does etcd trust the client certificate (--etcd-cert), "
                "and does its own certificate chain to --etcd-ca and name the endpoint "
                "(--etcd-server-name)?)"
            )
        return message

    def set_ok(self, ok: bool) -> None:
        self._metrics.etcd_up.set(1 if ok else 0)
        if ok != self._etcd_ok:
            self._etcd_ok = ok
            if ok:
                log.info("etcd_reachable", endpoint=self.endpoints[self._current])
            else:
                log.error("etcd_unreachable", endpoints=self.endpoints)
            if self._on_etcd_health is not None:
                self._on_etcd_health(ok)

    def rotate(self, failed: int) -> None:
        if len(self.endpoints) > 1 and self._current == failed:
            self._current = (failed + 1) % len(self.endpoints)
            log.warning(
                "etcd_endpoint_switched",
                failed=self.endpoints[failed],
                now=self.endpoints[self._current],
            )

    # -- unary calls ---------------------------------------------------------------

    def _user(self) -> str:
        return repr(self.security.user)

    def refused(self, operation: str, code: grpc.StatusCode, details: str) -> EtcdAccessError:
        """The error for an etcd answer about the store's own credentials."""
        if code is grpc.StatusCode.PERMISSION_DENIED:
            who = f"user {self._user()}" if self.security.uses_auth else "this client"
            return EtcdAccessError(
                f"etcd refused {who} {operation} access under {self.prefix}: {details} "
                "(grant the user a role with read-write access to the prefix)"
            )
        if not self.security.uses_auth:
            return EtcdAccessError(
                f"etcd refused the {operation}: it requires authentication ({details}); "
                "configure --etcd-user and its password"
            )
        return EtcdAccessError(
            f"etcd refused user {self._user()} again after a new token: {details}"
        )

    async def call(
        self,
        operation: str,
        method_name: str,
        request: Any,
        *,
        idempotent: bool = False,
        lease: bool = False,
    ) -> Any:
        if not self._kvs:
            raise RuntimeError("not connected to etcd")
        # Reads may be tried on each endpoint in turn; a write is tried once, since
        # one that got no answer may still have been applied.
        attempts = len(self._kvs) if idempotent else 1
        for attempt in range(attempts):
            timeout, caller = self.timeout()
            if attempt + 1 < attempts:
                timeout = min(timeout, max(timeout / 2, min(timeout, 0.5)))
            index = self._current
            method = getattr((self._leases if lease else self._kvs)[index], method_name)
            start = time.perf_counter()
            outcome = "ok"
            try:
                response = await self._invoke(index, method, request, time.monotonic() + timeout)
            except grpc.aio.AioRpcError as exc:
                outcome = "error"
                code = exc.code()
                if code is grpc.StatusCode.PERMISSION_DENIED or token_rejected(
                    code, str(exc.details())
                ):
                    self._metrics.etcd_up.set(0)
                    raise self.refused(operation, code, str(exc.details())) from None
                if code is grpc.StatusCode.DEADLINE_EXCEEDED and caller and self._spent():
                    raise DeadlineExceededError(
                        "the call's deadline ran out before etcd answered"
                    ) from None
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.rotate(index)
                    if attempt + 1 < attempts and not self._spent():
                        continue
                    self.set_ok(False)
                    detail = (
                        f"no answer within {timeout:.2f}s"
                        if code is grpc.StatusCode.DEADLINE_EXCEEDED
                        else str(exc.details())
                    )
                    raise UnavailableError(self.unreachable(detail)) from None
                if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    details = str(exc.details())
                    if "space exceeded" in details:
                        raise UnavailableError(
                            f"etcd refused the write: {details} (its space quota is full: "
                            "compact and defragment etcd)"
                        ) from None
                    raise AnswerTooLargeError(f"etcd answer too large: {details}") from None
                raise ControlPlaneError(f"etcd error ({code.name}): {exc.details()}") from None
            except TimeoutError:
                # Waited for another call's authentication until the budget ran out.
                outcome = "error"
                if caller:
                    raise DeadlineExceededError(
                        "the call's deadline ran out before etcd answered"
                    ) from None
                self.set_ok(False)
                raise UnavailableError(
                    self.unreachable(f"no answer within {timeout:.2f}s (authenticating)")
                ) from None
            except EtcdAccessError:
                # Reachable, but unusable until the credentials are fixed.
                outcome = "error"
                self._metrics.etcd_up.set(0)
                raise
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            finally:
                self._metrics.etcd_seconds.labels(operation, outcome).observe(
                    time.perf_counter() - start
                )
            self.set_ok(True)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def _invoke(self, index: int, method: Any, request: Any, deadline: float) -> Any:
        """One unary call to endpoint ``index`` with its token; a rejected token is renewed once.

        Every unary etcd call of the store passes here (the watch and lease keep-alive
        streams get their token in their own methods). ``deadline`` is on
        ``time.monotonic()``'s clock.
        """
        token = await self._tokens.token(index, deadline)
        try:
            return await method(
                request,
                timeout=max(deadline - time.monotonic(), 0.001),
                metadata=token_metadata(token),
            )
        except grpc.aio.AioRpcError as exc:
            if token is None or not token_rejected(exc.code(), str(exc.details())):
                raise
        # etcd rejects a call over its token before applying it: retrying a write is safe.
        token = await self._tokens.renew(index, token, deadline)
        return await method(
            request,
            timeout=max(deadline - time.monotonic(), 0.001),
            metadata=token_metadata(token),
        )

    async def etcd_versions(self) -> list[tuple[str, str | None]]:
        """The etcd version each endpoint runs (``Maintenance.Status``), in endpoint order.

        None for an endpoint that gave no answer within the etcd timeout or refused the
        call: the versions are for the start-up log and its warnings, nothing depends on
        them.
        """
        if not self._channels:
            raise RuntimeError("not connected to etcd")

        async def one(index: int) -> str | None:
            status = rpc.MaintenanceStub(self._channels[index]).Status
            deadline = time.monotonic() + self.etcd_timeout
            try:
                response = await self._invoke(index, status, rpc.StatusRequest(), deadline)
            except (grpc.aio.AioRpcError, EtcdAccessError, TimeoutError):
                return None
            return str(response.version)

        versions = await asyncio.gather(*(one(index) for index in range(len(self._channels))))
        return list(zip(self.endpoints, versions, strict=True))

    async def range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        revision: int = 0,
        min_mod_revision: int = 0,
        max_mod_revision: int = 0,
    ) -> Any:
        """A range read (``revision``: as of that revision; 0: now), tried on each endpoint.

        ``min_mod_revision``/``max_mod_revision`` keep the keys last changed within
        them (0: no bound; etcd then reads the whole range, and ``limit`` applies to
        what is kept).
        """
        request = rpc.RangeRequest(
            key=key,
            range_end=range_end or b"",
            limit=limit,
            keys_only=keys_only,
            count_only=count_only,
            revision=revision,
            min_mod_revision=min_mod_revision,
            max_mod_revision=max_mod_revision,
        )
        return await self.call("range", "Range", request, idempotent=True)

    async def txn(self, compare: Sequence[Any], success: Sequence[Any]) -> Any:
        """One transaction: ``success`` applied if every ``compare`` holds."""
        return await self.call(
            "txn", "Txn", rpc.TxnRequest(compare=list(compare), success=list(success))
        )

    async def ping(self) -> int:
        """Read etcd's current revision (a linearizable read); raise if unreachable."""
        response = await self.range(self.prefix.encode(), count_only=True)
        return int(response.header.revision)

    async def revision(self) -> int:
        """etcd's current revision."""
        return await self.ping()

    # -- leases and raw keys (for presence) ----------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id."""
        response = await self.call(
            "lease", "LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl), lease=True
        )
        return int(response.ID)

    @staticmethod
    def put_op(key: str, value: bytes, *, lease: int = 0) -> Any:
        """A put of an absolute key, for :meth:`txn_raw`."""
        return put(key.encode(), value, lease=lease)

    @staticmethod
    def delete_op(key: str) -> Any:
        """A delete of an absolute key, for :meth:`txn_raw`."""
        return delete(key.encode())

    async def txn_raw(self, ops: Sequence[Any]) -> int:
        """Several puts/deletes of absolute keys in one transaction; returns the revision."""
        response = await self.txn([], list(ops))
        return int(response.header.revision)

    async def put_raw(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Put an absolute key (outside the record layout: presence); returns the revision."""
        response = await self.call(
            "put", "Put", rpc.PutRequest(key=key.encode(), value=value, lease=lease)
        )
        return int(response.header.revision)

    async def get_range_raw(self, start: str, end: str) -> list[tuple[str, bytes]]:
        """Every (key, value) with an absolute key in [start, end)."""
        response = await self.range(start.encode(), end.encode())
        return [(kv.key.decode(errors="replace"), bytes(kv.value)) for kv in response.kvs]

    async def get_prefix_raw(self, prefix: str) -> list[tuple[str, bytes]]:
        """Every (key, value) under an absolute prefix."""
        start = prefix.encode()
        response = await self.range(start, range_end(start))
        return [(kv.key.decode(errors="replace"), bytes(kv.value)) for kv in response.kvs]

    async def count_prefix_raw(self, prefix: str) -> int:
        """How many keys there are under an absolute prefix."""
        start = prefix.encode()
        return int((await self.range(start, range_end(start), count_only=True)).count)

    async def delete_prefix_raw(self, prefix: str) -> int:
        """Delete every key under an absolute prefix; returns how many."""
        start = prefix.encode()
        response = await self.call(
            "delete", "DeleteRange", rpc.DeleteRangeRequest(key=start, range_end=range_end(start))
        )
        return int(response.deleted)

    async def delete_range_raw(self, start: str, end: str) -> int:
        """Delete the absolute keys in [start, end); returns how many."""
        response = await self.call(
            "delete",
            "DeleteRange",
            rpc.DeleteRangeRequest(key=start.encode(), range_end=end.encode()),
        )
        return int(response.deleted)
