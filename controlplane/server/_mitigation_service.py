"""MitigationService: what on-call engineers, runbooks and deploy pipelines call.

Each method validates the request, calls the store and maps the outcome to its
response; :func:`~controlplane.server._rpc.rpc` gives it its etcd budget, status and
log line. The service's RPCs come in three families, one class each, which
:class:`MitigationServicer` puts together: the records (flags, shedding, pins and
known-good versions), bundles, and what observes them (status, history, the watch,
the timeline and waits).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import structlog
from google.protobuf import json_format

from controlplane import model, semantics
from controlplane.api.v1 import mitigation_pb2 as mpb
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as pb
from controlplane.errors import (
    ControlPlaneError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from controlplane.metrics import ServerMetrics
from controlplane.model import GLOBAL_SCOPE
from controlplane.server._config import DEFAULT_STALE_AFTER
from controlplane.server._presence import Instance, Presence
from controlplane.server._rpc import SHUTTING_DOWN, OpenStreams, actor_of, log_rpc, rpc
from controlplane.server._services import ServiceDirectory
from controlplane.server._trigger_service import TriggerRPCs
from controlplane.server.auth import current_identity
from controlplane.server.hub import Hub
from controlplane.store import BundleOutcome, BundleView, Plan, Store, WriteOutcome

log = structlog.get_logger("controlplane.rpc")

MAX_HISTORY_LIMIT = 1000
MAX_NOTIFICATIONS_LIMIT = 1000
"""Failed notifications one ListNotifications answer lists at most."""
MAX_TIMELINE_LIMIT = 10_000
DEFAULT_HISTORY_LIMIT = 100
HISTORY_RESPONSE_BYTES = 4 * 1024 * 1024
"""About the most bytes of records an answer of audit entries shows (history, timeline):
each entry shows its records before and after up to its share, at least 1 KiB each."""


def _shown_bytes(entries: int) -> int:
    """How much JSON of each record an answer of ``entries`` audit entries shows."""
    share = HISTORY_RESPONSE_BYTES // (2 * max(entries, 1))
    return max(1024, min(model.MAX_SHOWN_RECORD_BYTES, share))


# The most versions a failed rollback lists, each with why it was not taken.
ROLLBACK_REASONS_SHOWN = 10

NOTICE_BUDGET = 0.5
"""Seconds a write's answer may spend finding out whether its services are known."""

# How long a wait waits for another replica to report a revision before going on
# without it (its flushes come every half second while it lives).
REPLICA_GRACE = 2.0


def _result(outcome: WriteOutcome[Any]) -> pb.WriteResult:
    return pb.WriteResult(
        changed=outcome.changed,
        dry_run=outcome.dry_run,
        revision=outcome.revision,
        mod_revision=outcome.mod_revision,
        overridden_by=list(outcome.overridden_by),
        audit_id=outcome.audit_id,
        summary=outcome.summary,
        would_change=outcome.would_change,
    )


def _record(record: Any, mod_revision: int = 0) -> Any:
    return record.to_proto(mod_revision) if record is not None else None


def _cleared(outcome: WriteOutcome[Any]) -> dict[str, Any]:
    """The fields of a clear's response: the result, what was removed (or would be, on a
    dry run), what applies again."""
    removed = outcome.changed or outcome.would_change
    return {
        "result": _result(outcome),
        "removed": _record(outcome.previous) if removed else None,
        "restored": _record(outcome.restored, outcome.mod_revision),
    }


def _write_pair(outcome: WriteOutcome[Any]) -> dict[str, Any]:
    """The result, the record now in force and the one before, as response fields."""
    return {
        "result": _result(outcome),
        "current": _record(outcome.record, outcome.mod_revision),
        "previous": _record(outcome.previous),
    }


