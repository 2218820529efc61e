"""The store's two streams to etcd: the watch and lease keep-alives, each with its token.

A stream carries the endpoint's token when it is created. etcd checks it then and
refuses the stream at once if it does not accept it: the token is renewed and the
stream created again, once (etcd 3.4 calls a dead token invalid, 3.5 cancels a watch
as "permission denied", as for a missing right: both are renewed). Only a second
refusal is the user's permissions (:class:`EtcdAccessError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
from aetcd import rpc

from controlplane.errors import CompactedError, UnavailableError
from controlplane.store._auth import names_dead_token, token_metadata, token_rejected
from controlplane.store._etcd import Etcd, WatchEvent
from controlplane.store.keys import range_end

__all__ = ["Streams"]


class _TokenRejectedError(Exception):
    """etcd refused a stream's token or permission (inside this module only)."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Streams:
    """The watch under the prefix and lease keep-alives, over ``etcd``'s channels."""

    def __init__(self, etcd: Etcd) -> None:
        self._etcd = etcd

    async def watch(
        self, start_revision: int
    ) -> AsyncGenerator[tuple[int, list[WatchEvent]], None]:
        """Changes under the prefix from ``start_revision`` on, one revision at a time.

        Yields ``(revision, events)`` in revision order; ``events`` is empty for a
        progress notification (etcd's current revision, nothing changed under the
        prefix). Raises :class:`CompactedError` when ``start_revision`` is no longer
        kept, and :class:`UnavailableError` when the stream breaks (resume from the
        last revision seen + 1). aetcd does not resume a broken watch by itself.

        With an etcd user the stream carries the endpoint's token. etcd checks it when
        the watch is created and cancels the watch at once if it rejects it: the token
        is then renewed and the watch created again, once (etcd 3.4 calls a dead token
        invalid, 3.5 answers "permission denied" as for a missing right: both are
        renewed). A watch created with a good token keeps delivering after the token
        dies; every new watch (the hub's resume after a break) takes the current token.
        A refused user, or a permission refused again with a new token, raises
        :class:`EtcdAccessError`.
        """
        if not self._etcd.connected:
            raise RuntimeError("not connected to etcd")
        index = self._etcd.current
        stub = rpc.WatchStub(self._etcd.channel(index))
        start = self._etcd.prefix.encode()
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=start,
                range_end=range_end(start),
                start_revision=start_revision,
                progress_notify=True,
            )
        )

        async def requests() -> AsyncIterator[Any]:
            yield create
            await asyncio.Event().wait()  # keep the stream open until cancelled

        stale: str | None = None
        delivered = False
        for attempt in range(2):
            deadline = time.monotonic() + self._etcd.timeout()[0]
            token = await self._stream_token(index, stale, deadline, "watch")
            call = stub.Watch(requests(), metadata=token_metadata(token))
            try:
                async with contextlib.aclosing(self._watch_responses(call)) as responses:
                    async for revision, batch in responses:
                        delivered = True
                        yield revision, batch
            except _TokenRejectedError as exc:
                if token is None or attempt > 0:
                    raise self._etcd.refused("watch", exc.code, exc.reason) from None
                if delivered:
                    # Created again from start_revision, it would deliver those again:
                    # the caller resumes from what it has.
                    raise UnavailableError(
                        self._etcd.unreachable("the watch's token was refused; log in again")
                    ) from None
                stale = token
                continue
            except grpc.aio.AioRpcError as exc:
                self._etcd.rotate(index)
                raise UnavailableError(
                    self._etcd.unreachable(f"watch broke: {exc.details()}")
                ) from None
            finally:
                call.cancel()
            raise UnavailableError(self._etcd.unreachable("the watch stream ended"))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _stream_token(
        self, index: int, stale: str | None, deadline: float, what: str
    ) -> str | None:
        """The token for a new stream (renewed if ``stale``), errors as the streams raise them."""
        try:
            if stale is None:
                return await self._etcd.tokens.token(index, deadline)
            return await self._etcd.tokens.renew(index, stale, deadline)
        except grpc.aio.AioRpcError as exc:
            self._etcd.rotate(index)
            raise UnavailableError(
                self._etcd.unreachable(f"{what}: authenticating: {exc.details()}")
            ) from None
        except TimeoutError:
            raise UnavailableError(
                self._etcd.unreachable(f"{what}: no answer while authenticating")
            ) from None

    async def _watch_responses(
        self, call: Any
    ) -> AsyncGenerator[tuple[int, list[WatchEvent]], None]:
        """A watch stream's responses as ``(revision, events)``, as :meth:`watch` yields them.

        Raises:
            _TokenRejectedError: etcd cancelled the watch over its token or the user's
                permissions, before any event.
        """
        async for response in call:
            if response.compact_revision:
                raise CompactedError(int(response.compact_revision))
            if response.canceled:
                # etcd gives the gRPC error as text: "rpc error: code = Unauthenticated
                # desc = etcdserver: invalid auth token" (3.4). etcd 3.5 says "permission
                # denied" for a token it no longer knows as for a user without the right,
                # so a refusal is a possibly dead token: the caller renews it once, and
                # only a refusal of the new token is the user's permissions.
                reason = str(response.cancel_reason)
                if "permission denied" in reason:
                    raise _TokenRejectedError(grpc.StatusCode.PERMISSION_DENIED, reason)
                if "Unauthenticated" in reason or names_dead_token(reason):
                    raise _TokenRejectedError(grpc.StatusCode.UNAUTHENTICATED, reason)
                raise UnavailableError(f"etcd cancelled the watch: {reason}")
            self._etcd.set_ok(True)
            if not response.events:
                if not response.created:
                    yield int(response.header.revision), []
                continue
            batch: list[WatchEvent] = []
            revision = 0
            for event in response.events:
                kv = event.kv
                if kv.mod_revision != revision and batch:
                    yield revision, batch
                    batch = []
                revision = int(kv.mod_revision)
                batch.append(
                    WatchEvent(
                        path=kv.key.decode(errors="replace")[len(self._etcd.prefix) :],
                        value=None if event.type == rpc.Event.DELETE else bytes(kv.value),
                        mod_revision=revision,
                    )
                )
            if batch:
                yield revision, batch

    async def keep_lease_alive(self, lease_id: int) -> int:
        """Refresh a lease once; returns its remaining TTL (0: it expired)."""
        if not self._etcd.connected:
            raise RuntimeError("not connected to etcd")
        index = self._etcd.current
        stub = self._etcd.lease_stub(index)
        deadline = time.monotonic() + self._etcd.timeout()[0]

        async def one() -> AsyncIterator[Any]:
            yield rpc.LeaseKeepAliveRequest(ID=lease_id)

        stale: str | None = None
        for attempt in range(2):
            token = await self._stream_token(index, stale, deadline, "lease keep-alive")
            call = stub.LeaseKeepAlive(
                one(),
                timeout=max(deadline - time.monotonic(), 0.001),
                metadata=token_metadata(token),
            )
            try:
                async for response in call:
                    return int(response.TTL)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), str(exc.details())
                if token_rejected(code, details) and token is not None and attempt == 0:
                    stale = token
                    continue
                if code is grpc.StatusCode.PERMISSION_DENIED or token_rejected(code, details):
                    raise self._etcd.refused("lease keep-alive", code, details) from None
                self._etcd.rotate(index)
                raise UnavailableError(
                    self._etcd.unreachable(f"lease keep-alive: {details}")
                ) from None
            finally:
                call.cancel()
            return 0
        raise AssertionError("unreachable")  # pragma: no cover
