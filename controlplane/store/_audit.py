"""The audit trail: history, retention, and break-glass overrides reported by agents.

Audit records are written in the same transaction as the change they describe, under
``audit/<20-digit unix ns>-<8 hex>``: time-ordered, so retention is one range delete
and history walks back through time windows.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog
from aetcd import rpc

from controlplane import model
from controlplane.metrics import ServerMetrics
from controlplane.model import GLOBAL_SCOPE, AuditEntry, RecordError
from controlplane.store._commit import retry_cas
from controlplane.store._etcd import (
    AnswerTooLargeError,
    Etcd,
    WatchEvent,
    delete,
    put,
    unchanged_since,
)
from controlplane.store.keys import (
    AUDIT,
    EVENT_MARKS,
    audit_at,
    audit_path,
    event_mark_path,
    new_audit_id,
    ns,
    override_path,
    range_end,
)

__all__ = ["MAX_AUDIT_BYTES", "Audit", "audit_op"]

log = structlog.get_logger("controlplane.store")

# Audit records hold a record before and after (each up to 64 KiB); etcd takes 1.5 MiB.
MAX_AUDIT_BYTES = 512 * 1024
_BACKFILL_KEYS = 10_000
_HISTORY_PAGE = 512
"""At most this many audit records in one range."""
_PAGE_BYTES = 2 * 1024 * 1024
"""About this many bytes of audit records in one range (the store takes 16 MiB an answer)."""
_FIRST_PAGE = 4
"""Records in the first range of a window, before their size is known (each at most
what etcd takes in one request, 1.5 MiB by default)."""
_PARSE_ERRORS = (RecordError, ValueError, TypeError, KeyError, AttributeError)


def audit_op(prefix: str, entry: AuditEntry) -> Any:
    """The put of an audit record, for the transaction of the change it describes."""
    raw = model.encode_record(entry.to_record(), "audit record", limit=MAX_AUDIT_BYTES)
    return put((prefix + audit_path(entry.id)).encode(), raw)


class Audit:
    """Reads and trims the audit trail; audits agents' break-glass overrides."""

    def __init__(self, etcd: Etcd, metrics: ServerMetrics) -> None:
        self._etcd = etcd
        self._metrics = metrics
        self.prefix = etcd.prefix

    def _abs(self, path: str) -> bytes:
        return (self.prefix + path).encode()

    async def list_history(
        self,
        *,
        service: str = "",
        incident: str = "",
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """Audit entries, newest first, filtered (a service's includes global changes)."""

        def accept(entry: AuditEntry) -> bool:
            if service and entry.scope not in (service, GLOBAL_SCOPE):
                return False
            return not incident or entry.incident == incident

        return await self.scan(accept=accept, since=since, until=until, limit=limit)

    async def scan(
        self,
        *,
        accept: Callable[[AuditEntry], bool],
        limit: int,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[AuditEntry]:
        """Audit entries newest first, walking back through time windows.

        etcd applies a range's limit only in key order (ascending), so the walk
        reads windows of time ascending and reverses them; windows shrink where
        records are dense and grow where they are sparse.
        """
        base = self._abs(AUDIT)
        lower = self._abs(audit_at(ns(since))) if since else base
        upper = self._abs(audit_at(ns(until)) + "~") if until else range_end(base)
        oldest = await self._etcd.range(lower, upper, limit=1, keys_only=True)
        if not oldest.kvs:
            return []
        lower = bytes(oldest.kvs[0].key)
        hi_key = upper
        hi_ns = ns(until) if until else ns(model.utcnow()) + 3_600_000_000_000
        window = 3_600_000_000_000  # 1 h
        entries: list[AuditEntry] = []
        while len(entries) < limit:
            lo_ns = max(hi_ns - window, 0)
            lo_key = max(lower, self._abs(audit_at(lo_ns)))
            count = int((await self._etcd.range(lo_key, hi_key, count_only=True)).count)
            if count > 4 * _HISTORY_PAGE and window > 1_000_000:
                window //= 4
                continue
            page = await self._read_audit_window(lo_key, hi_key)
            for entry in reversed(page):
                if accept(entry):
                    entries.append(entry)
                    if len(entries) >= limit:
                        break
            if lo_key <= lower:
                break
            hi_key, hi_ns = lo_key, lo_ns
            if count < _HISTORY_PAGE:
                window *= 4
        return entries

    async def _read_audit_window(self, lo_key: bytes, hi_key: bytes) -> list[AuditEntry]:
        """Every audit record in [lo_key, hi_key) (see :meth:`_read_raw_window`)."""
        entries = []
        for kv in await self._read_raw_window(lo_key, hi_key):
            try:
                data = model.decode_record(kv.value)
                entries.append(AuditEntry.from_record(data, kv.mod_revision))
            except _PARSE_ERRORS as exc:
                self._metrics.invalid_records.labels("audit").inc()
                log.error("record_invalid", key=kv.key.decode(errors="replace"), error=str(exc))
        return entries

    async def _read_raw_window(self, lo_key: bytes, hi_key: bytes) -> list[Any]:
        """Every key-value in [lo_key, hi_key), in pages bounded in bytes and in count.

        etcd can bound a range only in count, so each page asks for as many records as
        fit :data:`_PAGE_BYTES` at the size of the largest record of the page before (a
        record written by hand can be as large as etcd takes), and at most four times as
        many as the page before. An answer that is still over what this client accepts
        is asked again for a quarter of the records.
        """
        kvs: list[Any] = []
        start = lo_key
        page = _FIRST_PAGE
        while start < hi_key:
            try:
                response = await self._etcd.range(start, hi_key, limit=page)
            except AnswerTooLargeError:
                if page == 1:
                    raise
                page = max(1, page // 4)
                continue
            kvs.extend(response.kvs)
            if not response.more or not response.kvs:
                break
            start = bytes(response.kvs[-1].key) + b"\0"
            # Grows at most fourfold a page, so that one record far larger than those
            # before it costs etcd at most a page four times the budget.
            largest = max(len(kv.value) for kv in response.kvs)
            page = max(1, min(_HISTORY_PAGE, 4 * page, _PAGE_BYTES // max(largest, 1)))
        return kvs

    def decode_event(self, event: WatchEvent) -> AuditEntry | None:
        """A watched audit record (None, logged and counted, when it does not parse)."""
        if event.value is None:
            return None
        try:
            return AuditEntry.from_record(model.decode_record(event.value), event.mod_revision)
        except _PARSE_ERRORS as exc:
            self._metrics.invalid_records.labels("audit").inc()
            log.error("record_invalid", key=self.prefix + event.path, error=str(exc))
            return None

    async def events_between(self, after: int, upto: int) -> list[WatchEvent]:
        """The audit records written after revision ``after`` up to ``upto``: what a
        watch from ``after + 1`` showed of them, when etcd's history of those revisions
        is compacted (records retention deleted since are gone). Oldest first; the
        records of one revision in their keys' order (a watch gives them in their
        transaction's).

        Their keys first (a keys-only range filtered by mod revision, in pages of keys),
        then their values as :meth:`_read_raw_window` reads a window: in pages bounded
        in bytes, so that no answer is over what this client accepts.
        """
        base = self._abs(AUDIT)
        wanted: dict[bytes, int] = {}
        start = base
        while True:
            response = await self._etcd.range(
                start,
                range_end(base),
                limit=_BACKFILL_KEYS,
                keys_only=True,
                min_mod_revision=after + 1,
                max_mod_revision=upto,
            )
            wanted.update((bytes(kv.key), int(kv.mod_revision)) for kv in response.kvs)
            if not response.more or not response.kvs:
                break
            start = bytes(response.kvs[-1].key) + b"\0"
        if not wanted:
            return []
        found: list[WatchEvent] = []
        skip = len(self.prefix.encode())
        for kv in await self._read_raw_window(min(wanted), max(wanted) + b"\0"):
            key = bytes(kv.key)
            if wanted.get(key) == kv.mod_revision:
                found.append(
                    WatchEvent(key[skip:].decode(errors="replace"), bytes(kv.value), wanted[key])
                )
        found.sort(key=lambda event: (event.mod_revision, event.path))
        return found

    async def oldest_audit_revision(self) -> int | None:
        """The revision of the oldest audit record kept (None: none is)."""
        start = self._abs(AUDIT)
        response = await self._etcd.range(start, range_end(start), limit=1)
        return int(response.kvs[0].mod_revision) if response.kvs else None

    async def delete_before(self, cutoff: datetime) -> int:
        """Delete the audit records older than ``cutoff``; return how many."""
        response = await self._etcd.call(
            "delete",
            "DeleteRange",
            rpc.DeleteRangeRequest(key=self._abs(AUDIT), range_end=self._abs(audit_at(ns(cutoff)))),
        )
        deleted = int(response.deleted)
        if deleted:
            self._metrics.audit_deleted.inc(deleted)
            log.info("audit_retention", deleted=deleted, older_than=model.format_time(cutoff))
        return deleted

    async def record_override(
        self,
        service: str,
        instance_id: str,
        *,
        active: bool,
        digest: str,
        actor: str,
        reason: str,
        expires_at: datetime | None,
        content: dict[str, Any] | None,
        actor_authenticated: bool = False,
    ) -> bool:
        """Audit a host's break-glass override once (by digest); True if written now.

        ``overrides/<service>/<instance>`` holds the digest of the override last
        audited for that instance, so reconnects and replicas do not repeat it.
        """
        path = override_path(service, instance_id)

        async def attempt() -> bool | None:
            response = await self._etcd.range(self._abs(path))
            kv = response.kvs[0] if response.kvs else None
            known = bytes(kv.value).decode(errors="replace") if kv is not None else ""
            mod = int(kv.mod_revision) if kv is not None else 0
            if (active and known == digest) or (not active and kv is None):
                return False
            now = model.utcnow()
            entry = AuditEntry(
                id=new_audit_id(now),
                time=now,
                actor=actor or "unknown",
                actor_authenticated=actor_authenticated,
                action="override.applied" if active else "override.cleared",
                kind="override",
                scope=service,
                name=instance_id,
                key=self.prefix + path,
                reason=reason or "break-glass override on the host",
                after=content if active else None,
                expires_at=expires_at if active else None,
            )
            ops = [audit_op(self.prefix, entry)]
            if active:
                ops.append(put(self._abs(path), digest.encode()))
            else:
                ops.append(delete(self._abs(path)))
            result = await self._etcd.txn([unchanged_since(self._abs(path), mod)], ops)
            if result.succeeded:
                log.warning(
                    "override_reported",
                    service=service,
                    instance_id=instance_id,
                    active=active,
                    actor=actor,
                    reason=reason,
                )
                return True
            return None  # another replica or a reconnect came first: look again

        return await retry_cas(attempt) or False

    async def record_event(
        self,
        *,
        action: str,
        kind: str,
        scope: str,
        name: str,
        actor: str,
        reason: str,
        mark: str,
        after: dict[str, Any] | None = None,
        incident: str = "",
    ) -> int:
        """Audit an event that is not a change (an instance rejecting a change, a change
        not applied everywhere in time, a mitigation in force too long) once: ``mark``
        names it, and a second report of it (a reconnect, another replica) writes nothing.
        The revision written at (0: it was audited already)."""
        marker = self._abs(event_mark_path(mark))
        now = model.utcnow()
        entry = AuditEntry(
            id=new_audit_id(now),
            time=now,
            actor=actor,
            actor_authenticated=True,
            action=action,
            kind=kind,
            scope=scope,
            name=name,
            key=self.prefix + event_mark_path(mark),
            reason=reason,
            incident=incident,
            after=after,
        )
        ops = [audit_op(self.prefix, entry), put(marker, model.format_time(now).encode())]
        result = await self._etcd.txn([unchanged_since(marker, 0)], ops)
        return int(result.header.revision) if result.succeeded else 0

    async def forget_event_marks_before(self, cutoff: datetime) -> int:
        """Delete the marks of events audited before ``cutoff`` (as their records go)."""
        start = self._abs(EVENT_MARKS)
        response = await self._etcd.range(start, range_end(start))
        old = []
        for kv in response.kvs:
            when = _mark_time(bytes(kv.value))
            if when is not None and when < cutoff:
                old.append(bytes(kv.key))
        for first in range(0, len(old), 100):
            await self._etcd.txn([], [delete(key) for key in old[first : first + 100]])
        return len(old)


def _mark_time(raw: bytes) -> datetime | None:
    try:
        return model.parse_time(raw.decode())
    except (ValueError, UnicodeDecodeError):
        return None