class _Servicer:
    """What every family of the service's RPCs works with."""

    def __init__(
        self,
        store: Store,
        metrics: ServerMetrics,
        hub: Hub,
        presence: Presence,
        services: ServiceDirectory,
        *,
        streams: OpenStreams | None = None,
        stale_after: timedelta = DEFAULT_STALE_AFTER,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.hub = hub
        self.presence = presence
        self.services = services
        self.streams = streams if streams is not None else OpenStreams()
        self.stale_after = stale_after

    async def _note(self, result: pb.WriteResult, *services: str) -> None:
        """Name in a write's result the services it concerns that no agent has reported.

        Best effort, after the write: a committed write (a rollback, say) must never be
        answered as failed because this could not be found out."""
        result.unknown_services.extend(await self._unknown_of(services))

    async def _unknown_of(
        self, services: Sequence[str], budget: float = NOTICE_BUDGET
    ) -> list[pb.UnknownService]:
        """The services of ``services`` no agent has reported; best effort, within
        ``budget`` of its own (running out says nothing of etcd's health): none when it
        cannot be found out."""
        try:
            with self.store.budget(budget, caller_deadline=True):
                return await self.services.unknown_of(services)
        except ControlPlaneError as exc:
            log.warning("unknown_service_check_failed", error=exc.message)
            return []

    @staticmethod
    def _options(msg: pb.WriteOptions, *, allow_expiry: bool = True) -> model.WriteOptions:
        options = model.write_options_from_proto(msg, now=model.utcnow(), allow_expiry=allow_expiry)
        identity = current_identity.get()
        if identity is None:
            return options
        # With authentication on, the audit names who authenticated, whatever the
        # request says.
        return replace(options, actor=identity.name, actor_authenticated=True)


class _RecordRPCs(_Servicer):
    """Flags, shedding levels, pins and known-good versions: set, get, list, clear."""

    @rpc
    async def SetFlag(self, request: mpb.SetFlagRequest, context: Any) -> mpb.SetFlagResponse:
        scope = model.validate_scope(request.scope)
        name = model.validate_new_flag_name(request.name)
        value = model.flag_value_from_proto(request.value)
        outcome = await self.store.set_flag(
            scope, name, value, self._options(request.options), change_type=request.change_type
        )
        w = _write_pair(outcome)
        await self._note(w["result"], scope)
        return mpb.SetFlagResponse(result=w["result"], flag=w["current"], previous=w["previous"])

    @rpc
    async def GetFlag(self, request: mpb.GetFlagRequest, context: Any) -> mpb.GetFlagResponse:
        scope = model.validate_scope(request.scope)
        name = model.validate_flag_name(request.name)
        if request.effective and scope != GLOBAL_SCOPE:
            stored = await self.store.get_effective_flag(scope, name)
            where = f"for {scope} (nor globally)"
        else:
            stored = await self.store.get_flag(scope, name)
            where = "globally" if scope == GLOBAL_SCOPE else f"for {scope}"
        if stored is None:
            raise NotFoundError(f"flag {name} is not set {where}")
        hidden = await self.store.services_overriding(name) if scope == GLOBAL_SCOPE else []
        return mpb.GetFlagResponse(
            flag=stored.record.to_proto(stored.mod_revision), overridden_by=hidden
        )

    @rpc
    async def ListFlags(self, request: mpb.ListFlagsRequest, context: Any) -> mpb.ListFlagsResponse:
        scope = model.validate_scope(request.scope) if request.scope else ""
        flags, revision = await self.store.list_flags(scope, effective=request.effective)
        return mpb.ListFlagsResponse(
            flags=[f.record.to_proto(f.mod_revision) for f in flags], revision=revision
        )

    @rpc
    async def ClearFlag(self, request: mpb.ClearFlagRequest, context: Any) -> mpb.ClearFlagResponse:
        scope = model.validate_scope(request.scope)
        name = model.validate_flag_name(request.name)
        opts = self._options(request.options, allow_expiry=False)
        outcome = await self.store.clear_flag(scope, name, opts, all_layers=request.all_layers)
        cleared = _cleared(outcome)
        await self._note(cleared["result"], scope)
        return mpb.ClearFlagResponse(**cleared)

    # -- shedding --------------------------------------------------------------

    @rpc
    async def SetShedding(
        self, request: mpb.SetSheddingRequest, context: Any
    ) -> mpb.SetSheddingResponse:
        service = model.validate_service(request.service)
        tier = model.tier_from_proto(request.tier)
        percent = model.validate_percent(request.percent)
        outcome = await self.store.set_shedding(
            service, tier, percent, self._options(request.options)
        )
        w = _write_pair(outcome)
        await self._note(w["result"], service)
        return mpb.SetSheddingResponse(
            result=w["result"], shedding=w["current"], previous=w["previous"]
        )

    @rpc
    async def GetShedding(
        self, request: mpb.GetSheddingRequest, context: Any
    ) -> mpb.GetSheddingResponse:
        service = model.validate_service(request.service)
        stored = await self.store.get_shedding(service)
        if stored is None:
            raise NotFoundError(f"{service} has no shedding level set")
        return mpb.GetSheddingResponse(shedding=stored.record.to_proto(stored.mod_revision))

    @rpc
    async def ListShedding(
        self, request: mpb.ListSheddingRequest, context: Any
    ) -> mpb.ListSheddingResponse:
        rows, revision = await self.store.list_shedding()
        return mpb.ListSheddingResponse(
            shedding=[r.record.to_proto(r.mod_revision) for r in rows], revision=revision
        )

    @rpc
    async def ClearShedding(
        self, request: mpb.ClearSheddingRequest, context: Any
    ) -> mpb.ClearSheddingResponse:
        service = model.validate_service(request.service)
        opts = self._options(request.options, allow_expiry=False)
        outcome = await self.store.clear_shedding(service, opts, all_layers=request.all_layers)
        cleared = _cleared(outcome)
        await self._note(cleared["result"], service)
        return mpb.ClearSheddingResponse(**cleared)

    # -- pins and known-good -------------------------------------------------------

    @rpc
    async def PinVersion(
        self, request: mpb.PinVersionRequest, context: Any
    ) -> mpb.PinVersionResponse:
        service = model.validate_service(request.service)
        version = model.validate_version(request.version)
        outcome = await self.store.pin(service, version, self._options(request.options))
        w = _write_pair(outcome)
        await self._note(w["result"], service)
        return mpb.PinVersionResponse(result=w["result"], pin=w["current"], previous=w["previous"])

    @rpc
    async def GetPin(self, request: mpb.GetPinRequest, context: Any) -> mpb.GetPinResponse:
        service = model.validate_service(request.service)
        stored = await self.store.get_pin(service)
        if stored is None:
            raise NotFoundError(f"{service} is not pinned")
        return mpb.GetPinResponse(pin=stored.record.to_proto(stored.mod_revision))

    @rpc
    async def ListPins(self, request: mpb.ListPinsRequest, context: Any) -> mpb.ListPinsResponse:
        rows, revision = await self.store.list_pins()
        return mpb.ListPinsResponse(
            pins=[r.record.to_proto(r.mod_revision) for r in rows], revision=revision
        )

    @rpc
    async def UnpinVersion(
        self, request: mpb.UnpinVersionRequest, context: Any
    ) -> mpb.UnpinVersionResponse:
        service = model.validate_service(request.service)
        opts = self._options(request.options, allow_expiry=False)
        outcome = await self.store.unpin(service, opts, all_layers=request.all_layers)
        cleared = _cleared(outcome)
        await self._note(cleared["result"], service)
        return mpb.UnpinVersionResponse(**cleared)

    @rpc
    async def MarkKnownGood(
        self, request: mpb.MarkKnownGoodRequest, context: Any
    ) -> mpb.MarkKnownGoodResponse:
        service = model.validate_service(request.service)
        version = model.validate_version(request.version)
        opts = self._options(request.options, allow_expiry=False)
        outcome = await self.store.mark_known_good(service, version, opts)
        return mpb.MarkKnownGoodResponse(
            result=_result(outcome), known_good=_record(outcome.record, outcome.mod_revision)
        )

    @rpc
    async def UnmarkKnownGood(
        self, request: mpb.UnmarkKnownGoodRequest, context: Any
    ) -> mpb.UnmarkKnownGoodResponse:
        service = model.validate_service(request.service)
        version = model.validate_version(request.version)
        opts = self._options(request.options, allow_expiry=False)
        outcome = await self.store.unmark_known_good(service, version, opts)
        return mpb.UnmarkKnownGoodResponse(
            result=_result(outcome),
            removed=_record(outcome.previous) if outcome.changed else None,
        )

    @rpc
    async def ListKnownGood(
        self, request: mpb.ListKnownGoodRequest, context: Any
    ) -> mpb.ListKnownGoodResponse:
        service = model.validate_service(request.service)
        marks = await self.store.list_known_good(service)
        return mpb.ListKnownGoodResponse(
            known_good=[m.record.to_proto(m.mod_revision) for m in marks]
        )

    @rpc
    async def Rollback(self, request: mpb.RollbackRequest, context: Any) -> mpb.RollbackResponse:
        """Pin the service to the version ``rollback_target`` chooses: back, never forward.

        "Current" is the pin or, without one, ``current_version``. The most recently marked
        known-good version other than the current one is pinned; when the current version
        is itself marked known-good, only versions marked before it qualify. Nothing to
        roll back to is FAILED_PRECONDITION, naming each version considered and why it was
        not taken.
        """
        service = model.validate_service(request.service)
        opts = self._options(request.options)
        if request.current_version:
            model.validate_version(request.current_version, "current_version")
        pin = await self.store.get_pin(service)
        current = pin.record.version if pin is not None else request.current_version
        if opts.expected_mod_revision is None:
            # Decided on the pin just read: fail rather than overwrite a newer one.
            opts = replace(opts, expected_mod_revision=pin.mod_revision if pin else 0)
        if not current:
            raise FailedPreconditionError(
                f"{service} is not pinned, so its current version is unknown: name the "
                "version it runs (current_version)"
            )
        marks = await self.store.list_known_good(service)
        target = rollback_target(
            service,
            current,
            [m.record for m in marks],
            source="its pin" if pin is not None else "the current_version given",
        )
        outcome = await self.store.pin(service, target, opts, action="pin.rollback")
        result = _result(outcome)
        await self._note(result, service)
        return mpb.RollbackResponse(
            result=result,
            pin=_record(outcome.record, outcome.mod_revision),
            from_version=current,
        )


def rollback_target(
    service: str, current: str, marks: Sequence[model.KnownGood], *, source: str
) -> str:
    """The version a rollback of ``service`` from ``current`` pins: back, never forward.

    ``marks`` are the service's known-good versions, most recently marked first. The
    target is the most recently marked one other than ``current``. When ``current`` is
    itself marked known-good, only versions marked before it qualify: one marked after it
    is a newer release than the one running, and going there is a roll forward, which is
    for ``pin set`` to do on purpose. (When ``current`` is not marked, nothing says which
    versions are older, and every other mark qualifies.) ``source`` says where
    ``current`` came from, for the error.

    Raises:
        FailedPreconditionError: no version qualifies; the message lists each version
            considered and why it was not taken.
    """
    at = next((i for i, m in enumerate(marks) if m.version == current), None)
    if at is None:
        # Not marked itself: the most recently marked version, if there is one.
        if marks:
            return marks[0].version
        raise FailedPreconditionError(
            f"nothing to roll back to: {service} is on {current} ({source}) and has no "
            f"known-good versions: mark one (`cpctl known-good mark {service} VERSION`), or "
            "pin a version with `cpctl pin set`"
        )
    if at + 1 < len(marks):
        return marks[at + 1].version
    later = [
        f"{mark.version} was marked after {current} (a rollback goes back, never forward); "
        f"pin it with `cpctl pin set {service} {mark.version}` if you mean it"
        for mark in marks[:at]
    ]
    if len(later) > ROLLBACK_REASONS_SHOWN:
        hidden = len(later) - ROLLBACK_REASONS_SHOWN
        later = [*later[:ROLLBACK_REASONS_SHOWN], f"and {hidden} more marked after {current}"]
    considered = "".join(
        f"\n  {reason}" for reason in [*later, f"{current} is the current version"]
    )
    raise FailedPreconditionError(
        f"nothing to roll back to: {service} is on {current} ({source}); {current} is itself "
        f"marked known-good, so only versions marked before it qualify, and there is none. "
        f"Considered:{considered}"
    )


class _BundleRPCs(_Servicer):
    """Bundles: several changes applied together, and reverted together."""

    def _bundle_plan(
        self,
        index: int,
        change: mpb.BundleChange,
        opts: model.WriteOptions,
        flag_sets: Mapping[str, Mapping[str, semantics.Sibling]] | None = None,
    ) -> Plan:
        """Validate one change of a bundle and plan it; errors name the change and field."""
        kind = change.WhichOneof("change")
        where = f"changes[{index}]"
        if kind is None:
            raise InvalidArgumentError(
                where, "is empty: give one of " + ", ".join(_BUNDLE_CHANGE_KINDS)
            )
        field = f"{where}.{kind}"
        if getattr(change, kind).HasField("options"):
            raise InvalidArgumentError(
                f"{field}.options",
                "a change in a bundle has no options of its own: the bundle's options apply",
            )
        if kind.startswith(("clear_", "unpin_")) and opts.expires_at is not None:
            raise InvalidArgumentError(
                field, "a clear cannot expire: apply a bundle with an expiry only to sets and pins"
            )
        if kind == "set_flag":
            r = change.set_flag
            return self.store.plan_set_flag(
                model.validate_scope(r.scope, f"{field}.scope"),
                model.validate_new_flag_name(r.name, f"{field}.name"),
                model.flag_value_from_proto(r.value, f"{field}.value"),
                change_type=r.change_type,
                siblings=(flag_sets or {}).get(r.name),
            )
        if kind == "clear_flag":
            c = change.clear_flag
            return self.store.plan_clear_flag(
                model.validate_scope(c.scope, f"{field}.scope"),
                model.validate_flag_name(c.name, f"{field}.name"),
                all_layers=c.all_layers,
            )
        if kind == "set_shedding":
            sh = change.set_shedding
            return self.store.plan_set_shedding(
                model.validate_service(sh.service, f"{field}.service"),
                model.tier_from_proto(sh.tier, f"{field}.tier"),
                model.validate_percent(sh.percent, f"{field}.percent"),
            )
        if kind == "clear_shedding":
            cs = change.clear_shedding
            return self.store.plan_clear_shedding(
                model.validate_service(cs.service, f"{field}.service"), all_layers=cs.all_layers
            )
        if kind == "pin_version":
            pv = change.pin_version
            return self.store.plan_pin(
                model.validate_service(pv.service, f"{field}.service"),
                model.validate_version(pv.version, f"{field}.version"),
            )
        u = change.unpin_version
        return self.store.plan_unpin(
            model.validate_service(u.service, f"{field}.service"), all_layers=u.all_layers
        )

    @rpc
    async def ApplyBundle(
        self, request: mpb.ApplyBundleRequest, context: Any
    ) -> mpb.ApplyBundleResponse:
        name = model.validate_bundle_name(request.name)
        opts = self._options(request.options)
        if opts.expected_mod_revision is not None:
            raise InvalidArgumentError(
                "options.expected_mod_revision", "does not apply to a bundle (it has many keys)"
            )
        outcome, result = await self._apply_changes(name, request.changes, opts)
        return mpb.ApplyBundleResponse(
            result=result,
            bundle=_bundle_proto(outcome.view) if outcome.view is not None else None,
        )

    def _plan_changes(
        self, changes: Sequence[mpb.BundleChange], opts: model.WriteOptions
    ) -> list[Plan]:
        """Validate a bundle's changes and plan them (nothing written)."""
        if not changes:
            raise InvalidArgumentError("changes", "a bundle needs at least one change")
        if len(changes) > model.MAX_BUNDLE_CHANGES:
            raise InvalidArgumentError(
                "changes",
                f"{len(changes)} changes, over the maximum of "
                f"{model.MAX_BUNDLE_CHANGES} per bundle: split it into several bundles",
            )
        # What the bundle does to each flag, by scope: a first value in one scope takes
        # the type the flag has in the others once the bundle is applied.
        flag_sets: dict[str, dict[str, semantics.Sibling]] = {}
        for change in changes:
            kind = change.WhichOneof("change")
            if kind == "set_flag":
                r = change.set_flag
                with contextlib.suppress(InvalidArgumentError):  # refused in its own plan
                    value = model.flag_value_from_proto(r.value, "value")
                    sibling = semantics.Sibling(value, change_type=r.change_type)
                    flag_sets.setdefault(r.name, {})[r.scope] = sibling
            elif kind == "clear_flag":
                c = change.clear_flag
                cleared = semantics.Sibling(None, all_layers=c.all_layers)
                flag_sets.setdefault(c.name, {})[c.scope] = cleared
        return [self._bundle_plan(i, c, opts, flag_sets) for i, c in enumerate(changes)]

    async def _apply_changes(
        self, name: str, changes: Sequence[mpb.BundleChange], opts: model.WriteOptions
    ) -> tuple[BundleOutcome, pb.WriteResult]:
        """Apply a bundle (validated here): what ApplyBundle and triggers do."""
        plans = self._plan_changes(changes, opts)
        outcome = await self.store.apply_bundle(
            name, plans, [_change_json(c) for c in changes], opts
        )
        result = _bundle_result(outcome)
        await self._note(result, *(plan.key.scope for plan in plans))
        return outcome, result

    @rpc
    async def RevertBundle(
        self, request: mpb.RevertBundleRequest, context: Any
    ) -> mpb.RevertBundleResponse:
        bundle_id = _bundle_id(request.bundle_id)
        opts = self._options(request.options, allow_expiry=False)
        if opts.expected_mod_revision is not None:
            raise InvalidArgumentError(
                "options.expected_mod_revision", "does not apply to a bundle (it has many keys)"
            )
        outcome = await self.store.revert_bundle(bundle_id, opts, force=request.force)
        return mpb.RevertBundleResponse(
            result=_bundle_result(outcome),
            bundle=_bundle_proto(outcome.view) if outcome.view is not None else None,
            overwritten_keys=list(outcome.overwritten),
        )

    @rpc
    async def ListBundles(
        self, request: mpb.ListBundlesRequest, context: Any
    ) -> mpb.ListBundlesResponse:
        if request.limit < 0:
            raise InvalidArgumentError("limit", "must be 0 (all) or more")
        views = await self.store.list_bundles(limit=request.limit)
        return mpb.ListBundlesResponse(bundles=[_bundle_proto(v) for v in views])

    @rpc
    async def GetBundle(self, request: mpb.GetBundleRequest, context: Any) -> mpb.GetBundleResponse:
        bundle_id = _bundle_id(request.bundle_id)
        view = await self.store.get_bundle(bundle_id)
        if view is None:
            raise NotFoundError(f"no bundle {bundle_id}")
        return mpb.GetBundleResponse(bundle=_bundle_proto(view))


class _ObservationRPCs(_Servicer):
    """What the state is and was: status, history, the watch, the timeline, waits."""

    @rpc
    async def GetStatus(self, request: mpb.GetStatusRequest, context: Any) -> mpb.GetStatusResponse:
        service = model.validate_service(request.service)
        flags, _ = await self.store.list_flags(service, effective=True)
        shedding = await self.store.get_shedding(service)
        pin = await self.store.get_pin(service)
        revision = await self.store.revision()
        instances = await self.presence.instances(service)
        response = mpb.GetStatusResponse(
            service=service,
            revision=revision,
            flags=[f.record.to_proto(f.mod_revision) for f in flags],
            instances=[self._instance_proto(i) for i in instances],
        )
        if shedding is not None:
            response.shedding.CopyFrom(shedding.record.to_proto(shedding.mod_revision))
        if pin is not None:
            response.pin.CopyFrom(pin.record.to_proto(pin.mod_revision))
            for instance in instances:
                if instance.running_version and instance.running_version != pin.record.version:
                    response.drift[instance.running_version] = (
                        response.drift.get(instance.running_version, 0) + 1
                    )
        response.sync_clients = await self._sync_clients(service)
        response.stale_after.FromTimedelta(self.stale_after)
        response.stale.extend(stale_mitigations(response, model.utcnow(), self.stale_after))
        contact = (
            model.utcnow()
            if any(i.connected for i in instances)
            else await self.presence.last_contact(service)
        )
        if contact is not None:
            response.last_contact.CopyFrom(model.datetime_to_timestamp(contact))
        else:
            unknown = await self.services.unknown(service)
            if unknown is not None:
                response.unknown.CopyFrom(unknown)
        return response

    @rpc
    async def ListServices(
        self, request: mpb.ListServicesRequest, context: Any
    ) -> mpb.ListServicesResponse:
        return await self.services.summaries()

    async def _sync_clients(self, service: str) -> int:
        """How many OpenFeature sync clients ``service`` has; best effort, in a budget of its
        own (a wait has spent the call's by the time it answers)."""
        try:
            with self.store.budget(self.store.etcd_timeout):
                return await self.presence.sync_clients(service)
        except ControlPlaneError as exc:
            log.warning("sync_clients_unknown", service=service, error=exc.message)
            return 0

    def _instance_proto(self, instance: Instance) -> pb.Instance:
        lag = self.hub.relevant_since(instance.service, instance.applied)
        msg = pb.Instance(
            service=instance.service,
            instance_id=instance.instance_id,
            running_version=instance.running_version,
            applied_revision=instance.applied,
            connected=instance.connected,
            lag=lag if lag is not None else -1,
            server_id=instance.server_id,
            override_active=instance.override_active,
        )
        if instance.last_seen is not None:
            msg.last_seen.CopyFrom(model.datetime_to_timestamp(instance.last_seen))
        return msg

    @rpc
    async def ListHistory(
        self, request: mpb.ListHistoryRequest, context: Any
    ) -> mpb.ListHistoryResponse:
        service = model.validate_service(request.service) if request.service else ""
        if request.limit < 0 or request.limit > MAX_HISTORY_LIMIT:
            raise InvalidArgumentError("limit", f"must be 0 (default) to {MAX_HISTORY_LIMIT}")
        since = _time_or_none(request, "since")
        until = _time_or_none(request, "until")
        if since and until and since > until:
            raise InvalidArgumentError("since", "is after until")
        entries = await self.store.list_history(
            service=service,
            incident=model.validate_incident(request.incident),
            since=since,
            until=until,
            limit=request.limit or DEFAULT_HISTORY_LIMIT,
        )
        shown = _shown_bytes(len(entries))
        return mpb.ListHistoryResponse(entries=[e.to_proto(shown) for e in entries])

    async def WatchChanges(
        self, request: mpb.WatchChangesRequest, context: Any
    ) -> AsyncIterator[mpb.WatchChangesResponse]:
        """Every change as it is written (its audit record), for one service or all."""
        start = time.perf_counter()
        try:
            service = model.validate_service(request.service) if request.service else ""
        except InvalidArgumentError as exc:
            log_rpc(self.metrics, "WatchChanges", exc.code.name, start, actor_of(), exc.message)
            await context.abort(exc.code, exc.message)
            return
        if self.streams.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        code = "OK"
        with self.streams.held():
            try:
                await self.hub.ready.wait()
                history = self.hub.history
                sent = self.hub.revision
                # First, the revision the watch starts after (no changes): the watch is live.
                yield mpb.WatchChangesResponse(revision=sent)
                while True:
                    await history.wait_past(sent)
                    batches, dropped = history.since(sent)
                    if dropped:
                        log.warning("watch_fell_behind", service=service or None, after=sent)
                    for revision, entries in batches:
                        chosen = [
                            e.to_proto()
                            for e in entries
                            if not service or e.scope in (service, GLOBAL_SCOPE)
                        ]
                        if chosen:
                            yield mpb.WatchChangesResponse(revision=revision, changes=chosen)
                        sent = revision
            except asyncio.CancelledError:
                if self.streams.ended_by_close():
                    code = "UNAVAILABLE"
                    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                code = "CANCELLED"
                raise
            finally:
                log_rpc(self.metrics, "WatchChanges", code, start, actor_of(), None)

    @rpc
    async def GetTimeline(
        self, request: mpb.GetTimelineRequest, context: Any
    ) -> mpb.GetTimelineResponse:
        incident = model.validate_incident(request.incident)
        if not incident:
            raise InvalidArgumentError("incident", "is required: the incident id (e.g. INC-42)")
        if request.limit < 0 or request.limit > MAX_TIMELINE_LIMIT:
            raise InvalidArgumentError("limit", f"must be 0 (default 1000) to {MAX_TIMELINE_LIMIT}")
        entries = await self.store.list_history(incident=incident, limit=request.limit or 1000)
        entries.reverse()  # oldest first
        records = await self.presence.applied_records(entries[0].revision) if entries else {}
        shown = _shown_bytes(len(entries))
        return mpb.GetTimelineResponse(
            incident=incident,
            entries=[
                mpb.TimelineEntry(
                    change=entry.to_proto(shown),
                    applied=_applied_for(records, entry.scope, entry.revision),
                )
                for entry in entries
            ],
        )

    @rpc
    async def ListNotifications(
        self, request: mpb.ListNotificationsRequest, context: Any
    ) -> mpb.ListNotificationsResponse:
        if request.limit < 0 or request.limit > MAX_NOTIFICATIONS_LIMIT:
            raise InvalidArgumentError(
                "limit", f"must be 0 (default 50) to {MAX_NOTIFICATIONS_LIMIT}"
            )
        state = self.store.notify_state
        response = mpb.ListNotificationsResponse(sender=await state.holder() or "")
        for name, value in sorted((await state.states()).items()):
            destination = mpb.NotificationDestination(name=name, cursor=int(value.get("cursor", 0)))
            pending = value.get("pending")
            if isinstance(pending, dict):
                destination.pending_id = str(pending.get("id", ""))
                destination.attempts = int(pending.get("attempts", 0))
                with contextlib.suppress(ValueError, TypeError):
                    since = model.parse_time(str(pending.get("since")))
                    destination.pending_since.CopyFrom(model.datetime_to_timestamp(since))
            response.destinations.append(destination)
        for failure in await state.failed(request.limit or 50):
            failed = mpb.FailedNotification(
                id=str(failure.get("id", "")),
                destination=str(failure.get("destination", "")),
                kind=str(failure.get("kind", "")),
                title=str(failure.get("title", "")),
                lines=[str(line) for line in failure.get("lines") or []],
                attempts=int(failure.get("attempts", 0)),
                error=str(failure.get("error", "")),
            )
            for field_name in ("first_attempt", "given_up_at"):
                with contextlib.suppress(ValueError, TypeError):
                    moment = model.parse_time(str(failure.get(field_name)))
                    getattr(failed, field_name).CopyFrom(model.datetime_to_timestamp(moment))
            response.failed.append(failed)
        return response

    @rpc
    async def WaitApplied(
        self, request: mpb.WaitAppliedRequest, context: Any
    ) -> mpb.WaitAppliedResponse:
        """Wait until every connected instance of a service applied a revision (or later)."""
        service = model.validate_service(request.service)
        if request.revision <= 0:
            raise InvalidArgumentError("revision", "must be a positive etcd revision")
        timeout = (
            model.duration_to_timedelta(request.timeout, "timeout").total_seconds()
            if request.HasField("timeout")
            else 10.0
        )
        if not 0 < timeout <= 300:
            raise InvalidArgumentError("timeout", "must be more than 0 and at most 300 s")
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, max(remaining - 0.05, 0.0))
        started = time.monotonic()
        deadline = started + timeout
        while True:
            with self.store.budget(self.store.etcd_timeout):
                instances, reported = await self.presence.view(service)
            # Other replicas that have not reported past the revision may still hold
            # agents for it: wait for them a little (a live one reports within half a
            # second; a dead one never will, and its agents move elsewhere).
            behind = [
                server
                for server, seen in reported.items()
                if seen < request.revision and time.monotonic() - started < REPLICA_GRACE
            ]
            applied = [i for i in instances if i.applied >= request.revision]
            # A rejected revision at or after R (R may have been coalesced into it) that
            # the instance has not since applied past.
            nacks = {
                i.instance_id: reason
                for i in instances
                for rejected, reason in i.nacks.items()
                if rejected >= request.revision and rejected > i.applied
            }
            pending = [
                i for i in instances if i.applied < request.revision and i.instance_id not in nacks
            ]
            left = deadline - time.monotonic()
            settled = not behind and (not instances or not pending)
            if settled or nacks or left <= 0:
                break
            # Woken when every local instance applied the latest change (or one left or
            # rejected it); other replicas' acks arrive with their flushes.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.1)):
                    await self.presence.changed(service)
        response = mpb.WaitAppliedResponse(
            all_applied=bool(instances) and not pending and not nacks and not behind,
            connected=len(instances),
            applied=len(applied),
            pending=[self._instance_proto(i) for i in pending],
            nacks=nacks,
            sync_clients=await self._sync_clients(service),
        )
        # Never seen (a typo?): best effort, within what is left of the caller's time.
        # Sync clients leave no last contact: a service of theirs is known.
        left = context.time_remaining()
        budget = NOTICE_BUDGET if left is None else min(NOTICE_BUDGET, left - 0.02)
        if not instances and not response.sync_clients and budget > 0.05:
            for unknown in await self._unknown_of([service], budget):
                response.unknown.CopyFrom(unknown)
        if response.all_applied:
            # When the last instance applied it, from the processes' records (they may
            # trail by a flush; then now, which is when we learnt it).
            servers = {i.server_id for i in instances}
            with self.store.budget(self.store.etcd_timeout):
                when = await self.presence.applied_at(service, request.revision, servers)
            response.applied_at.CopyFrom(model.datetime_to_timestamp(when or model.utcnow()))
        return response


