"""Bundles: several changes in one transaction, recorded, and reverted as one.

A bundle is recorded under ``bundles/<id>`` in its own transaction, with one audit
record per change and its fingerprint (name and changes) under
``bundle-fingerprints/``, so the same bundle applied again while it is fully in force
is "unchanged". Revert restores what each change replaced, in one transaction, only
if none of those keys changed since (else :class:`BundleConflictError` naming them;
``force`` reverts anyway, and the audit says so).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import structlog

from controlplane import model, semantics
from controlplane.errors import (
    BundleConflictError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from controlplane.metrics import ServerMetrics
from controlplane.model import Bundle, BundleEntry, Meta, RecordError, WriteOptions
from controlplane.semantics import Decision
from controlplane.store._audit import audit_op
from controlplane.store._commit import KeyLocks, retry_cas
from controlplane.store._etcd import Etcd, delete, put, unchanged_since
from controlplane.store._records import Current, Records
from controlplane.store._writes import Plan, audit_entry, log_change, record_ops, with_note
from controlplane.store.keys import (
    BUNDLES,
    bundle_id_of,
    bundle_path,
    bundle_stamp,
    fingerprint,
    fingerprint_path,
    key_for_path,
    new_bundle_id,
    range_end,
)

__all__ = ["BundleOutcome", "BundleView", "Bundles"]

log = structlog.get_logger("controlplane.store")

_MAX_BUNDLE_RECORD_BYTES = 1024 * 1024
_MAX_TXN_BYTES = 1_400_000  # etcd's default request limit is 1.5 MiB


@dataclass(frozen=True, slots=True)
class BundleView:
    """A bundle with its state, computed from the keys it changed."""

    bundle: Bundle
    state: model.BundleState
    revision: int  # the transaction that applied it
    overridden_keys: tuple[str, ...]


_SETS = {"flag": "set_flag", "shedding": "set_shedding", "pin": "pin_version"}
"""The bundle change that sets a key of each kind (only sets are refused on their value)."""


@dataclass(frozen=True, slots=True)
class BundleOutcome:
    """What applying or reverting a bundle did (or would do)."""

    changed: bool
    dry_run: bool
    revision: int
    view: BundleView | None
    summary: str
    would_change: bool = False
    overwritten: tuple[str, ...] = ()
    audit_ids: tuple[str, ...] = ()
    # When nothing changed: per scope, the newest mod revision of the bundle's keys there
    # (what a wait for "applied everywhere" waits for).
    in_force_since: dict[str, int] = field(default_factory=dict)


def _in_force_since(plans: Sequence[Plan], currents: Sequence[Current]) -> dict[str, int]:
    """Per scope, the newest mod revision of the keys there (keys not set aside)."""
    since: dict[str, int] = {}
    for plan, current in zip(plans, currents, strict=True):
        if current.mod_revision:
            scope = plan.key.scope
            since[scope] = max(since.get(scope, 0), current.mod_revision)
    return since


def _check_bundle_shape(paths: Sequence[str]) -> None:
    if not paths:
        raise InvalidArgumentError("changes", "a bundle needs at least one change")
    if len(paths) > model.MAX_BUNDLE_CHANGES:
        raise InvalidArgumentError(
            "changes",
            f"{len(paths)} changes, over the maximum of {model.MAX_BUNDLE_CHANGES} per bundle "
            "(etcd allows 128 operations per transaction; a change takes up to 4): "
            "split it into several bundles",
        )
    seen: dict[str, int] = {}
    for index, path in enumerate(paths):
        if path in seen:
            raise InvalidArgumentError(
                f"changes[{index}]",
                f"changes the same key as changes[{seen[path]}] ({path}): one change per key",
            )
        seen[path] = index


def _check_txn_size(ops: Sequence[Any]) -> None:
    size = sum(op.ByteSize() for op in ops)
    if size > _MAX_TXN_BYTES:
        raise InvalidArgumentError(
            "changes",
            f"the transaction would be {size} bytes, over the {_MAX_TXN_BYTES} byte budget "
            "under etcd's 1.5 MiB request limit: split it into smaller bundles",
        )


class Bundles:
    """Applies, reads, reverts and prunes bundles."""

    def __init__(
        self, etcd: Etcd, records: Records, locks: KeyLocks, metrics: ServerMetrics
    ) -> None:
        self._etcd = etcd
        self._records = records
        self._locks = locks
        self._metrics = metrics
        self.prefix = records.prefix

    def _abs(self, path: str) -> bytes:
        return self._records.abs(path)

    def _unchanged(self, path: str, mod_revision: int) -> Any:
        return unchanged_since(self._abs(path), mod_revision)

    async def apply(
        self, name: str, plans: Sequence[Plan], changes: Sequence[dict[str, Any]],
        opts: WriteOptions,
    ) -> BundleOutcome:  # fmt: skip
        """Apply several changes in one transaction, recorded under ``bundles/<id>``.

        A bundle identical (same name, same changes) to one that is applied, not
        reverted and still fully in force is "unchanged" and answers that bundle.
        """
        paths = [plan.key.path for plan in plans]
        _check_bundle_shape(paths)
        digest = fingerprint(name, changes)

        async def attempt() -> BundleOutcome | None:
            # A time-boxed bundle applied again moves its expiry: not a no-op.
            twin = None if opts.expires_at else await self._applied_twin(digest)
            if twin is not None:
                currents = [await self._records.read(plan.key) for plan in plans]
                return BundleOutcome(
                    changed=False, dry_run=opts.dry_run, revision=0, view=twin,
                    summary=f"bundle {name} is already applied as {twin.bundle.id}",
                    in_force_since=_in_force_since(plans, currents),
                )  # fmt: skip
            return await self._apply_once(name, plans, changes, digest, opts)

        async with self._locks.hold(paths):
            outcome = await retry_cas(attempt)
        if outcome is not None:
            return outcome
        raise UnavailableError(
            f"bundle {name}: its keys are being changed by others too often; try again"
        )

    async def _apply_once(
        self, name: str, plans: Sequence[Plan], changes: Sequence[dict[str, Any]],
        digest: str, opts: WriteOptions,
    ) -> BundleOutcome | None:  # fmt: skip
        now = model.utcnow()
        bundle_id = new_bundle_id(now, name)
        bopts = replace(opts, bundle_id=bundle_id)
        currents = [await self._records.read(plan.key) for plan in plans]
        decisions = []
        for index, (plan, current) in enumerate(zip(plans, currents, strict=True)):
            try:
                decision = plan.decide(current.record, now, bopts)
                if plan.check is not None and decision.changed:
                    decision = with_note(decision, await plan.check(current.record, now))
            except InvalidArgumentError as e:
                # Named as the request names it: which change, which of its fields.
                kind = _SETS.get(plan.key.kind, plan.key.kind)
                raise InvalidArgumentError(f"changes[{index}].{kind}.{e.field}", e.rule) from e
            if current.invalid is not None and not decision.changed:
                decision = replace(decision, changed=True)
            decisions.append(decision)
        if not any(d.changed for d in decisions):
            return BundleOutcome(
                changed=False, dry_run=opts.dry_run, revision=0, view=None,
                summary=f"bundle {name}: every change is already in force",
                in_force_since=_in_force_since(plans, currents),
            )  # fmt: skip
        ops: list[Any] = []
        entries = []
        audits = []
        for plan, current, decision in zip(plans, currents, decisions, strict=True):
            if not decision.changed:
                continue
            entries.append(
                BundleEntry(
                    path=plan.key.path,
                    kind=plan.key.kind,
                    before=current.record.to_record() if current.record is not None else None,
                    after=decision.new.to_record() if decision.new is not None else None,
                )
            )
            ops += record_ops(self.prefix, plan.key.path, current.record, decision.new)
            audit = audit_entry(
                self.prefix, plan.key, decision, current, bopts, now, bundle_id=bundle_id
            )
            audits.append((decision, audit))
            ops.append(audit_op(self.prefix, audit))
        bundle = Bundle(
            id=bundle_id,
            name=name,
            changes=tuple(changes),
            meta=Meta.from_options(bopts, now),
            entries=tuple(entries),
            fingerprint=digest,
        )
        ops.append(self._bundle_op(bundle))
        ops.append(put(self._abs(fingerprint_path(digest)), bundle_id.encode()))
        _check_txn_size(ops)
        # Its revert writes each old record twice (the key and the audit) and the
        # bundle record again: refuse now a bundle that could not be reverted.
        revert_bytes = sum(
            2 * len(json.dumps(e.before or {})) + len(json.dumps(e.after or {})) for e in entries
        ) + len(json.dumps(bundle.to_record()))
        if revert_bytes > _MAX_TXN_BYTES:
            raise InvalidArgumentError(
                "changes",
                f"reverting this bundle would take a {revert_bytes} byte transaction, over the "
                f"{_MAX_TXN_BYTES} byte budget under etcd's 1.5 MiB limit: split it",
            )
        summary = f"bundle {name}: " + "; ".join(
            f"{p.key.scope}: {d.summary}"
            for p, d in zip(plans, decisions, strict=True)
            if d.changed
        )
        if opts.dry_run:
            view = BundleView(bundle, model.BundleState.APPLIED, 0, ())
            return BundleOutcome(
                changed=False, dry_run=True, revision=0, view=view, summary=summary,
                would_change=True,
            )  # fmt: skip
        compares = [
            self._unchanged(plan.key.path, current.mod_revision)
            for plan, current in zip(plans, currents, strict=True)
        ]
        compares.append(self._unchanged(bundle_path(bundle_id), 0))
        response = await self._records.txn(compares, ops)
        if not response.succeeded:
            return None
        revision = int(response.header.revision)
        for entry, (decision, audit) in zip(entries, audits, strict=True):
            self._records.remember(entry.path, decision.new)
            log_change(self._metrics, decision, audit, revision)
        view = BundleView(bundle, model.BundleState.APPLIED, revision, ())
        return BundleOutcome(
            changed=True, dry_run=False, revision=revision, view=view, summary=summary,
            audit_ids=tuple(a.id for _, a in audits),
        )  # fmt: skip

    def _bundle_op(self, bundle: Bundle) -> Any:
        raw = model.encode_record(bundle.to_record(), "changes", limit=_MAX_BUNDLE_RECORD_BYTES)
        return put(self._abs(bundle_path(bundle.id)), raw)

    async def _applied_twin(self, digest: str) -> BundleView | None:
        """The bundle with this fingerprint, if it is applied and fully in force."""
        response = await self._etcd.range(self._abs(fingerprint_path(digest)))
        if not response.kvs:
            return None
        view = await self.get(response.kvs[0].value.decode(errors="replace"))
        if view is not None and view.state is model.BundleState.APPLIED:
            return view
        return None

    async def _read_bundle(self, bundle_id: str) -> tuple[Bundle, Any] | None:
        response = await self._etcd.range(self._abs(bundle_path(bundle_id)))
        if not response.kvs:
            return None
        kv = response.kvs[0]
        try:
            return Bundle.from_record(model.decode_record(kv.value)), kv
        except (RecordError, ValueError, TypeError, KeyError, AttributeError) as exc:
            self._metrics.invalid_records.labels("bundle").inc()
            log.error("record_invalid", key=self.prefix + f"bundles/{bundle_id}", error=str(exc))
            raise FailedPreconditionError(
                f"bundle {bundle_id}: its record in etcd does not parse ({exc}); "
                "revert its changes one by one"
            ) from None

    async def _tops(self) -> dict[str, tuple[Any, int]]:
        """Every mitigation record in force (pruned at now) with its mod revision, by path."""
        rows, _ = await self._records.read_state()
        now = model.utcnow()
        return {path: (semantics.prune_expired(rec, now), mod) for path, rec, mod in rows}

    @staticmethod
    def _holds(bundle: Bundle, entry: BundleEntry, top: Any) -> bool:
        """Whether a key still holds what the bundle put there (or still lacks what it cleared).

        Content, not mod revisions: a layer of someone else's that came and expired
        leaves the bundle's value in force, and that is not a change since.
        """
        if entry.after is None:
            return top is None
        meta = entry.after.get("meta") or {}
        return (
            top is not None
            and top.meta.bundle_id == (meta.get("bundle_id") or "")
            and model.format_time(top.meta.set_at) == meta.get("set_at")
        )

    def _view(
        self, bundle: Bundle, applied: int, tops: dict[str, tuple[Any, int]], now: datetime
    ) -> BundleView:
        overridden = tuple(
            e.path
            for e in bundle.entries
            if not self._holds(bundle, e, tops.get(e.path, (None, 0))[0])
        )
        expired = bundle.meta.expires_at is not None and bundle.meta.expires_at <= now
        if bundle.reverted is not None:
            state = model.BundleState.REVERTED
        elif expired and len(overridden) == len(bundle.entries):
            state = model.BundleState.EXPIRED
        elif overridden:
            state = model.BundleState.PARTIALLY_OVERRIDDEN
        else:
            state = model.BundleState.APPLIED
        if state is not model.BundleState.PARTIALLY_OVERRIDDEN:
            overridden = ()
        return BundleView(bundle, state, applied, overridden)

    async def get(self, bundle_id: str) -> BundleView | None:
        """A bundle and its state (applied, reverted, expired, partially overridden)."""
        found = await self._read_bundle(bundle_id)
        if found is None:
            return None
        bundle, kv = found
        return self._view(bundle, int(kv.create_revision), await self._tops(), model.utcnow())

    async def views(self, limit: int = 0) -> list[BundleView]:
        """Bundles, newest first (only the newest ``limit`` are read when given)."""
        start = self._abs(BUNDLES)
        keys = await self._etcd.range(start, range_end(start), keys_only=True)
        wanted = [bytes(kv.key) for kv in keys.kvs]
        wanted.reverse()
        if limit:
            wanted = wanted[:limit]
        tops = await self._tops()
        now = model.utcnow()
        views = []
        for key in wanted:
            bundle_id = bundle_id_of(key.decode(errors="replace"))
            try:
                found = await self._read_bundle(bundle_id)
            except FailedPreconditionError:
                continue
            if found is not None:
                views.append(self._view(found[0], int(found[1].create_revision), tops, now))
        return views

    async def revert(self, bundle_id: str, opts: WriteOptions, *, force: bool) -> BundleOutcome:
        """Restore what each change of a bundle replaced, in one transaction.

        Refused with :class:`BundleConflictError` when any of its keys changed since,
        unless ``force``: then the newer values are overwritten and the audit says so.
        """
        found = await self._read_bundle(bundle_id)
        if found is None:
            raise NotFoundError(f"no bundle {bundle_id}")
        paths = [e.path for e in found[0].entries]
        async with self._locks.hold(paths):
            outcome = await retry_cas(lambda: self._revert_once(bundle_id, opts, force=force))
        if outcome is not None:
            return outcome
        raise UnavailableError(f"bundle {bundle_id}: its keys keep changing; try again")

    async def _revert_once(
        self, bundle_id: str, opts: WriteOptions, *, force: bool
    ) -> BundleOutcome | None:
        found = await self._read_bundle(bundle_id)
        if found is None:
            raise NotFoundError(f"no bundle {bundle_id}")
        bundle, bundle_kv = found
        now = model.utcnow()
        applied = int(bundle_kv.create_revision)
        if bundle.reverted is not None:
            view = self._view(bundle, applied, {}, now)
            return BundleOutcome(
                changed=False, dry_run=opts.dry_run, revision=0, view=view,
                summary=f"bundle {bundle_id} was already reverted "
                f"({model.format_time(bundle.reverted.set_at)}, by {bundle.reverted.actor})",
            )  # fmt: skip
        if bundle.meta.expires_at is not None and bundle.meta.expires_at <= now and not force:
            raise FailedPreconditionError(
                f"bundle {bundle_id} expired at {model.format_time(bundle.meta.expires_at)}: "
                "its changes no longer apply (unless someone made them permanent since); "
                "revert with force to restore what it replaced anyway"
            )
        if not opts.incident:
            opts = replace(opts, incident=bundle.meta.incident)  # the revert is the incident's
        keys = []
        for entry in bundle.entries:
            key = key_for_path(entry.path)
            if key is None:
                raise FailedPreconditionError(f"bundle {bundle_id}: unknown key {entry.path}")
            keys.append(key)
        currents = [await self._records.read(key) for key in keys]
        changed_since = [
            (entry.path, current.mod_revision)
            for entry, current in zip(bundle.entries, currents, strict=True)
            if not self._holds(bundle, entry, semantics.prune_expired(current.record, now))
        ]
        if changed_since and not force:
            raise BundleConflictError(bundle_id, changed_since)
        overwritten = {path for path, _ in changed_since}
        ops: list[Any] = []
        audits = []
        for entry, key, current in zip(bundle.entries, keys, currents, strict=True):
            before = key.parse(entry.before) if entry.before is not None else None
            restored = semantics.prune_expired(before, now)
            label = f"{key.kind.replace('_', ' ')} {key.name}".strip()
            summary = (
                f"{label} back to {semantics.describe_record(restored)}"
                if restored is not None
                else f"{label} removed"
            )
            decision = Decision(restored, f"{key.kind}.revert", summary, restored=restored)
            reason = opts.reason
            if entry.path in overwritten:
                reason += " (forced: overwrote a change made after the bundle)"
            entry_opts = replace(opts, reason=reason)
            ops += record_ops(self.prefix, entry.path, current.record, restored)
            audit = audit_entry(
                self.prefix, key, decision, current, entry_opts, now, bundle_id=bundle_id
            )
            audits.append((entry, decision, audit))
            ops.append(audit_op(self.prefix, audit))
        reverted = replace(
            bundle, reverted=Meta.from_options(replace(opts, bundle_id=bundle_id), now)
        )
        ops.append(self._bundle_op(reverted))
        _check_txn_size(ops)
        summary = f"bundle {bundle.name} reverted: " + "; ".join(
            f"{k.scope}: {d.summary}" for (_, d, _), k in zip(audits, keys, strict=True)
        )
        if opts.dry_run:
            view = BundleView(reverted, model.BundleState.REVERTED, applied, ())
            return BundleOutcome(
                changed=False, dry_run=True, revision=0, view=view, summary=summary,
                would_change=True, overwritten=tuple(sorted(overwritten)),
            )  # fmt: skip
        compares = [
            self._unchanged(key.path, current.mod_revision)
            for key, current in zip(keys, currents, strict=True)
        ]
        compares.append(self._unchanged(bundle_path(bundle_id), int(bundle_kv.mod_revision)))
        response = await self._records.txn(compares, ops)
        if not response.succeeded:
            return None
        revision = int(response.header.revision)
        for entry, decision, audit in audits:
            self._records.remember(entry.path, decision.new)
            log_change(self._metrics, decision, audit, revision)
        view = BundleView(reverted, model.BundleState.REVERTED, applied, ())
        return BundleOutcome(
            changed=True, dry_run=False, revision=revision, view=view, summary=summary,
            overwritten=tuple(sorted(overwritten)), audit_ids=tuple(a.id for _, _, a in audits),
        )  # fmt: skip

    async def prune(self, cutoff: datetime) -> None:
        """Bundles older than the audit trail go with it, unless still (partly) in force."""
        start = self._abs(BUNDLES)
        old = await self._etcd.range(
            start, self._abs(BUNDLES + bundle_stamp(cutoff)), keys_only=True
        )
        if not old.kvs:
            return
        tops = await self._tops()
        now = model.utcnow()
        doomed = []
        for kv in old.kvs:
            bundle_id = bundle_id_of(kv.key.decode(errors="replace"))
            try:
                found = await self._read_bundle(bundle_id)
            except FailedPreconditionError:
                continue
            if found is None:
                continue
            view = self._view(found[0], int(found[1].create_revision), tops, now)
            if view.state in (model.BundleState.REVERTED, model.BundleState.EXPIRED):
                doomed.append(bytes(kv.key))
        for i in range(0, len(doomed), 100):
            await self._records.txn([], [delete(key) for key in doomed[i : i + 100]])
