"""Triggers: an alert that matches applies a bundle, once per alert group.

A trigger maps alert labels (every matcher must hold: ``=``, ``!=``, ``=~``, ``!~`` as in
Alertmanager, ``controlplane.model.Matcher``) to a bundle whose
content it stores (validated when the trigger is set, like ``ApplyBundle``). Firing it
(Alertmanager's webhook, or ``FireTrigger`` from any tool):

- a group that fired it already applies nothing new (Alertmanager repeats a firing
  group every ``repeat_interval``);
- a disabled trigger, or one within its cooldown after it last applied its bundle,
  applies nothing, and says so in the audit trail (so in the notifications);
- a dry run says what it would apply;
- else the bundle is applied with actor ``trigger:NAME``, the incident (the alert's
  ``incident`` label, else one made from the group), and the alert's summary and URL
  in the reason and the audit.

Resolving a group (Alertmanager's ``resolved``, or ``ResolveTrigger``) reverts the
bundle when the trigger says ``revert_on_resolve``, with the bundle revert's rule: only
if nothing changed its keys since (else it says so and leaves them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog
from google.protobuf import json_format

from controlplane import model
from controlplane.api.v1 import mitigation_pb2 as mpb
from controlplane.api.v1 import types_pb2 as pb
from controlplane.errors import (
    ControlPlaneError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from controlplane.metrics import ServerMetrics
from controlplane.server._rpc import rpc
from controlplane.server.auth import Access, current_identity
from controlplane.store import Store

if TYPE_CHECKING:
    from controlplane.store import BundleOutcome, Plan

__all__ = ["TriggerFiring", "TriggerRPCs"]

log = structlog.get_logger("controlplane.triggers")

MAX_TTL = timedelta(days=30)
MAX_COOLDOWN = timedelta(days=1)
MANUAL_GROUP = "manual"


@dataclasses.dataclass(frozen=True, slots=True)
class TriggerFiring:
    """What firing or resolving a trigger did."""

    name: str
    outcome: int  # mpb.TriggerOutcome
    bundle_id: str = ""
    message: str = ""
    result: pb.WriteResult | None = None


MAX_GROUP_KEY = 1024


def _check_group_key(group_key: str) -> None:
    if len(group_key) > MAX_GROUP_KEY:
        raise InvalidArgumentError(
            "group_key", f"{len(group_key)} characters, over {MAX_GROUP_KEY}: name the group"
        )


def incident_of(group_key: str) -> str:
    """An incident id for an alert group without an ``incident`` label: stable per group."""
    return "alert-" + hashlib.sha256(group_key.encode()).hexdigest()[:12]


def _duration(message: Any, field: str) -> timedelta | None:
    if not message.HasField(field):
        return None
    return timedelta(seconds=getattr(message, field).ToTimedelta().total_seconds())


def _record_of(
    trigger: mpb.Trigger, matchers: Sequence[model.Matcher], meta: model.Meta, enabled: bool
) -> dict[str, Any]:
    ttl = _duration(trigger, "ttl")
    cooldown = _duration(trigger, "cooldown")
    return {
        "kind": "trigger",
        "name": trigger.name,
        "matchers": [m.to_record() for m in matchers],
        "bundle_name": trigger.bundle_name,
        "changes": [
            json_format.MessageToDict(c, preserving_proto_field_name=True) for c in trigger.changes
        ],
        "ttl_seconds": ttl.total_seconds() if ttl else None,
        "revert_on_resolve": trigger.revert_on_resolve,
        "cooldown_seconds": cooldown.total_seconds() if cooldown else 0,
        "dry_run": trigger.dry_run,
        "enabled": enabled,
        "meta": meta.to_record(),
    }


def trigger_proto(record: dict[str, Any], mod_revision: int = 0) -> mpb.Trigger:
    msg = mpb.Trigger(
        name=str(record["name"]),
        matchers=[m.to_proto() for m in model.matchers_from_record(record.get("matchers"))],
        bundle_name=str(record.get("bundle_name", "")),
        changes=[json_format.ParseDict(c, mpb.BundleChange()) for c in record.get("changes", [])],
        revert_on_resolve=bool(record.get("revert_on_resolve")),
        dry_run=bool(record.get("dry_run")),
        enabled=bool(record.get("enabled", True)),
        meta=model.Meta.from_record(record["meta"]).to_proto(mod_revision),
    )
    if record.get("ttl_seconds"):
        msg.ttl.FromTimedelta(timedelta(seconds=float(record["ttl_seconds"])))
    if record.get("cooldown_seconds"):
        msg.cooldown.FromTimedelta(timedelta(seconds=float(record["cooldown_seconds"])))
    return msg


def matches(record: dict[str, Any], *label_sets: dict[str, str]) -> bool:
    """Whether every matcher of a trigger holds for each of ``label_sets`` (the alerts of
    a group)."""
    found = model.matchers_from_record(record.get("matchers"))
    return bool(found) and all(m.holds(labels) for labels in label_sets for m in found)


class TriggerRPCs:
    """The trigger RPCs, a part of MitigationService."""

    store: Store
    metrics: ServerMetrics

    if TYPE_CHECKING:

        @staticmethod
        def _options(msg: pb.WriteOptions, *, allow_expiry: bool = True) -> model.WriteOptions: ...

        def _plan_changes(
            self, changes: Sequence[mpb.BundleChange], opts: model.WriteOptions
        ) -> list[Plan]: ...

        async def _apply_changes(
            self, name: str, changes: Sequence[mpb.BundleChange], opts: model.WriteOptions
        ) -> tuple[BundleOutcome, pb.WriteResult]: ...

    # -- set, read, delete ---------------------------------------------------------

    def _validate(self, trigger: mpb.Trigger, opts: model.WriteOptions) -> list[model.Matcher]:
        """The trigger's matchers, when the whole trigger is valid."""
        model.validate_bundle_name(trigger.name, "trigger.name")
        matchers = model.matchers_from_proto(trigger.matchers)
        model.validate_bundle_name(trigger.bundle_name, "trigger.bundle_name")
        ttl = _duration(trigger, "ttl")
        if ttl is not None and not timedelta(0) < ttl <= MAX_TTL:
            raise InvalidArgumentError("trigger.ttl", "must be more than 0s and at most 30 days")
        cooldown = _duration(trigger, "cooldown")
        if cooldown is not None and not timedelta(0) <= cooldown <= MAX_COOLDOWN:
            raise InvalidArgumentError("trigger.cooldown", "must be 0s to 24h")
        # The bundle as it would be applied (an expiry, when the trigger has a ttl).
        expires = model.utcnow() + ttl if ttl is not None else None
        try:
            self._plan_changes(trigger.changes, dataclasses.replace(opts, expires_at=expires))
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"trigger.{exc.field}", exc.rule) from None
        return matchers

    @rpc
    async def SetTrigger(
        self, request: mpb.SetTriggerRequest, context: Any
    ) -> mpb.SetTriggerResponse:
        opts = self._options(request.options, allow_expiry=False)
        trigger = request.trigger
        matchers = self._validate(trigger, opts)
        current = await self.store.triggers.get(trigger.name)
        enabled = bool(current[0].get("enabled", True)) if current else True
        meta = model.Meta(
            actor=opts.actor,
            actor_authenticated=opts.actor_authenticated,
            reason=opts.reason,
            incident=opts.incident,
            set_at=model.utcnow(),
        )
        record = _record_of(trigger, matchers, meta, enabled)
        what = "changed" if current else "set"
        if opts.dry_run:
            return mpb.SetTriggerResponse(
                result=pb.WriteResult(
                    dry_run=True, would_change=True, summary=f"trigger {trigger.name} {what}"
                ),
                trigger=trigger_proto(record),
            )
        revision = await self.store.triggers.write(
            trigger.name,
            record,
            opts,
            "trigger.set",
            expected=current[1] if current else 0,
            before=current[0] if current else None,
        )
        return mpb.SetTriggerResponse(
            result=pb.WriteResult(
                changed=True, revision=revision, summary=f"trigger {trigger.name} {what}"
            ),
            trigger=trigger_proto(record, revision),
        )

    async def _trigger(self, name: str, field: str = "name") -> tuple[dict[str, Any], int]:
        model.validate_bundle_name(name, field)
        found = await self.store.triggers.get(name)
        if found is None:
            identity = current_identity.get()
            hint = ""
            if identity is None or identity.may(Access.READ):  # names only to readers
                known = sorted(str(r.get("name")) for r, _ in await self.store.triggers.list())
                hint = f" (triggers: {', '.join(known[:10])})" if known else " (there are none)"
            raise NotFoundError(f"no trigger {name}{hint}")
        return found

    @rpc
    async def GetTrigger(
        self, request: mpb.GetTriggerRequest, context: Any
    ) -> mpb.GetTriggerResponse:
        record, mod = await self._trigger(request.name)
        response = mpb.GetTriggerResponse(trigger=trigger_proto(record, mod))
        last = await self.store.triggers.last_fired(request.name)
        if last is not None:
            response.trigger.last_fired.CopyFrom(model.datetime_to_timestamp(last))
        return response

    @rpc
    async def ListTriggers(
        self, request: mpb.ListTriggersRequest, context: Any
    ) -> mpb.ListTriggersResponse:
        found = sorted(await self.store.triggers.list(), key=lambda item: str(item[0]["name"]))
        return mpb.ListTriggersResponse(triggers=[trigger_proto(r, m) for r, m in found])

    @rpc
    async def DeleteTrigger(
        self, request: mpb.DeleteTriggerRequest, context: Any
    ) -> mpb.DeleteTriggerResponse:
        opts = self._options(request.options, allow_expiry=False)
        record, mod = await self._trigger(request.name)
        if opts.dry_run:
            return mpb.DeleteTriggerResponse(
                result=pb.WriteResult(
                    dry_run=True, would_change=True, summary=f"trigger {request.name} deleted"
                )
            )
        revision = await self.store.triggers.write(
            request.name, None, opts, "trigger.delete", expected=mod, before=record
        )
        await self.store.triggers.forget(request.name)
        return mpb.DeleteTriggerResponse(
            result=pb.WriteResult(
                changed=True, revision=revision, summary=f"trigger {request.name} deleted"
            )
        )

    @rpc
    async def SetTriggerEnabled(
        self, request: mpb.SetTriggerEnabledRequest, context: Any
    ) -> mpb.SetTriggerEnabledResponse:
        opts = self._options(request.options, allow_expiry=False)
        record, mod = await self._trigger(request.name)
        state = "enabled" if request.enabled else "disabled"
        if bool(record.get("enabled", True)) == request.enabled:
            return mpb.SetTriggerEnabledResponse(
                result=pb.WriteResult(
                    changed=False,
                    dry_run=opts.dry_run,
                    summary=f"trigger {request.name} was {state} already",
                ),
                trigger=trigger_proto(record, mod),
            )
        updated = {**record, "enabled": request.enabled}
        if opts.dry_run:
            return mpb.SetTriggerEnabledResponse(
                result=pb.WriteResult(
                    dry_run=True, would_change=True, summary=f"trigger {request.name} {state}"
                ),
                trigger=trigger_proto(updated, mod),
            )
        revision = await self.store.triggers.write(
            request.name,
            updated,
            opts,
            "trigger.enable" if request.enabled else "trigger.disable",
            expected=mod,
            before=record,
        )
        return mpb.SetTriggerEnabledResponse(
            result=pb.WriteResult(
                changed=True, revision=revision, summary=f"trigger {request.name} {state}"
            ),
            trigger=trigger_proto(updated, revision),
        )

    # -- firing ----------------------------------------------------------------------

    @rpc
    async def FireTrigger(
        self, request: mpb.FireTriggerRequest, context: Any
    ) -> mpb.FireTriggerResponse:
        if request.incident:
            model.validate_incident(request.incident)
        _check_group_key(request.group_key)
        record, _ = await self._trigger(request.name)
        identity = current_identity.get()
        firing = await self.fire(
            record,
            group_key=request.group_key or MANUAL_GROUP,
            incident=request.incident,
            summary=request.summary[:500],
            url=request.url[:1000],
            caller=identity.name if identity is not None else "",
        )
        return mpb.FireTriggerResponse(
            outcome=firing.outcome,  # type: ignore[arg-type]
            bundle_id=firing.bundle_id,
            message=firing.message,
            result=firing.result,
        )

    @rpc
    async def ResolveTrigger(
        self, request: mpb.ResolveTriggerRequest, context: Any
    ) -> mpb.ResolveTriggerResponse:
        _check_group_key(request.group_key)
        record, _ = await self._trigger(request.name)
        firing = await self.resolve(record, group_key=request.group_key or MANUAL_GROUP)
        return mpb.ResolveTriggerResponse(
            outcome=firing.outcome,  # type: ignore[arg-type]
            bundle_id=firing.bundle_id,
            message=firing.message,
            result=firing.result,
        )

    async def _say(
        self, record: dict[str, Any], group_key: str, action: str, reason: str, **after: Any
    ) -> pb.WriteResult | None:
        """An audit record of what the trigger did (or not): the timeline and the
        notifications tell it. Once per trigger, group and action."""
        name = str(record["name"])
        digest = hashlib.sha256(group_key.encode()).hexdigest()[:32]
        try:
            revision = await self.store.record_event(
                action=action,
                kind="trigger",
                scope="global",
                name=name,
                actor=f"trigger:{name}",
                reason=reason,
                mark=f"trigger/{name}/{digest}/{action}/{after.get('bundle_id', '')}",
                after={"group_key": group_key, **after},
                incident=str(after.get("incident", "")),
            )
        except ControlPlaneError as exc:
            # What it did is applied (and audited) already: the saying is best effort.
            log.warning("trigger_not_audited", trigger=name, action=action, error=exc.message)
            return None
        if not revision:
            return None
        return pb.WriteResult(changed=True, revision=revision, summary=reason)

    async def say_failed(
        self, record: dict[str, Any], group_key: str, error: str, incident: str
    ) -> None:
        """A firing that failed on the trigger's own account (its bundle no longer
        applies): audited, so told, since no retry of Alertmanager's would fix it."""
        name = str(record["name"])
        message = f"trigger {name} could not apply bundle {record.get('bundle_name')}: {error}"
        await self._say(
            record,
            group_key,
            "trigger.failed",
            message,
            incident=incident or incident_of(group_key),
        )

    async def fire(
        self,
        record: dict[str, Any],
        *,
        group_key: str,
        incident: str,
        summary: str,
        url: str,
        caller: str = "",
    ) -> TriggerFiring:
        """Fire a trigger for an alert group (see the module's docstring)."""
        name = str(record["name"])
        incident = incident or incident_of(group_key)
        what = f"alert {summary}" if summary else "its alert"
        by = f" (fired by {caller})" if caller else ""
        prior = await self.store.triggers.fire(name, group_key)
        if prior is not None and not prior.get("resolved_at"):
            return _already(name, prior)
        if not record.get("enabled", True):
            message = f"trigger {name} is disabled: {what} applied nothing{by}"
            said = await self._say(
                record, group_key, "trigger.disabled", message, incident=incident
            )
            self.metrics.trigger_fires.labels(name, "disabled").inc()
            log.info("trigger_refused", trigger=name, why="disabled", group_key=group_key)
            return TriggerFiring(name, mpb.TRIGGER_DISABLED, message=message, result=said)
        changes = trigger_proto(record).changes
        ttl = record.get("ttl_seconds")
        now = model.utcnow()
        reason = f"{record['meta'].get('reason', 'trigger')}: {summary or 'alert firing'}"
        opts = model.WriteOptions(
            reason=reason[:1000],
            incident=incident,
            actor=f"trigger:{name}",
            actor_authenticated=True,
            expires_at=now + timedelta(seconds=float(ttl)) if ttl else None,
        )
        if record.get("dry_run"):
            self._plan_changes(changes, opts)
            message = (
                f"trigger {name} (dry run) would apply bundle {record['bundle_name']} "
                f"({len(changes)} changes) for {what}{by}"
            )
            said = await self._say(
                record, group_key, "trigger.would_apply", message, incident=incident, url=url
            )
            self.metrics.trigger_fires.labels(name, "dry_run").inc()
            log.info("trigger_dry_run", trigger=name, group_key=group_key)
            return TriggerFiring(name, mpb.TRIGGER_WOULD_APPLY, message=message, result=said)
        firing: dict[str, Any] = {
            "group_key": group_key,
            "bundle_id": "",
            "fired_at": model.format_time(now),
            "incident": incident,
            "summary": summary,
            "url": url,
            "caller": caller,
        }
        cooldown = float(record.get("cooldown_seconds") or 0)
        claimed, found = await self.store.triggers.claim(name, group_key, firing, cooldown)
        if claimed == "fired":
            return _already(name, found)
        if claimed == "cooldown":
            message = (
                f"trigger {name} is in its cooldown ({timedelta(seconds=cooldown)} after it "
                f"fired at {model.format_time(found)}): {what} applied nothing{by}"
            )
            said = await self._say(
                record, group_key, "trigger.cooldown", message, incident=incident
            )
            self.metrics.trigger_fires.labels(name, "cooldown").inc()
            log.info("trigger_refused", trigger=name, why="cooldown", group_key=group_key)
            return TriggerFiring(name, mpb.TRIGGER_COOLDOWN, message=message, result=said)
        try:
            outcome, result = await self._apply_changes(str(record["bundle_name"]), changes, opts)
        except BaseException:
            # Not applied: the group may fire again (Alertmanager retries a 503).
            with contextlib.suppress(ControlPlaneError):
                await self.store.triggers.release(name, group_key, int(found))
            raise
        bundle_id = outcome.view.bundle.id if outcome.view is not None else ""
        # The same bundle in force already (applied by hand): it is not the trigger's, and
        # resolving the alert leaves it.
        firing.update(bundle_id=bundle_id, adopted=not result.changed)
        fired = await self.store.triggers.record_fire(name, group_key, firing)
        message = f"trigger {name} applied bundle {bundle_id} for {what}{by}" + (
            f" ({url})" if url else ""
        )
        if not result.changed:
            message = (
                f"trigger {name}: bundle {bundle_id} was in force already for {what}{by}: "
                "nothing new applied, and resolving the alert will leave it"
            )
        await self._say(
            record,
            group_key,
            "trigger.fired",
            message,
            incident=incident,
            bundle_id=bundle_id,
            url=url,
            caller=caller,
        )
        self.metrics.trigger_fires.labels(name, "fired").inc()
        log.info("trigger_fired", trigger=name, bundle_id=bundle_id, incident=incident)
        if not result.changed:
            result = pb.WriteResult(changed=True, revision=fired, summary=message)
        return TriggerFiring(name, mpb.TRIGGER_FIRED, bundle_id, message, result)

    async def resolve(self, record: dict[str, Any], *, group_key: str) -> TriggerFiring:
        """An alert group resolved: revert what it fired, when the trigger says so (the
        group is marked resolved in every case: the next firing fires anew)."""
        name = str(record["name"])
        prior = await self.store.triggers.fire(name, group_key)
        if prior is None or prior.get("resolved_at"):
            return TriggerFiring(
                name,
                mpb.TRIGGER_NOT_REVERTED,
                message=f"trigger {name} applied nothing for this alert group: nothing to revert",
            )
        bundle_id = str(prior.get("bundle_id", ""))
        incident = str(prior.get("incident", ""))
        resolved = {**prior, "resolved_at": model.format_time(model.utcnow())}
        message = ""
        if not record.get("revert_on_resolve"):
            message = (
                f"the alert resolved; trigger {name} does not revert on resolve: bundle "
                f"{bundle_id} stays (cpctl bundle revert {bundle_id})"
            )
        elif not bundle_id:
            message = f"the alert resolved; trigger {name} applied no bundle for it"
        elif prior.get("adopted"):
            message = (
                f"the alert resolved; bundle {bundle_id} was in force before the alert "
                "(not applied by the trigger): it stays"
            )
        if message:
            written = await self.store.triggers.record_fire(name, group_key, resolved)
            result = pb.WriteResult(changed=True, revision=written, summary=message)
            return TriggerFiring(name, mpb.TRIGGER_NOT_REVERTED, bundle_id, message, result)
        opts = model.WriteOptions(
            reason=f"{record['meta'].get('reason', 'trigger')}: the alert resolved",
            incident=incident,
            actor=f"trigger:{name}",
            actor_authenticated=True,
        )
        try:
            reverted = await self.store.revert_bundle(bundle_id, opts, force=False)
        except UnavailableError:
            raise  # etcd: Alertmanager retries
        except ControlPlaneError as exc:
            # A key changed since (the bundle revert's rule), the bundle expired or is
            # gone: it is not reverted, and the group is resolved all the same.
            message = f"the alert resolved, but bundle {bundle_id} was not reverted: {exc.message}"
            await self._say(
                record,
                group_key,
                "trigger.not_reverted",
                message,
                incident=incident,
                bundle_id=bundle_id,
            )
            written = await self.store.triggers.record_fire(name, group_key, resolved)
            result = pb.WriteResult(changed=True, revision=written, summary=message)
            return TriggerFiring(name, mpb.TRIGGER_NOT_REVERTED, bundle_id, message, result)
        written = await self.store.triggers.record_fire(name, group_key, resolved)
        self.metrics.trigger_fires.labels(name, "reverted").inc()
        message = f"the alert resolved: trigger {name} reverted bundle {bundle_id}"
        result = pb.WriteResult(
            changed=True, revision=max(reverted.revision, written), summary=message
        )
        return TriggerFiring(name, mpb.TRIGGER_REVERTED, bundle_id, message, result)


def _already(name: str, prior: dict[str, Any]) -> TriggerFiring:
    bundle_id = str(prior.get("bundle_id", ""))
    return TriggerFiring(
        name,
        mpb.TRIGGER_ALREADY_FIRED,
        bundle_id,
        f"trigger {name} fired for this alert group already (bundle {bundle_id or 'pending'}): "
        "nothing new applied",
    )
