"""Group commit, key locks and the compare-and-set retry policy, on their own.

The transaction function is a hand-written one that holds each transaction until the
test lets it answer, so the tests decide what is at etcd when a write comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from controlplane.errors import UnavailableError
from controlplane.metrics import ServerMetrics
from controlplane.store._commit import (
    MAX_CAS_ATTEMPTS,
    GroupCommit,
    KeyLocks,
    cas_pause,
    retry_cas,
)
from controlplane.store._etcd import Etcd, put, unchanged_since
from controlplane.store._security import EtcdSecurity


@dataclass
class Answer:
    succeeded: bool
    compares: int


@dataclass
class HeldTxns:
    """Transactions as they reach "etcd", each answered when the test says."""

    calls: list[tuple[int, int]] = field(default_factory=list)  # (compares, ops)
    gates: list[asyncio.Future[bool | Exception]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, compare: Sequence[Any], ops: Sequence[Any]) -> Answer:
        self.calls.append((len(compare), len(ops)))
        gate: asyncio.Future[bool | Exception] = asyncio.get_running_loop().create_future()
        self.gates.append(gate)
        self.arrived.set()
        outcome = await gate
        if isinstance(outcome, Exception):
            raise outcome
        return Answer(succeeded=outcome, compares=len(compare))

    async def next_call(self, count: int) -> None:
        """Wait until ``count`` transactions have arrived."""
        async with asyncio.timeout(5):
            while len(self.calls) < count:
                self.arrived.clear()
                await self.arrived.wait()

    def answer(self, index: int, outcome: bool | Exception) -> None:
        self.gates[index].set_result(outcome)


def _registry_metrics() -> tuple[CollectorRegistry, ServerMetrics]:
    registry = CollectorRegistry()
    return registry, ServerMetrics(registry)


def _group(txns: HeldTxns) -> tuple[GroupCommit, CollectorRegistry]:
    registry, metrics = _registry_metrics()
    etcd = Etcd(["127.0.0.1:1"], "/t/", etcd_timeout=5.0, metrics=metrics, security=EtcdSecurity())
    return GroupCommit(etcd, txns, metrics), registry


def _write(n: int, size: int = 10) -> tuple[Any, list[Any]]:
    key = f"/t/flags/global/f{n}".encode()
    return unchanged_since(key, 0), [put(key, b"x" * size)]


async def test_a_write_alone_goes_at_once_in_a_transaction_of_its_own() -> None:
    txns = HeldTxns()
    group, _ = _group(txns)
    task = asyncio.create_task(group.commit(*_write(1)))
    await txns.next_call(1)
    assert txns.calls == [(1, 1)]
    txns.answer(0, True)
    assert (await task).succeeded


async def test_writes_that_come_meanwhile_share_the_next_transaction() -> None:
    txns = HeldTxns()
    group, registry = _group(txns)
    first = asyncio.create_task(group.commit(*_write(0)))
    await txns.next_call(1)
    waiting = [asyncio.create_task(group.commit(*_write(n))) for n in range(1, 6)]
    await asyncio.sleep(0)  # let them queue
    assert len(txns.calls) == 1  # nothing more goes while one is at etcd
    txns.answer(0, True)
    await txns.next_call(2)
    assert txns.calls[1] == (5, 5)  # the five together, one compare each
    txns.answer(1, True)
    answers = [await task for task in waiting]
    assert {id(a) for a in answers} == {id(answers[0])}  # one transaction, one answer
    assert answers[0].compares == 5
    assert (await first).succeeded
    assert registry.get_sample_value("controlplane_write_batch_size_count") == 1
    assert registry.get_sample_value("controlplane_write_batch_size_sum") == 5


async def test_a_batch_takes_at_most_24_writes_and_the_rest_go_next() -> None:
    txns = HeldTxns()
    group, _ = _group(txns)
    first = asyncio.create_task(group.commit(*_write(0)))
    await txns.next_call(1)
    waiting = [asyncio.create_task(group.commit(*_write(n))) for n in range(1, 31)]
    await asyncio.sleep(0)
    txns.answer(0, True)
    await txns.next_call(2)
    assert txns.calls[1][0] == 24
    txns.answer(1, True)
    await txns.next_call(3)
    assert txns.calls[2][0] == 6
    txns.answer(2, True)
    await asyncio.gather(first, *waiting)


async def test_a_write_too_big_to_share_goes_alone_beside_the_others() -> None:
    txns = HeldTxns()
    group, _ = _group(txns)
    first = asyncio.create_task(group.commit(*_write(0)))
    await txns.next_call(1)
    big = asyncio.create_task(group.commit(*_write(1, size=600 * 1024)))
    await txns.next_call(2)  # at once, while the first is still at etcd
    assert txns.calls[1] == (1, 1)
    txns.answer(1, True)
    txns.answer(0, True)
    assert (await big).succeeded and (await first).succeeded


async def test_a_shared_transaction_that_fails_a_compare_is_made_again_write_by_write() -> None:
    txns = HeldTxns()
    group, _ = _group(txns)
    first = asyncio.create_task(group.commit(*_write(0)))
    await txns.next_call(1)
    waiting = [asyncio.create_task(group.commit(*_write(n))) for n in (1, 2)]
    await asyncio.sleep(0)
    txns.answer(0, True)
    await txns.next_call(2)
    txns.answer(1, False)  # someone's compare failed: whose?
    await txns.next_call(3)
    # Each goes on its own; the first of them is alone at etcd, so the second
    # either goes alone beside or shares a transaction with no one else.
    txns.answer(2, True)
    await txns.next_call(4)
    assert txns.calls[2:] == [(1, 1), (1, 1)]
    txns.answer(3, False)
    results = [await task for task in waiting]
    assert sorted(r.succeeded for r in results) == [False, True]
    assert (await first).succeeded


async def test_a_failed_shared_transaction_fails_each_writer_with_its_own_error() -> None:
    txns = HeldTxns()
    group, _ = _group(txns)
    first = asyncio.create_task(group.commit(*_write(0)))
    await txns.next_call(1)
    waiting = [asyncio.create_task(group.commit(*_write(n))) for n in (1, 2)]
    await asyncio.sleep(0)
    txns.answer(0, True)
    await txns.next_call(2)
    txns.answer(1, UnavailableError("etcd is unreachable"))
    errors = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(e, UnavailableError) for e in errors)
    assert errors[0] is not errors[1]  # each its own traceback
    assert (await first).succeeded


async def test_close_fails_the_writes_still_waiting() -> None:
    txns = HeldTxns()
    group, _ = _group(txns)
    first = asyncio.create_task(group.commit(*_write(0)))
    await txns.next_call(1)
    waiting = asyncio.create_task(group.commit(*_write(1)))
    await asyncio.sleep(0)
    await group.close()
    with pytest.raises(UnavailableError, match="stopping"):
        await waiting
    txns.answer(0, True)
    assert (await first).succeeded
    await group.close()  # idempotent


async def test_writers_of_one_key_take_turns_and_other_keys_do_not_wait() -> None:
    locks = KeyLocks()
    order: list[str] = []
    release = asyncio.Event()

    async def writer(name: str, paths: list[str]) -> None:
        async with locks.hold(paths):
            order.append(f"{name} in")
            if name == "a":
                await release.wait()
            order.append(f"{name} out")

    a = asyncio.create_task(writer("a", ["flags/global/x"]))
    await asyncio.sleep(0)
    b = asyncio.create_task(writer("b", ["flags/global/x", "pins/checkout"]))
    c = asyncio.create_task(writer("c", ["pins/search"]))
    await c  # another key: no wait
    assert order == ["a in", "c in", "c out"]
    release.set()
    await asyncio.gather(a, b)
    assert order[3:] == ["a out", "b in", "b out"]
    assert locks._locks == {}  # nothing kept once no one holds a key


async def test_retry_cas_stops_at_the_first_result() -> None:
    tries: list[int] = []

    async def attempt() -> str | None:
        tries.append(1)
        return "done" if len(tries) == 3 else None

    assert await retry_cas(attempt) == "done"
    assert len(tries) == 3


async def test_retry_cas_gives_up_after_the_last_attempt() -> None:
    tries: list[int] = []

    async def attempt() -> str | None:
        tries.append(1)
        return None

    assert await retry_cas(attempt) is None
    assert len(tries) == MAX_CAS_ATTEMPTS


def test_the_pause_between_attempts_is_jittered_doubling_and_bounded() -> None:
    assert cas_pause(0) == 0.0
    for attempt in range(1, MAX_CAS_ATTEMPTS):
        pauses = [cas_pause(attempt) for _ in range(200)]
        assert all(0 <= p <= min(0.2, 0.005 * 2**attempt) for p in pauses)
        assert len(set(pauses)) > 1  # jittered, not a fixed step
