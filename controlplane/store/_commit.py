"""How writes reach etcd: one writer per key, group commit, one compare-and-set retry policy.

Writers of one key in this process take turns (:class:`KeyLocks`), so a burst of
last-writer-wins writes does not lose compare-and-set races to itself. Writes that
come while one of this process's transactions is at etcd go together in the next
transaction (:class:`GroupCommit`). A write that loses its compare to another writer
(another replica, or someone with etcdctl) is made again on a fresh read, on one policy
(:func:`retry_cas`): up to :data:`MAX_CAS_ATTEMPTS` attempts, the first at once and the
others after a jittered pause that doubles each time (at most 0.2 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from controlplane.errors import DeadlineExceededError, UnavailableError
from controlplane.metrics import ServerMetrics
from controlplane.store._etcd import Etcd

__all__ = ["MAX_CAS_ATTEMPTS", "GroupCommit", "KeyLocks", "retry_cas"]

T = TypeVar("T")

MAX_CAS_ATTEMPTS = 16
_BATCH_MAX_WRITES = 24
"""At most this many writes share one transaction: each takes up to 4 operations
(record, expiry index out and in, audit), and etcd allows 128 by default."""
_BATCH_MAX_BYTES = 512 * 1024
"""At most this many bytes of operations in one shared transaction (etcd takes
1.5 MiB a request); a write bigger than that goes in a transaction of its own."""


def cas_pause(attempt: int) -> float:
    """The pause before compare-and-set attempt ``attempt`` (0: the first, at once)."""
    if attempt == 0:
        return 0.0
    return random.uniform(0, min(0.2, 0.005 * 2**attempt))  # noqa: S311 (jitter)


async def retry_cas(attempt: Callable[[], Awaitable[T | None]]) -> T | None:
    """Run ``attempt`` until it gives a result (None: it lost its compare-and-set).

    Returns None when every one of :data:`MAX_CAS_ATTEMPTS` attempts lost: the
    caller says what was being changed too often.
    """
    for tried in range(MAX_CAS_ATTEMPTS):
        if tried:
            await asyncio.sleep(cas_pause(tried))
        result = await attempt()
        if result is not None:
            return result
    return None


@dataclass(slots=True)
class _KeyLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class KeyLocks:
    """One writer at a time per key in this process."""

    def __init__(self) -> None:
        self._locks: dict[str, _KeyLock] = {}

    @contextlib.asynccontextmanager
    async def hold(self, paths: Sequence[str]) -> AsyncIterator[None]:
        """Writers of one key in this process take turns (in key order, so no deadlock).

        A burst of last-writer-wins writes then does not lose compare-and-set races
        to itself; races with other replicas are retried with jittered backoff.
        """
        locks = []
        for path in sorted(set(paths)):
            lock = self._locks.setdefault(path, _KeyLock())
            lock.users += 1
            locks.append((path, lock))
        acquired: list[_KeyLock] = []
        try:
            for _, lock in locks:
                await lock.lock.acquire()
                acquired.append(lock)
            yield
        finally:
            for lock in acquired:
                lock.lock.release()
            for path, lock in locks:
                lock.users -= 1
                if lock.users == 0:
                    self._locks.pop(path, None)


@dataclass(slots=True, eq=False)
class _Pending:
    """A write's compare-and-set waiting for the next shared transaction."""

    compare: Any
    ops: list[Any]
    size: int
    done: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


_ALONE: Any = object()
"""A shared transaction failed its compare: each of its writes goes on its own."""


def _own_copy(exc: Exception) -> Exception:
    """``exc`` again, for one more waiter (a traceback of its own), or itself."""
    try:
        return copy.copy(exc)
    except Exception:  # one whose constructor takes other arguments than its args
        return exc


