"""Time-boxed changes: the expiry index, and restoring what an expired change replaced.

A record whose top layer expires has an entry ``expiries/<unix ns>/<record path>``
written in the same transaction; the server reads the index soonest first and, at
``expires_at``, writes the restore with one audit record, compare-and-set on the key's
mod revision, so that of several replicas exactly one writes it. Agents switch on time
by themselves; this makes etcd say so too.
"""

from __future__ import annotations

from datetime import UTC, datetime

import structlog

from controlplane import model
from controlplane.metrics import ServerMetrics
from controlplane.model import WriteOptions
from controlplane.semantics import decide_expiry
from controlplane.store._audit import audit_op
from controlplane.store._commit import KeyLocks
from controlplane.store._etcd import Etcd, delete, put, unchanged_since
from controlplane.store._records import Records
from controlplane.store._writes import (
    audit_entry,
    index_path,
    index_value,
    log_change,
    record_ops,
)
from controlplane.store.keys import (
    EXPIRIES,
    Key,
    expiry_at,
    key_for_path,
    ns,
    parse_expiry_path,
    range_end,
)

__all__ = ["EXPIRY_ACTOR", "Expiry"]

log = structlog.get_logger("controlplane.store")

EXPIRY_ACTOR = "controlplane:expiry"


class Expiry:
    """Finds expired time-boxed changes and restores what they replaced."""

    def __init__(
        self, etcd: Etcd, records: Records, locks: KeyLocks, metrics: ServerMetrics
    ) -> None:
        self._etcd = etcd
        self._records = records
        self._locks = locks
        self._metrics = metrics
        self.prefix = records.prefix

    async def next_expiry(self) -> datetime | None:
        """When the earliest time-boxed change expires (None: none is).

        An index key that is no entry (written by hand: a short or odd stamp, which
        sorts out of time order, where :meth:`expire_due` would never reach it) is
        removed here, so that it can neither hide the next expiry nor make it look due
        forever.
        """
        start = self._records.abs(EXPIRIES)
        for _ in range(64):
            response = await self._etcd.range(start, range_end(start), limit=1, keys_only=True)
            if not response.kvs:
                return None
            index_key = bytes(response.kvs[0].key)
            parsed = parse_expiry_path(index_key.decode(errors="replace")[len(self.prefix) :])
            if parsed is not None:
                return datetime.fromtimestamp(parsed[0] / 1e9, UTC)
            log.error("expiry_index_invalid", key=index_key.decode(errors="replace"))
            await self._records.txn([], [delete(index_key)])
        return model.utcnow()  # more bad keys than that: look again at once

    async def repair_expiry_index(self) -> int:
        """Recreate missing index entries of time-boxed records; return how many.

        A record written by hand, or an index key deleted, would otherwise never be
        restored by a server while agents switch on time by themselves.
        """
        rows, _ = await self._records.read_state()
        start = self._records.abs(EXPIRIES)
        existing = {
            bytes(kv.key)
            for kv in (await self._etcd.range(start, range_end(start), keys_only=True)).kvs
        }
        repaired = 0
        for path, record, mod in rows:
            index = index_path(path, record)
            if index is None or self._records.abs(index) in existing:
                continue
            value = index_value(self.prefix, path, record.meta.expires_at)
            await self._records.txn(
                [unchanged_since(self._records.abs(path), mod)],
                [put(self._records.abs(index), value)],
            )
            log.warning("expiry_index_repaired", key=self.prefix + path)
            repaired += 1
        return repaired

    async def expire_due(self, *, batch: int = 64) -> int:
        """Restore what every expired change replaced; return how many were restored.

        Each restore is one transaction with one audit record, compare-and-set on
        the key's mod revision, so that of several replicas exactly one writes it.
        """
        start = self._records.abs(EXPIRIES)
        now = model.utcnow()
        end = self._records.abs(expiry_at(ns(now) + 1))
        response = await self._etcd.range(start, end, limit=batch, keys_only=True)
        restored = 0
        for kv in response.kvs:
            index_key = bytes(kv.key)
            parsed = parse_expiry_path(index_key.decode(errors="replace")[len(self.prefix) :])
            key = key_for_path(parsed[1]) if parsed is not None else None
            if parsed is None or key is None:
                log.error("expiry_index_invalid", key=index_key.decode(errors="replace"))
                await self._records.txn([], [delete(index_key)])
                continue
            async with self._locks.hold([key.path]):
                restored += await self._expire_one(key, index_key, parsed[0])
        return restored

    async def _expire_one(self, key: Key, index_key: bytes, stamp: int) -> int:
        stored = await self._records.read(key)
        record = stored.record
        top = getattr(getattr(record, "meta", None), "expires_at", None)
        if top is None or ns(top) != stamp:
            # The index entry outlived its record (rewritten, cleared, corrupted).
            await self._records.txn(
                [unchanged_since(self._records.abs(key.path), stored.mod_revision)],
                [delete(index_key)],
            )
            return 0
        now = model.utcnow()
        label = f"{key.scope}: {key.kind.replace('_', '-')} {key.name}".rstrip()
        decision = decide_expiry(record, now, label)
        if not decision.changed:
            return 0
        opts = WriteOptions(
            reason=f"expiry of a time-boxed change: {record.meta.reason}",
            incident=record.meta.incident,
            actor=EXPIRY_ACTOR,
            actor_authenticated=True,
        )
        ops = record_ops(self.prefix, key.path, stored.record, decision.new)
        if index_path(key.path, record) is None:  # pragma: no cover - guarded above
            ops.append(delete(index_key))
        audit = audit_entry(
            self.prefix, key, decision, stored, opts, now, bundle_id=record.meta.bundle_id
        )
        ops.append(audit_op(self.prefix, audit))
        response = await self._records.txn(
            [unchanged_since(self._records.abs(key.path), stored.mod_revision)], ops
        )
        if not response.succeeded:
            return 0  # another replica restored it, or a new write came first
        self._records.remember(key.path, decision.new)
        log_change(self._metrics, decision, audit, int(response.header.revision))
        return 1
