"""The write path: one key's read-modify-write in one compare-and-set transaction.

Every write is a read-modify-write: the record is taken as this server last saw it
(else read, with its mod revision), the new record decided (:mod:`controlplane.semantics`),
then one transaction compares the mod revision and puts the record, its expiry index
entry and its audit record together. A caller-supplied expected mod revision that
does not match fails with :class:`ConflictError`; without one, a lost race is made
again on a read (:func:`retry_cas`). A write that changes neither value nor expiry
writes nothing (no revision, no audit record).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Generic

import structlog

from controlplane import model
from controlplane.errors import ConflictError, ControlPlaneError, UnavailableError
from controlplane.metrics import ServerMetrics
from controlplane.model import AuditEntry, WriteOptions
from controlplane.semantics import Decision
from controlplane.store._audit import audit_op
from controlplane.store._commit import MAX_CAS_ATTEMPTS, GroupCommit, KeyLocks, retry_cas
from controlplane.store._etcd import delete, put, unchanged_since
from controlplane.store._records import Current, R, Records
from controlplane.store.keys import Key, expiry_path, new_audit_id

__all__ = [
    "Plan",
    "WriteOutcome",
    "Writer",
    "audit_entry",
    "index_path",
    "index_value",
    "log_change",
    "record_ops",
    "with_note",
]

log = structlog.get_logger("controlplane.store")


@dataclass(slots=True)
class Plan:
    """One key's part of a write: where, and how to decide the new record."""

    key: Key
    decide: Callable[[Any, datetime, WriteOptions], Decision]
    # For a global flag: its name, to report the services that keep their own value.
    overridden_flag: str = ""
    # Checks that need more than the key's own record (a flag's type in other scopes):
    # given the key's record as read from etcd and the time; raises to refuse, or returns
    # a note for the summary. Run only for a change.
    check: Callable[[Any, datetime], Awaitable[str]] | None = None


@dataclass(frozen=True, slots=True)
class WriteOutcome(Generic[R]):
    """What a write did (or would do, on a dry run)."""

    changed: bool
    dry_run: bool
    revision: int
    mod_revision: int
    record: R | None
    previous: R | None
    restored: R | None = None
    audit_id: str = ""
    overridden_by: tuple[str, ...] = ()
    summary: str = ""
    would_change: bool = False
    key: str = ""


def index_path(path: str, record: Any) -> str | None:
    """The expiry index entry of a record whose top layer is time-boxed."""
    expires = getattr(getattr(record, "meta", None), "expires_at", None)
    if expires is None:
        return None
    return expiry_path(path, expires)


def index_value(prefix: str, path: str, expires_at: datetime) -> bytes:
    """An expiry index entry's value: which record's top layer expires when."""
    return model.encode_record(
        {"kind": "expiry", "key": prefix + path, "expires_at": model.format_time(expires_at)}
    )


def record_ops(prefix: str, path: str, old: Any, new: Any) -> list[Any]:
    """The operations that replace record ``old`` by ``new`` (None: delete), index included."""
    target = (prefix + path).encode()
    ops = [put(target, model.encode_record(new.to_record())) if new is not None else delete(target)]
    old_index = index_path(path, old)
    new_index = index_path(path, new)
    if old_index != new_index:
        if old_index is not None:
            ops.append(delete((prefix + old_index).encode()))
        if new_index is not None:
            value = index_value(prefix, path, new.meta.expires_at)
            ops.append(put((prefix + new_index).encode(), value))
    return ops


def audit_entry(
    prefix: str,
    key: Key,
    decision: Decision,
    stored: Current,
    opts: WriteOptions,
    now: datetime,
    bundle_id: str = "",
) -> AuditEntry:
    """The audit record of one key's change, for the change's own transaction."""
    before: dict[str, Any] | None
    if stored.invalid is not None:
        before = {"invalid_record": stored.invalid.decode(errors="replace")[:4096]}
    else:
        before = stored.record.to_record() if stored.record is not None else None
    new = decision.new
    return AuditEntry(
        id=new_audit_id(now),
        time=now,
        actor=opts.actor,
        actor_authenticated=opts.actor_authenticated,
        action=decision.action,
        kind=key.kind,
        scope=key.scope,
        name=key.name,
        key=prefix + key.path,
        reason=opts.reason,
        incident=opts.incident,
        before=before,
        after=new.to_record() if new is not None else None,
        bundle_id=bundle_id,
        expires_at=new.meta.expires_at if new is not None and hasattr(new, "replaced") else None,
    )


def log_change(
    metrics: ServerMetrics, decision: Decision, audit: AuditEntry, revision: int
) -> None:
    """Count and log a change that etcd applied."""
    metrics.changes.labels(decision.action).inc()
    log.info(
        "change_written",
        action=decision.action,
        key=audit.key,
        revision=revision,
        actor=audit.actor,
        actor_authenticated=audit.actor_authenticated,
        reason=audit.reason,
        incident=audit.incident,
        summary=decision.summary,
        audit_id=audit.id,
        bundle_id=audit.bundle_id or None,
    )


