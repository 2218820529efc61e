"""A small raw etcd v3 client for tests, independent of the code under test.

Tests check what the store wrote by reading it back through this client, which talks to
etcd's gRPC API through aetcd's generated stubs only.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import grpc
from aetcd import rpc

__all__ = ["RawEtcd", "delete_prefix_blocking", "prefix_range_end"]


def prefix_range_end(prefix: bytes) -> bytes:
    """Return the etcd ``range_end`` that selects every key starting with ``prefix``.

    Args:
        prefix: A key prefix.

    Returns:
        ``prefix`` with its last byte below 0xff incremented and what follows dropped;
        ``b"\\0"`` (all keys) for an empty or all-0xff prefix.
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def delete_prefix_blocking(endpoint: str, prefix: str, *, timeout: float = 10.0) -> int:
    """Delete every key under ``prefix`` over a short-lived blocking channel.

    Usable from sync code such as fixture finalizers, with or without an event loop.

    Returns:
        The number of keys deleted.
    """
    raw = prefix.encode()
    with grpc.insecure_channel(endpoint) as channel:
        kv: Any = rpc.KVStub(channel)
        response = kv.DeleteRange(
            rpc.DeleteRangeRequest(key=raw, range_end=prefix_range_end(raw)), timeout=timeout
        )
    return int(response.deleted)


def put_blocking(endpoint: str, key: str, value: bytes, *, timeout: float = 10.0) -> int:
    """Put ``key`` as etcdctl would (no validation at all); return the revision."""
    with grpc.insecure_channel(endpoint) as channel:
        kv: Any = rpc.KVStub(channel)
        response = kv.Put(rpc.PutRequest(key=key.encode(), value=value), timeout=timeout)
    return int(response.header.revision)


def compact_blocking(endpoint: str, *, timeout: float = 10.0) -> int:
    """Compact etcd's whole history up to its current revision; return that revision."""
    with grpc.insecure_channel(endpoint) as channel:
        kv: Any = rpc.KVStub(channel)
        header = kv.Range(rpc.RangeRequest(key=b"\0", count_only=True), timeout=timeout)
        revision = int(header.header.revision)
        kv.Compact(rpc.CompactionRequest(revision=revision, physical=True), timeout=timeout)
    return revision


class RawEtcd:
    """An async raw etcd client over one plaintext gRPC channel.

    Usable as an async context manager; ``close()`` is idempotent.
    """

    def __init__(self, endpoint: str, *, timeout: float = 10.0) -> None:
        """Open a channel (connects lazily).

        Args:
            endpoint: etcd's client address as ``host:port``.
            timeout: Deadline in seconds for each call.
        """
        self._channel = grpc.aio.insecure_channel(endpoint)
        self._kv: Any = rpc.KVStub(self._channel)
        self._timeout = timeout

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """Read one key.

        Returns:
            ``(value, mod_revision)``, or ``None`` if the key does not exist.
        """
        response = await self._kv.Range(rpc.RangeRequest(key=key.encode()), timeout=self._timeout)
        if not response.kvs:
            return None
        kv = response.kvs[0]
        return bytes(kv.value), int(kv.mod_revision)

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """Read every key under ``prefix``.

        Returns:
            The keys (decoded as UTF-8) mapped to their values.
        """
        raw = prefix.encode()
        response = await self._kv.Range(
            rpc.RangeRequest(key=raw, range_end=prefix_range_end(raw)), timeout=self._timeout
        )
        return {bytes(kv.key).decode(): bytes(kv.value) for kv in response.kvs}

    async def put(self, key: str, value: bytes) -> int:
        """Write one key.

        Returns:
            The store revision after the write.
        """
        response = await self._kv.Put(
            rpc.PutRequest(key=key.encode(), value=value), timeout=self._timeout
        )
        return int(response.header.revision)

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``.

        Returns:
            The number of keys deleted.
        """
        raw = prefix.encode()
        response = await self._kv.DeleteRange(
            rpc.DeleteRangeRequest(key=raw, range_end=prefix_range_end(raw)),
            timeout=self._timeout,
        )
        return int(response.deleted)

    async def revision(self) -> int:
        """Return the current store revision."""
        response = await self._kv.Range(
            rpc.RangeRequest(key=b"\0", count_only=True), timeout=self._timeout
        )
        return int(response.header.revision)

    async def compact(self, revision: int) -> None:
        """Compact the history up to ``revision``, waiting until it is applied physically."""
        await self._kv.Compact(
            rpc.CompactionRequest(revision=revision, physical=True), timeout=self._timeout
        )

    async def close(self) -> None:
        """Close the channel. Idempotent."""
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