def stale_mitigations(
    status: mpb.GetStatusResponse, now: datetime, stale_after: timedelta
) -> list[mpb.StaleMitigation]:
    """The mitigations of ``status`` in force without expiry for longer than ``stale_after``,
    oldest first."""
    records: list[tuple[str, str, str, pb.Meta]] = [
        ("flag", flag.scope, flag.name, flag.meta) for flag in status.flags
    ]
    if status.HasField("shedding"):
        records.append(("shedding", status.service, "", status.shedding.meta))
    if status.HasField("pin"):
        records.append(("pin", status.service, status.pin.version, status.pin.meta))
    found = []
    for kind, scope, name, meta in records:
        if meta.HasField("expires_at") or not meta.HasField("set_at"):
            continue
        age = now - meta.set_at.ToDatetime(UTC)
        if age > stale_after:
            stale = mpb.StaleMitigation(kind=kind, scope=scope, name=name)
            stale.set_at.CopyFrom(meta.set_at)
            stale.age.FromTimedelta(age)
            found.append(stale)
    found.sort(key=lambda s: (s.set_at.seconds, s.set_at.nanos))
    return found


class MitigationServicer(
    _RecordRPCs,
    _BundleRPCs,
    _ObservationRPCs,
    TriggerRPCs,
    mitigation_pb2_grpc.MitigationServiceServicer,
):
    """What on-call engineers, runbooks and deploy pipelines call."""