class GroupCommit:
    """Writes' transactions, shared while one of ours is at etcd.

    ``txn`` runs one transaction (the records' own, which also forgets what it
    changed). Lifecycle: use, then ``close()`` (idempotent) fails the waiting writes.
    """

    def __init__(
        self,
        etcd: Etcd,
        txn: Callable[[Sequence[Any], Sequence[Any]], Awaitable[Any]],
        metrics: ServerMetrics,
    ) -> None:
        self._etcd = etcd
        self._txn = txn
        self._metrics = metrics
        self._committing = False
        self._queued: list[_Pending] = []
        self._batches: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Stop the shared transactions in flight and fail the writes still waiting."""
        for task in list(self._batches):
            task.cancel()
        await asyncio.gather(*self._batches, return_exceptions=True)
        for pending in self._queued:
            if not pending.done.done():
                pending.done.set_exception(UnavailableError("the server is stopping"))
        self._queued.clear()
        self._committing = False

    async def commit(self, compare: Any, ops: list[Any]) -> Any:
        """One write's compare-and-set transaction, shared with others (group commit).

        With no transaction of ours at etcd, it goes at once, alone. Otherwise it
        waits for that one to return and goes with every write that came
        meanwhile (up to _BATCH_MAX_WRITES and _BATCH_MAX_BYTES), as one
        transaction: the writes then share a revision. Their keys differ (one
        writer per key in a process, :class:`KeyLocks`). If a shared transaction fails
        a compare, each of its writes is made again on its own, which says whose
        compare failed. Under load this saves etcd and this server a call, a
        watch event and a raft entry per write; alone, it costs nothing.
        """
        if not self._committing:
            self._committing = True
            try:
                return await self._txn([compare], ops)
            finally:
                self._next_batch()
        size = compare.ByteSize() + sum(op.ByteSize() for op in ops)
        if size > _BATCH_MAX_BYTES:  # too big to share: alone, beside the others
            return await self._txn([compare], ops)
        timeout, caller = self._etcd.timeout()
        pending = _Pending(compare, ops, size)
        self._queued.append(pending)
        try:
            async with asyncio.timeout(timeout):
                response = await pending.done
        except TimeoutError:
            # As when a transaction of its own gets no answer in time: it may still
            # be applied (the outcome is unknown).
            if caller:
                raise DeadlineExceededError(
                    "the call's deadline ran out before etcd answered"
                ) from None
            raise UnavailableError(
                self._etcd.unreachable(f"no answer within {timeout:.2f}s")
            ) from None
        finally:
            if not pending.done.done():
                pending.done.cancel()
        if response is _ALONE:
            return await self._txn([compare], ops)
        return response

    def _next_batch(self) -> None:
        """Send the queued writes' shared transaction, or say none is at etcd."""
        self._queued = [pending for pending in self._queued if not pending.done.done()]
        if not self._queued:
            self._committing = False
            return
        batch: list[_Pending] = []
        size = 0
        for pending in self._queued:
            if len(batch) == _BATCH_MAX_WRITES or size + pending.size > _BATCH_MAX_BYTES:
                break
            batch.append(pending)
            size += pending.size
        del self._queued[: len(batch)]
        task = asyncio.create_task(self._send_batch(batch), name="controlplane-store-batch")
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _send_batch(self, batch: list[_Pending]) -> None:
        try:
            # Writers that gave up since (their deadline) are left out.
            batch = [pending for pending in batch if not pending.done.done()]
            if not batch:
                return
            # The etcd timeout, whoever waits: a writer with a shorter deadline stops
            # waiting by itself (DEADLINE_EXCEEDED) without failing the others, and only
            # etcd not answering within the timeout says it is unreachable.
            with self._etcd.budget(self._etcd.etcd_timeout):
                response = await self._txn(
                    [pending.compare for pending in batch],
                    [op for pending in batch for op in pending.ops],
                )
        except BaseException as exc:  # a cancel too: no writer may wait on for nothing
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(
                        _own_copy(exc)
                        if isinstance(exc, Exception)
                        else UnavailableError("the server is stopping")
                    )
            if not isinstance(exc, Exception):
                raise
        else:
            outcome = response if response.succeeded or len(batch) == 1 else _ALONE
            if len(batch) > 1:
                self._metrics.write_batch_size.observe(len(batch))
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_result(outcome)
        finally:
            self._next_batch()
