"""What a notification says: events made from the audit trail, grouped per destination.

An :class:`Event` is one message: what happened and where (one line), then who, why,
the incident and the expiry, and one line per change it groups. Events of kind
``change``, ``expiry`` and ``override`` come from audit records (:func:`change_of`),
so they can be rebuilt from the trail at any time; the others (``nack``,
``incomplete``, ``stale``, ``trigger``) are made where they happen.

Grouping (:func:`next_group`) is a function of the audit trail alone: a group is a run
of consecutive records (in commit order, after the destination's filter) of one kind
that belong together (one bundle; else one service and one actor) within
``group_window`` of its first record, at most :data:`MAX_GROUP` of them. A bundle, a
rollback, a trigger's action or ten quick writes to one service are one message. The
event's id is a digest of the destination and the group's first and last records, so
a group sent again after a server died is the same event, with the same id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from controlplane import model
from controlplane.model import AuditEntry, Tier
from controlplane.store import EXPIRY_ACTOR

__all__ = ["MAX_GROUP", "Change", "Event", "change_of", "event_of", "next_group"]

MAX_GROUP = 50
"""Changes in one message at most (Slack shows 50 blocks)."""

_ABSENT = {
    "trigger": "none",
    "flag": "unset",
    "shedding": "off",
    "pin": "unpinned",
    "known_good": "not marked",
    "override": "none",
}


@dataclass(frozen=True, slots=True)
class Change:
    """One audited change, as a notification tells it."""

    audit_id: str
    revision: int
    time: datetime
    event_kind: str
    """``change``, ``expiry`` (a time-boxed change ran out) or ``override``."""
    action: str
    record_kind: str
    scope: str
    name: str
    before: str
    after: str
    actor: str
    reason: str
    incident: str
    bundle_id: str
    expires_at: datetime | None
    said: str = ""
    """The whole line of an event that is not a change (a rejection, a change not
    applied in time, a stale mitigation)."""

    @property
    def what(self) -> str:
        """``flag new-ui``, ``shedding``, ``pin``, ``override on vm-3``."""
        kind = self.record_kind.replace("_", "-")
        if self.record_kind == "override":
            return f"override on {self.name}"
        return f"{kind} {self.name}".rstrip()

    @property
    def line(self) -> str:
        """``checkout: flag new-ui true -> false until 12:30:00Z``."""
        if self.said:
            return self.said
        text = f"{self.scope}: {self.what} {self.before} -> {self.after}"
        if self.expires_at is not None:
            text += f" until {when(self.expires_at)}"
        return text

    def group_key(self) -> tuple[str, ...]:
        if self.bundle_id:
            return (self.event_kind, "bundle", self.bundle_id)
        return (self.event_kind, self.scope, self.actor)


@dataclass(frozen=True, slots=True)
class Event:
    """One message, to one destination."""

    id: str
    kind: str
    title: str
    """One line: what and where."""
    services: tuple[str, ...]
    time: datetime
    actor: str = ""
    reason: str = ""
    incident: str = ""
    expires_at: datetime | None = None
    lines: tuple[str, ...] = ()
    """One per change (an event of one change has its line in the title only)."""
    applied: str = ""
    """``applied by 3/3 instances`` when known."""
    details: dict[str, Any] = field(default_factory=dict)
    """What the webhook and PagerDuty carry beyond the text."""


def when(moment: datetime) -> str:
    """A time as messages say it: UTC, to the second (``2026-12-06T14:30:00Z``)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe(kind: str, record: Any) -> str:
    """A record of an audit entry (``before`` / ``after``) in a few words."""
    if record is None:
        return _ABSENT.get(kind, "none")
    if not isinstance(record, dict):
        return str(record)
    if kind == "flag" and "value" in record:
        value = record["value"]
        return model.describe_value(float(value) if type(value) is int else value)
    if kind == "shedding" and "percent" in record:
        tier = record.get("tier", "SHEDDABLE")
        if tier in Tier.__members__:
            return model.describe_shedding(Tier[tier], float(record["percent"]))
    if kind == "pin" and "version" in record:
        return str(record["version"])
    if kind == "known_good":
        return "known-good"
    if kind == "override":
        return "applied"
    if kind == "trigger":
        return "enabled" if record.get("enabled", True) else "disabled"
    return "set"


