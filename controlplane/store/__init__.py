"""The only package that talks to etcd: flags, shedding, pins, bundles and their audit trail.

:class:`Store` is a facade over the parts, each one concern::

    Store
     ├── _etcd.Etcd          channels, endpoint failover, deadlines, unary calls, raw keys
     │    └── _auth.Tokens   etcd users' tokens, renewed when etcd drops them
     ├── _streams.Streams    the watch and lease keep-alives, each with its token
     ├── _records.Records    decoding, last-good recovery, what this server last saw of a key
     ├── _commit             one writer per key, group commit, the compare-and-set retry policy
     ├── _writes.Writer      one key's write: decide, compare-and-set, audit record
     ├── _expiry.Expiry      the expiry index, restoring what an expired change replaced
     ├── _bundles.Bundles    several changes in one transaction, revert
     └── _audit.Audit        history, retention, agents' break-glass overrides

The key layout is in :mod:`controlplane.store.keys`; ``docs/architecture.md`` draws
the write path.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from controlplane import model, semantics
from controlplane.metrics import ServerMetrics
from controlplane.model import (
    GLOBAL_SCOPE,
    AuditEntry,
    Flag,
    FlagValue,
    KnownGood,
    Pin,
    Shedding,
    Tier,
    WriteOptions,
)
from controlplane.store._audit import Audit
from controlplane.store._bundles import BundleOutcome, Bundles, BundleView
from controlplane.store._commit import GroupCommit, KeyLocks
from controlplane.store._etcd import Etcd, WatchEvent, etcd_version_risk
from controlplane.store._expiry import EXPIRY_ACTOR, Expiry
from controlplane.store._notifications import NotifyState
from controlplane.store._records import Records, Stored, stored
from controlplane.store._security import EtcdSecurity, normalize_endpoints
from controlplane.store._streams import Streams
from controlplane.store._triggers import TriggerStore
from controlplane.store._writes import Plan, WriteOutcome, Writer
from controlplane.store.keys import (
    DEFAULT_PREFIX,
    FLAGS,
    KNOWN_GOOD,
    PINS,
    SHEDDING,
    flag_key,
    known_good_key,
    new_audit_id,
    pin_key,
    range_end,
    shedding_key,
)

__all__ = [
    "DEFAULT_PREFIX",
    "EXPIRY_ACTOR",
    "BundleOutcome",
    "BundleView",
    "EtcdSecurity",
    "NotifyState",
    "Plan",
    "Store",
    "Stored",
    "TriggerStore",
    "WatchEvent",
    "WriteOutcome",
    "etcd_version_risk",
    "new_audit_id",
    "normalize_endpoints",
]


class Store:
    """Flags, shedding, pins and known-good marks in etcd, each write audited.

    Lifecycle: build, ``await connect()`` once (opens the channels; does not wait
    for etcd, which may come later), use, ``await close()`` (idempotent).

    With several endpoints the store talks to one at a time and moves to the next
    when one does not answer, so a dead or hung member costs one failed call.
    ``security`` adds TLS and an etcd user (see :class:`EtcdSecurity`).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = DEFAULT_PREFIX,
        *,
        etcd_timeout: float = 2.0,
        metrics: ServerMetrics,
        on_etcd_health: Callable[[bool], None] | None = None,
        security: EtcdSecurity | None = None,
    ) -> None:
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError(f"prefix {prefix!r} must start and end with '/'")
        self.security = security or EtcdSecurity()
        self.endpoints = normalize_endpoints(endpoints, tls=self.security.uses_tls)
        self.prefix = prefix
        self._etcd = Etcd(
            self.endpoints,
            prefix,
            etcd_timeout=etcd_timeout,
            metrics=metrics,
            security=self.security,
            on_etcd_health=on_etcd_health,
        )
        self._streams = Streams(self._etcd)
        self.notify_state = NotifyState(self._etcd, prefix)
        """The notifier's keys (``<prefix>-notify/``)."""
        self.triggers = TriggerStore(self._etcd, prefix)
        """Triggers and what they fired."""
        """The notifier's keys (``<prefix>-notify/``)."""
        self._audit = Audit(self._etcd, metrics)
        self._records = Records(self._etcd, self._audit, metrics)
        locks = KeyLocks()
        self._commit = GroupCommit(self._etcd, self._records.txn, metrics)
        self._writer = Writer(self._records, self._commit, locks, metrics)
        self._expiry = Expiry(self._etcd, self._records, locks, metrics)
        self._bundles = Bundles(self._etcd, self._records, locks, metrics)

    @property
    def etcd_timeout(self) -> float:
        return self._etcd.etcd_timeout

    # -- lifecycle ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the channels to etcd. Call once.

        Raises:
            EtcdAccessError: A TLS file cannot be read.
        """
        await self._etcd.connect()

    async def close(self) -> None:
        """End the shared transactions and close the channels. Idempotent."""
        await self._commit.close()
        await self._etcd.close()

    @contextlib.contextmanager
    def budget(self, seconds: float, *, caller_deadline: bool = False) -> Iterator[None]:
        """Give the etcd calls made inside at most ``seconds`` in all.

        ``caller_deadline``: the limit is the caller's own deadline (shorter than
        the etcd timeout). Running out of it then says DEADLINE_EXCEEDED and says
        nothing about etcd's health.
        """
        with self._etcd.budget(seconds, caller_deadline=caller_deadline):
            yield

    async def ping(self) -> int:
        """Read etcd's current revision (a linearizable read); raise if unreachable."""
        return await self._etcd.ping()

    async def revision(self) -> int:
        """etcd's current revision."""
        return await self._etcd.ping()

    async def etcd_versions(self) -> list[tuple[str, str | None]]:
        """The etcd version each endpoint runs, in endpoint order (None: no answer)."""
        return await self._etcd.etcd_versions()

    # -- writes ------------------------------------------------------------------------

    async def write(self, plan: Plan, opts: WriteOptions) -> WriteOutcome[Any]:
        """Apply one key's write (a plan from a ``plan_*`` method), audited."""
        return await self._writer.write(plan, opts)

    # -- flags -------------------------------------------------------------------------

    def plan_set_flag(
        self,
        scope: str,
        name: str,
        value: FlagValue,
        *,
        change_type: bool = False,
        siblings: Mapping[str, semantics.Sibling] | None = None,
    ) -> Plan:
        """``siblings``: what the same bundle does to ``name`` in other scopes; a first
        value is checked against the flag's values once the bundle is applied."""
        also = {s: sib for s, sib in (siblings or {}).items() if s != scope}

        async def check(current: Flag | None, now: datetime) -> str:
            # The flag's first value in this scope takes the type it has elsewhere: for a
            # service, the global value it would hide; for global, the services' own.
            if semantics.prune_expired(current, now) is not None:
                return ""
            if scope == GLOBAL_SCOPE:
                scopes = sorted(set(await self._records.flag_scopes(name)) | set(also))
            else:
                scopes = [GLOBAL_SCOPE]
            others: dict[str, FlagValue] = {}
            new_here: set[str] = set()  # set by this bundle where nothing was
            meant: set[str] = set()  # of those, set with change_type
            for other in scopes:
                if other == scope:
                    continue
                found = await self._records.read(flag_key(other, name), remember=False)
                held = semantics.prune_expired(found.record, now)
                sibling = also.get(other)
                after = held.value if held is not None else None
                if sibling is not None:
                    after = sibling.after(found.record, now, name)
                    if sibling.value is not None and held is None:
                        new_here.add(other)
                        if sibling.change_type:
                            meant.add(other)
                if after is not None:
                    others[other] = after
            return semantics.check_type_across_scopes(
                name, scope, value, others, change_type=change_type, in_bundle=new_here, meant=meant
            )

        return Plan(
            flag_key(scope, name),
            lambda cur, now, o: semantics.decide_set_flag(
                cur, now, scope, name, value, o, change_type=change_type
            ),
            overridden_flag=name if scope == GLOBAL_SCOPE else "",
            check=check,
        )

    def plan_clear_flag(self, scope: str, name: str, *, all_layers: bool = False) -> Plan:
        return Plan(
            flag_key(scope, name),
            lambda cur, now, o: semantics.decide_clear_flag(cur, now, name, all_layers=all_layers),
            overridden_flag=name if scope == GLOBAL_SCOPE else "",
        )

    async def set_flag(
        self,
        scope: str,
        name: str,
        value: FlagValue,
        opts: WriteOptions,
        *,
        change_type: bool = False,
    ) -> WriteOutcome[Flag]:
        """Set a flag for a scope (``global`` or a service); a value of another type than
        the flag's is refused unless ``change_type``."""
        plan = self.plan_set_flag(scope, name, value, change_type=change_type)
        return await self._writer.write(plan, opts)

    async def clear_flag(
        self, scope: str, name: str, opts: WriteOptions, *, all_layers: bool = False
    ) -> WriteOutcome[Flag]:
        """Clear a flag; a time-boxed layer restores what it replaced unless ``all_layers``."""
        return await self._writer.write(
            self.plan_clear_flag(scope, name, all_layers=all_layers), opts
        )

    async def get_flag(self, scope: str, name: str) -> Stored[Flag] | None:
        """The flag of exactly this scope."""
        return stored(await self._records.read(flag_key(scope, name)))

    async def get_effective_flag(self, service: str, name: str) -> Stored[Flag] | None:
        """The flag a service sees: its own entry, else the global one."""
        own = await self.get_flag(service, name)
        return own if own is not None else await self.get_flag(GLOBAL_SCOPE, name)

    async def list_flags(
        self, scope: str = "", *, effective: bool = False
    ) -> tuple[list[Stored[Flag]], int]:
        """Flags of one scope (all when empty); with ``effective``, what a service sees."""
        if not scope:
            rows, revision = await self._records.read_prefix(FLAGS)
            return [Stored(r, m) for _, r, m in rows], revision
        rows, revision = await self._records.read_prefix(f"flags/{scope}/")
        flags = [Stored(r, m) for _, r, m in rows]
        if effective and scope != GLOBAL_SCOPE:
            own = {f.record.name for f in flags}
            global_rows, revision = await self._records.read_prefix(f"flags/{GLOBAL_SCOPE}/")
            flags += [Stored(r, m) for _, r, m in global_rows if r.name not in own]
            flags.sort(key=lambda f: f.record.name)
        return flags, revision

    async def services_overriding(self, name: str) -> list[str]:
        """Services with an entry of their own for flag ``name`` (hiding the global one)."""
        return await self._records.services_overriding(name)

    # -- shedding ----------------------------------------------------------------------

    def plan_set_shedding(self, service: str, tier: Tier, percent: float) -> Plan:
        return Plan(
            shedding_key(service),
            lambda cur, now, o: semantics.decide_set_shedding(cur, now, service, tier, percent, o),
        )

    def plan_clear_shedding(self, service: str, *, all_layers: bool = False) -> Plan:
        return Plan(
            shedding_key(service),
            lambda cur, now, o: semantics.decide_clear_shedding(cur, now, all_layers=all_layers),
        )

    async def set_shedding(
        self, service: str, tier: Tier, percent: float, opts: WriteOptions
    ) -> WriteOutcome[Shedding]:
        """Set a service's shedding level."""
        return await self._writer.write(self.plan_set_shedding(service, tier, percent), opts)

    async def clear_shedding(
        self, service: str, opts: WriteOptions, *, all_layers: bool = False
    ) -> WriteOutcome[Shedding]:
        """Stop shedding for a service (or restore the level a time-boxed one replaced)."""
        return await self._writer.write(
            self.plan_clear_shedding(service, all_layers=all_layers), opts
        )

    async def get_shedding(self, service: str) -> Stored[Shedding] | None:
        """A service's shedding level."""
        return stored(await self._records.read(shedding_key(service)))

    async def list_shedding(self) -> tuple[list[Stored[Shedding]], int]:
        """Every service's shedding level."""
        rows, revision = await self._records.read_prefix(SHEDDING)
        return [Stored(r, m) for _, r, m in rows], revision

    # -- pins and known-good -----------------------------------------------------------

    def plan_pin(self, service: str, version: str, *, action: str = "pin.set") -> Plan:
        return Plan(
            pin_key(service),
            lambda cur, now, o: semantics.decide_pin(cur, now, service, version, o, action=action),
        )

    def plan_unpin(self, service: str, *, all_layers: bool = False) -> Plan:
        return Plan(
            pin_key(service),
            lambda cur, now, o: semantics.decide_unpin(cur, now, all_layers=all_layers),
        )

    async def pin(
        self, service: str, version: str, opts: WriteOptions, *, action: str = "pin.set"
    ) -> WriteOutcome[Pin]:
        """Pin a service to a version; the pin records the one it replaced."""
        return await self._writer.write(self.plan_pin(service, version, action=action), opts)

    async def unpin(
        self, service: str, opts: WriteOptions, *, all_layers: bool = False
    ) -> WriteOutcome[Pin]:
        """Remove a service's pin and say what it was."""
        return await self._writer.write(self.plan_unpin(service, all_layers=all_layers), opts)

    async def get_pin(self, service: str) -> Stored[Pin] | None:
        """A service's pin."""
        return stored(await self._records.read(pin_key(service)))

    async def list_pins(self) -> tuple[list[Stored[Pin]], int]:
        """Every service's pin."""
        rows, revision = await self._records.read_prefix(PINS)
        return [Stored(r, m) for _, r, m in rows], revision

    async def mark_known_good(
        self, service: str, version: str, opts: WriteOptions
    ) -> WriteOutcome[KnownGood]:
        """Mark a version of a service known-good (a rollback target)."""
        plan = Plan(
            known_good_key(service, version),
            lambda cur, now, o: semantics.decide_mark(cur, now, service, version, o),
        )
        return await self._writer.write(plan, opts)

    async def unmark_known_good(
        self, service: str, version: str, opts: WriteOptions
    ) -> WriteOutcome[KnownGood]:
        """Withdraw a known-good mark ("mark as bad")."""
        plan = Plan(
            known_good_key(service, version),
            lambda cur, now, o: semantics.decide_unmark(cur, now, version),
        )
        return await self._writer.write(plan, opts)

    async def records_by_service(self) -> dict[str, dict[str, int]]:
        """How many records each service has of each kind (flag, shedding, pin,
        known_good), from the keys alone."""
        counts: dict[str, dict[str, int]] = {}
        for kind, path_prefix in (
            ("flag", FLAGS), ("shedding", SHEDDING), ("pin", PINS), ("known_good", KNOWN_GOOD),
        ):  # fmt: skip
            for path in await self._records.paths_under(path_prefix):
                service = path[len(path_prefix) :].split("/", 1)[0]
                if service and service != GLOBAL_SCOPE:
                    per = counts.setdefault(service, {})
                    per[kind] = per.get(kind, 0) + 1
        return counts

    async def list_known_good(self, service: str) -> list[Stored[KnownGood]]:
        """A service's known-good versions, most recently marked first."""
        rows, _ = await self._records.read_prefix(f"known-good/{service}/")
        marks = [Stored(r, m) for _, r, m in rows]
        marks.sort(key=lambda s: (s.record.meta.set_at, s.mod_revision), reverse=True)
        return marks

    async def count_active(self) -> dict[str, int]:
        """How many flags, shedding levels and pins are in force."""
        counts = {}
        for kind, path in (("flag", FLAGS), ("shedding", SHEDDING), ("pin", PINS)):
            start = self._records.abs(path)
            response = await self._etcd.range(start, range_end(start), count_only=True)
            counts[kind] = int(response.count)
        return counts

    # -- bundles -----------------------------------------------------------------------

    async def apply_bundle(
        self, name: str, plans: Sequence[Plan], changes: Sequence[dict[str, Any]],
        opts: WriteOptions,
    ) -> BundleOutcome:  # fmt: skip
        """Apply several changes in one transaction, recorded under ``bundles/<id>``.

        A bundle identical (same name, same changes) to one that is applied, not
        reverted and still fully in force is "unchanged" and answers that bundle.
        """
        return await self._bundles.apply(name, plans, changes, opts)

    async def revert_bundle(
        self, bundle_id: str, opts: WriteOptions, *, force: bool
    ) -> BundleOutcome:
        """Restore what each change of a bundle replaced, in one transaction.

        Refused with :class:`BundleConflictError` when any of its keys changed since,
        unless ``force``: then the newer values are overwritten and the audit says so.
        """
        return await self._bundles.revert(bundle_id, opts, force=force)

    async def get_bundle(self, bundle_id: str) -> BundleView | None:
        """A bundle and its state (applied, reverted, expired, partially overridden)."""
        return await self._bundles.get(bundle_id)

    async def list_bundles(self, limit: int = 0) -> list[BundleView]:
        """Bundles, newest first (only the newest ``limit`` are read when given)."""
        return await self._bundles.views(limit)

    # -- expiry ------------------------------------------------------------------------

    async def next_expiry(self) -> datetime | None:
        """When the earliest time-boxed change expires (None: none is)."""
        return await self._expiry.next_expiry()

    async def expire_due(self, *, batch: int = 64) -> int:
        """Restore what every expired change replaced; return how many were restored."""
        return await self._expiry.expire_due(batch=batch)

    async def repair_expiry_index(self) -> int:
        """Recreate missing index entries of time-boxed records; return how many."""
        return await self._expiry.repair_expiry_index()

    # -- audit history and retention ---------------------------------------------------

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
        return await self._audit.list_history(
            service=service, incident=incident, since=since, until=until, limit=limit
        )

    async def enforce_retention(self, retention: timedelta) -> int:
        """Delete audit records older than ``retention``, and the bundles that went with
        them unless still (partly) in force; return how many audit records."""
        cutoff = model.utcnow() - retention
        deleted = await self._audit.delete_before(cutoff)
        await self.prune_bundles(cutoff)
        await self._audit.forget_event_marks_before(cutoff)
        await self.notify_state.forget_failed_before(cutoff)
        return deleted

    async def prune_bundles(self, cutoff: datetime) -> None:
        """Delete bundles from before ``cutoff`` that are reverted or expired."""
        await self._bundles.prune(cutoff)

    async def oldest_audit_revision(self) -> int | None:
        """The revision of the oldest audit record kept (None: none is)."""
        return await self._audit.oldest_audit_revision()

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
        """Audit a host's break-glass override once (by digest); True if written now."""
        return await self._audit.record_override(
            service,
            instance_id,
            active=active,
            digest=digest,
            actor=actor,
            reason=reason,
            expires_at=expires_at,
            content=content,
            actor_authenticated=actor_authenticated,
        )

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
        """Audit an event that is not a change, once per ``mark`` (see
        :meth:`Audit.record_event`); the revision written at (0: audited already)."""
        return await self._audit.record_event(
            action=action,
            kind=kind,
            scope=scope,
            name=name,
            actor=actor,
            reason=reason,
            mark=mark,
            after=after,
            incident=incident,
        )

    # -- the watch, for the hub --------------------------------------------------------

    def watch(self, start_revision: int) -> AsyncGenerator[tuple[int, list[WatchEvent]], None]:
        """Changes under the prefix from ``start_revision`` on (see :meth:`Streams.watch`)."""
        return self._streams.watch(start_revision)

    async def read_state(self) -> tuple[list[tuple[str, Any, int]], int]:
        """Every flag, shedding level and pin (validated; bad records skipped), and the revision."""
        return await self._records.read_state()

    async def decode_event(self, event: WatchEvent) -> tuple[str, Any] | None:
        """A watched change as (kind, record; None: deleted); None if not agents' business."""
        return await self._records.decode_event(event)

    async def audit_between(self, after: int, upto: int) -> list[WatchEvent]:
        """The audit records written after revision ``after`` up to ``upto``, oldest first
        (for a watcher whose start etcd compacted away)."""
        return await self._audit.events_between(after, upto)

    def decode_audit(self, event: WatchEvent) -> AuditEntry | None:
        """A watched audit record (None, logged and counted, when it does not parse)."""
        return self._audit.decode_event(event)

    # -- leases and raw keys, for presence ---------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id."""
        return await self._etcd.grant_lease(ttl)

    async def keep_lease_alive(self, lease_id: int) -> int:
        """Refresh a lease once; returns its remaining TTL (0: it expired)."""
        return await self._streams.keep_lease_alive(lease_id)

    put_op = staticmethod(Etcd.put_op)
    delete_op = staticmethod(Etcd.delete_op)

    async def txn_raw(self, ops: Sequence[Any]) -> int:
        """Several puts/deletes of absolute keys in one transaction; returns the revision."""
        return await self._etcd.txn_raw(ops)

    async def put_raw(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Put an absolute key (outside the record layout); returns the revision."""
        return await self._etcd.put_raw(key, value, lease=lease)

    async def get_range_raw(self, start: str, end: str) -> list[tuple[str, bytes]]:
        """Every (key, value) with an absolute key in [start, end)."""
        return await self._etcd.get_range_raw(start, end)

    async def get_prefix_raw(self, prefix: str) -> list[tuple[str, bytes]]:
        """Every (key, value) under an absolute prefix."""
        return await self._etcd.get_prefix_raw(prefix)

    async def count_prefix_raw(self, prefix: str) -> int:
        """How many keys there are under an absolute prefix."""
        return await self._etcd.count_prefix_raw(prefix)

    async def delete_prefix_raw(self, prefix: str) -> int:
        """Delete every key under an absolute prefix; returns how many."""
        return await self._etcd.delete_prefix_raw(prefix)

    async def delete_range_raw(self, start: str, end: str) -> int:
        """Delete the absolute keys in [start, end); returns how many."""
        return await self._etcd.delete_range_raw(start, end)