def with_note(decision: Decision, note: str) -> Decision:
    """The decision with ``note`` (from a plan's check) added to its summary."""
    return replace(decision, summary=decision.summary + note) if note else decision


class Writer:
    """Writes one key at a time, each with its audit record, in a compare-and-set."""

    def __init__(
        self, records: Records, commit: GroupCommit, locks: KeyLocks, metrics: ServerMetrics
    ) -> None:
        self._records = records
        self._commit = commit
        self._locks = locks
        self._metrics = metrics
        self.prefix = records.prefix

    async def write(self, plan: Plan, opts: WriteOptions) -> WriteOutcome[Any]:
        """Apply one key's write: decide on the key as known (read it if need be), and
        one compare-and-set transaction."""
        async with self._locks.hold([plan.key.path]):
            known = self._known_for(plan.key, opts)
            if known is not None:
                outcome = await self._write_once(plan, opts, known)
                if outcome is not None:
                    return outcome
            # What this server knew was stale (another writer), or it knew nothing:
            # read from now on, at once the first time.
            outcome = await retry_cas(lambda: self._write_once(plan, opts))
        if outcome is None:
            raise UnavailableError(
                f"{self.prefix + plan.key.path} is being changed by others too often: "
                f"gave up after {MAX_CAS_ATTEMPTS} attempts; try again"
            )
        return outcome

    def _known_for(self, key: Key, opts: WriteOptions) -> Current | None:
        """The key as this server last saw it, where a write may start from that.

        Not for dry runs (they report, with no transaction to check what they read) nor
        for a caller's own compare-and-set (its revision is compared with etcd's)."""
        if opts.dry_run or opts.expected_mod_revision is not None:
            return None
        return self._records.known(key.path)

    async def _write_once(
        self, plan: Plan, opts: WriteOptions, known: Current | None = None
    ) -> WriteOutcome[Any] | None:
        key = plan.key
        now = model.utcnow()
        stored = known
        decision: Decision | None = None
        if known is not None:
            # A refusal decided on what this server last saw (too many layers, say, or a
            # type it has not seen change) may not hold for what etcd has now: decide
            # again on a read.
            try:
                decision = plan.decide(known.record, now, opts)
                if plan.check is not None and decision.changed:
                    decision = with_note(decision, await plan.check(known.record, now))
            except ControlPlaneError:
                decision = None
        if decision is None or not decision.changed:
            # Only a successful transaction confirms what was known; "nothing to change"
            # is said on what etcd holds now.
            stored = await self._records.read(key)
            decision = plan.decide(stored.record, now, opts)
            if plan.check is not None and decision.changed:
                decision = with_note(decision, await plan.check(stored.record, now))
        assert stored is not None
        expected = opts.expected_mod_revision
        if expected is not None and expected != stored.mod_revision:
            raise ConflictError(self.prefix + key.path, expected, stored.mod_revision)
        if not opts.incident and decision.action.endswith(".clear") and stored.record is not None:
            # Clearing an incident's mitigation belongs to that incident's timeline.
            opts = replace(opts, incident=stored.record.meta.incident)
        if stored.invalid is not None and not decision.changed:
            # The bytes in etcd do not parse: write the record in force over them.
            decision = replace(
                decision, changed=True, summary=decision.summary + " (replaces an invalid record)"
            )
        hidden: tuple[str, ...] = ()
        if plan.overridden_flag:
            hidden = tuple(await self._records.services_overriding(plan.overridden_flag))
        base = {
            "dry_run": opts.dry_run,
            "previous": stored.record,
            "overridden_by": hidden,
            "summary": decision.summary,
            "key": self.prefix + key.path,
        }
        if not decision.changed:
            return WriteOutcome(
                changed=False, revision=0, mod_revision=stored.mod_revision,
                record=stored.record, **base,
            )  # fmt: skip
        ops = record_ops(self.prefix, key.path, stored.record, decision.new)
        audit = audit_entry(self.prefix, key, decision, stored, opts, now)
        ops.append(audit_op(self.prefix, audit))
        if opts.dry_run:
            return WriteOutcome(
                changed=False, revision=0, mod_revision=stored.mod_revision,
                record=decision.new, restored=decision.restored, would_change=True, **base,
            )  # fmt: skip
        compare = unchanged_since(self._records.abs(key.path), stored.mod_revision)
        response = await self._commit.commit(compare, ops)
        if not response.succeeded:
            self._records.know(key.path, None)
            if expected is not None:
                now_stored = await self._records.read(key)
                raise ConflictError(self.prefix + key.path, expected, now_stored.mod_revision)
            return None
        revision = int(response.header.revision)
        self._records.remember(key.path, decision.new)
        self._records.know(
            key.path, Current(decision.new, revision if decision.new is not None else 0)
        )
        log_change(self._metrics, decision, audit, revision)
        return WriteOutcome(
            changed=True, revision=revision,
            mod_revision=revision if decision.new is not None else 0,
            record=decision.new, restored=decision.restored, audit_id=audit.id, **base,
        )  # fmt: skip