_BUNDLE_CHANGE_KINDS = (
    "set_flag", "clear_flag", "set_shedding", "clear_shedding", "pin_version", "unpin_version",
)  # fmt: skip
_BUNDLE_ID_RE = re.compile(r"[0-9]{8}-[0-9]{6}-[a-z0-9][a-z0-9._-]{0,63}-[0-9a-f]{4}")


def _bundle_id(value: str) -> str:
    if not _BUNDLE_ID_RE.fullmatch(value):
        raise InvalidArgumentError(
            "bundle_id", f"{value[:80]!r} is not a bundle id (like 20261126-164500-name-3fa2)"
        )
    return value


def _change_json(change: mpb.BundleChange) -> dict[str, Any]:
    """A change as stored in its bundle's record: canonical JSON, options removed."""
    copy = mpb.BundleChange()
    copy.CopyFrom(change)
    kind = copy.WhichOneof("change")
    if kind is not None:
        getattr(copy, kind).ClearField("options")
    return json_format.MessageToDict(copy, preserving_proto_field_name=True)


def _bundle_result(outcome: BundleOutcome) -> pb.WriteResult:
    return pb.WriteResult(
        changed=outcome.changed,
        dry_run=outcome.dry_run,
        revision=outcome.revision,
        in_force_since=outcome.in_force_since,
        summary=outcome.summary,
        would_change=outcome.would_change,
        audit_id=outcome.audit_ids[0] if outcome.audit_ids else "",
    )