_EVENT_ACTIONS = {
    "agent.nack": "nack",
    "notify.incomplete": "incomplete",
    "notify.stale": "stale",
    "trigger.fired": "trigger",
    "trigger.disabled": "trigger",
    "trigger.cooldown": "trigger",
    "trigger.would_apply": "trigger",
    "trigger.not_reverted": "trigger",
    "trigger.failed": "trigger",
}


def change_of(entry: AuditEntry) -> Change:
    """The change (or event) an audit record tells of."""
    said = ""
    if entry.action in _EVENT_ACTIONS:
        kind = _EVENT_ACTIONS[entry.action]
        if kind == "nack":
            revision = (entry.after or {}).get("revision", "?")
            said = f"{entry.scope}: {entry.name} rejected revision {revision}: {entry.reason}"
        elif kind == "trigger":
            said = entry.reason
        else:
            said = f"{entry.scope}: {entry.reason}"
    elif entry.actor == EXPIRY_ACTOR:
        kind = "expiry"
    elif entry.action.startswith("override."):
        kind = "override"
    else:
        kind = "change"
    return Change(
        audit_id=entry.id,
        revision=entry.revision,
        time=entry.time,
        event_kind=kind,
        action=entry.action,
        record_kind=entry.kind,
        scope=entry.scope,
        name=entry.name,
        before=_describe(entry.kind, entry.before),
        after=_describe(entry.kind, entry.after),
        actor=entry.actor,
        reason=entry.reason,
        incident=entry.incident,
        bundle_id=entry.bundle_id,
        expires_at=entry.expires_at,
        said=said,
    )


def next_group(
    changes: Sequence[Change], window: timedelta, now: datetime
) -> tuple[list[Change], bool]:
    """The first group of ``changes`` (in commit order), and whether it is complete:
    a record that does not belong follows it, it is full, or its window has passed."""
    if not changes:
        return [], False
    first = changes[0]
    key = first.group_key()
    group = [first]
    for change in changes[1:]:
        if change.group_key() != key or change.time - first.time > window:
            return group, True
        group.append(change)
        if len(group) >= MAX_GROUP:
            return group, True
    return group, now - first.time > window


def event_id(destination: str, first: str, last: str) -> str:
    digest = hashlib.sha256(f"{destination}\n{first}\n{last}".encode()).hexdigest()
    return f"evt-{digest[:32]}"


def event_of(destination: str, group: Sequence[Change]) -> Event:
    """The message of a group of changes (see :func:`next_group`)."""
    first, last = group[0], group[-1]
    services = tuple(dict.fromkeys(c.scope for c in group))
    kind = first.event_kind
    if len(group) == 1:
        title = _single_title(first)
        lines: tuple[str, ...] = ()
    else:
        where = ", ".join(services[:5]) + (
            f" and {len(services) - 5} more" if len(services) > 5 else ""
        )
        head = f"bundle {first.bundle_id}" if first.bundle_id else f"{len(group)} changes"
        if first.bundle_id:
            head += f": {len(group)} changes"
        if kind == "expiry":
            head = f"{len(group)} time-boxed changes ended"
        title = f"{head} on {where}"
        if kind == "nack":
            title = f"{len(group)} instances of {where} rejected a change"
        elif kind in ("incomplete", "stale"):
            title = f"{len(group)} {kind} warnings on {where}"
        lines = tuple(c.line for c in group)
    reasons = dict.fromkeys(c.reason for c in group if c.reason)
    incidents = dict.fromkeys(c.incident for c in group if c.incident)
    return Event(
        id=event_id(destination, first.audit_id, last.audit_id),
        kind=kind,
        title=title,
        services=services,
        time=first.time,
        actor=first.actor,
        reason="; ".join(reasons),
        incident=", ".join(incidents),
        expires_at=first.expires_at if len(group) == 1 else None,
        lines=lines,
        details={
            "audit_ids": [c.audit_id for c in group],
            "revisions": [first.revision, last.revision],
            "bundle_id": first.bundle_id or None,
            "changes": [
                {
                    "service": c.scope,
                    "kind": c.record_kind,
                    "name": c.name,
                    "action": c.action,
                    "before": c.before,
                    "after": c.after,
                    "expires_at": model.format_time(c.expires_at) if c.expires_at else None,
                }
                for c in group
            ],
        },
    )


def _single_title(change: Change) -> str:
    if change.event_kind == "expiry":
        return f"{change.scope}: {change.what} expired: {change.before} -> {change.after} again"
    if change.event_kind == "override":
        state = "applied" if change.action == "override.applied" else "cleared"
        return f"{change.scope}: break-glass override {state} on {change.name}"
    return change.line