def _bundle_proto(view: BundleView) -> mpb.Bundle:
    bundle = view.bundle
    msg = mpb.Bundle(
        id=bundle.id,
        name=bundle.name,
        changes=[json_format.ParseDict(c, mpb.BundleChange()) for c in bundle.changes],
        meta=bundle.meta.to_proto(),
        state=view.state.value,  # type: ignore[arg-type]
        revision=view.revision,
        keys=[e.path for e in bundle.entries],
        overridden_keys=list(view.overridden_keys),
    )
    if bundle.reverted is not None:
        msg.reverted.CopyFrom(bundle.reverted.to_proto())
    return msg


def _applied_for(
    records: dict[str, list[tuple[int, str, datetime, int]]], scope: str, revision: int
) -> list[mpb.ServiceApplied]:
    """When each concerned service's instances had applied a change of ``revision``.

    A process records the newest change all its instances applied; a record at a
    later revision covers this one (changes are applied in order). Per process the
    earliest such record counts; per service, the latest process.
    """
    services = records if scope == GLOBAL_SCOPE else {scope: records.get(scope, [])}
    out = []
    for service, rows in sorted(services.items()):
        first: dict[str, tuple[datetime, int]] = {}
        for rev, server, when, count in rows:
            if rev >= revision and server not in first:
                first[server] = (when, count)
        if first:
            out.append(
                mpb.ServiceApplied(
                    service=service,
                    applied_at=model.datetime_to_timestamp(max(w for w, _ in first.values())),
                    instances=sum(c for _, c in first.values()),
                )
            )
    return out


def _time_or_none(request: Any, field_name: str) -> datetime | None:
    if not request.HasField(field_name):
        return None
    try:
        return model.timestamp_to_datetime(getattr(request, field_name))
    except (ValueError, OverflowError):
        raise InvalidArgumentError(field_name, "is not a valid time") from None
