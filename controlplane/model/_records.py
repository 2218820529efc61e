"""The records stored in etcd and sent in the API: write options, mitigations, bundles, audit."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeAlias

from controlplane._durations import in_the_past
from controlplane._text import visible
from controlplane.api.v1 import types_pb2 as pb
from controlplane.errors import InvalidArgumentError
from controlplane.model._values import (
    MAX_ACTOR_CHARS,
    MAX_REASON_CHARS,
    MAX_TTL,
    FlagValue,
    RecordError,
    Tier,
    check_text,
    datetime_to_timestamp,
    describe_shedding,
    dump_json,
    duration_to_timedelta,
    flag_value_to_proto,
    format_time,
    parse_time,
    show,
    timestamp_to_datetime,
    validate_flag_name,
    validate_flag_value,
    validate_incident,
    validate_percent,
    validate_scope,
    validate_service,
    validate_version,
)

MAX_SHOWN_RECORD_BYTES = 64 * 1024
"""The most JSON of one record an audit entry shows (a stored record is at most 64 KiB;
older or hand-written audit records may hold more)."""


def shown_json(value: Any, limit: int) -> str:
    """``value`` as JSON if that takes at most ``limit`` bytes, else a short placeholder
    saying how large it is and its digest."""
    text = dump_json(value)
    size = len(text.encode())
    if size <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()
    return dump_json({"truncated": True, "bytes": size, "sha256": digest})


# ---------------------------------------------------------------- write options


@dataclass(frozen=True, slots=True)
class WriteOptions:
    """What every mitigation write carries besides its payload."""

    reason: str
    incident: str = ""
    actor: str = "unknown"
    actor_authenticated: bool = False
    expires_at: datetime | None = None
    expected_mod_revision: int | None = None
    dry_run: bool = False
    bundle_id: str = ""


def write_options_from_proto(
    msg: pb.WriteOptions, *, now: datetime, allow_expiry: bool = True
) -> WriteOptions:
    """Validate a request's write options."""
    reason = msg.reason.strip()
    if not reason:
        raise InvalidArgumentError(
            "options.reason", "is required: say why (it goes to the audit trail)"
        )
    check_text(reason, "options.reason", MAX_REASON_CHARS)
    if not visible(reason):
        raise InvalidArgumentError(
            "options.reason", "shows nothing (only spaces or invisible characters): say why"
        )
    incident = validate_incident(msg.incident.strip(), "options.incident")
    actor = check_text(msg.actor.strip(), "options.actor", MAX_ACTOR_CHARS) or "unknown"
    expires_at: datetime | None = None
    has_ttl = msg.HasField("ttl")
    has_until = msg.HasField("expires_at")
    if has_ttl and has_until:
        raise InvalidArgumentError("options", "give ttl or expires_at, not both")
    if (has_ttl or has_until) and not allow_expiry:
        raise InvalidArgumentError("options", "this write cannot expire (no ttl or expires_at)")
    if has_ttl:
        ttl = duration_to_timedelta(msg.ttl, "options.ttl")
        if ttl <= timedelta(0):
            raise InvalidArgumentError("options.ttl", "must be positive")
        if ttl > MAX_TTL:
            raise InvalidArgumentError("options.ttl", f"must be at most {MAX_TTL.days} days")
        expires_at = now + ttl
    elif has_until:
        try:
            expires_at = timestamp_to_datetime(msg.expires_at)
        except (ValueError, OverflowError):
            raise InvalidArgumentError("options.expires_at", "is not a valid time") from None
        if expires_at <= now:
            raise InvalidArgumentError(
                "options.expires_at",
                f"{in_the_past(expires_at, now)}; give a later time, or a duration from now "
                "as ttl instead (cpctl --ttl 30m; in a bundle file, ttl: 30m)",
            )
        if expires_at - now > MAX_TTL:
            raise InvalidArgumentError(
                "options.expires_at", f"must be at most {MAX_TTL.days} days ahead"
            )
    expected: int | None = None
    if msg.HasField("expected_mod_revision"):
        expected = msg.expected_mod_revision
        if expected < 0:
            raise InvalidArgumentError(
                "options.expected_mod_revision", "must be 0 (key absent) or a positive revision"
            )
    return WriteOptions(
        reason=reason,
        incident=incident,
        actor=actor,
        expires_at=expires_at,
        expected_mod_revision=expected,
        dry_run=msg.dry_run,
    )


# ---------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Meta:
    """Who set a record, why and when."""

    actor: str
    reason: str
    set_at: datetime
    incident: str = ""
    actor_authenticated: bool = False
    expires_at: datetime | None = None
    bundle_id: str = ""

    @classmethod
    def from_options(cls, opts: WriteOptions, now: datetime) -> Meta:
        return cls(
            actor=opts.actor,
            actor_authenticated=opts.actor_authenticated,
            reason=opts.reason,
            incident=opts.incident,
            set_at=now,
            expires_at=opts.expires_at,
            bundle_id=opts.bundle_id,
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "actor": self.actor,
            "actor_authenticated": self.actor_authenticated,
            "reason": self.reason,
            "incident": self.incident,
            "set_at": format_time(self.set_at),
            "expires_at": format_time(self.expires_at) if self.expires_at else None,
            "bundle_id": self.bundle_id,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Meta:
        expires = data.get("expires_at")
        return cls(
            actor=_req_str(data, "actor"),
            actor_authenticated=bool(data.get("actor_authenticated", False)),
            reason=_req_str(data, "reason"),
            incident=str(data.get("incident") or ""),
            set_at=parse_time(_req_str(data, "set_at")),
            expires_at=parse_time(expires) if expires else None,
            bundle_id=str(data.get("bundle_id") or ""),
        )

    def to_proto(self, mod_revision: int = 0) -> pb.Meta:
        msg = pb.Meta(
            actor=self.actor,
            actor_authenticated=self.actor_authenticated,
            reason=self.reason,
            incident=self.incident,
            set_at=datetime_to_timestamp(self.set_at),
            mod_revision=mod_revision,
            bundle_id=self.bundle_id,
        )
        if self.expires_at is not None:
            msg.expires_at.CopyFrom(datetime_to_timestamp(self.expires_at))
        return msg


def _req_str(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string")
    return value


def _req(data: Mapping[str, Any], key: str) -> Any:
    if key not in data:
        raise RecordError(f"field {key!r} is missing")
    return data[key]


@dataclass(frozen=True, slots=True)
class Flag:
    """A kill switch or degradation mode for one scope."""

    scope: str
    name: str
    value: FlagValue
    meta: Meta
    replaced: Flag | None = None

    def to_record(self) -> dict[str, Any]:
        value: Any = self.value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)
        return {
            "kind": "flag",
            "scope": self.scope,
            "name": self.name,
            "value": value,
            "meta": self.meta.to_record(),
            "replaced": self.replaced.to_record() if self.replaced else None,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Flag:
        _expect_kind(data, "flag")
        replaced = data.get("replaced")
        return cls(
            scope=_valid(validate_scope, _req_str(data, "scope")),
            name=_valid(validate_flag_name, _req_str(data, "name")),
            value=_valid(validate_flag_value, _req(data, "value")),
            meta=Meta.from_record(_req(data, "meta")),
            replaced=cls.from_record(replaced) if replaced else None,
        )

    def to_proto(self, mod_revision: int = 0) -> pb.Flag:
        msg = pb.Flag(
            scope=self.scope,
            name=self.name,
            value=flag_value_to_proto(self.value),
            meta=self.meta.to_proto(mod_revision),
        )
        if self.replaced is not None:
            msg.replaced.CopyFrom(self.replaced.to_proto())
        return msg


@dataclass(frozen=True, slots=True)
class Shedding:
    """A load-shedding level for one service."""

    service: str
    tier: Tier
    percent: float
    meta: Meta
    replaced: Shedding | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": "shedding",
            "service": self.service,
            "tier": self.tier.name,
            "percent": self.percent,
            "meta": self.meta.to_record(),
            "replaced": self.replaced.to_record() if self.replaced else None,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Shedding:
        _expect_kind(data, "shedding")
        tier_name = _req_str(data, "tier")
        if tier_name not in Tier.__members__:
            raise RecordError(f"unknown tier {tier_name!r}")
        percent = _req(data, "percent")
        if isinstance(percent, bool) or not isinstance(percent, int | float):
            raise RecordError("field 'percent' must be a number")
        replaced = data.get("replaced")
        return cls(
            service=_valid(validate_service, _req_str(data, "service")),
            tier=Tier[tier_name],
            percent=_valid(validate_percent, float(percent)),
            meta=Meta.from_record(_req(data, "meta")),
            replaced=cls.from_record(replaced) if replaced else None,
        )

    def to_proto(self, mod_revision: int = 0) -> pb.Shedding:
        msg = pb.Shedding(
            service=self.service,
            tier=self.tier.value,  # type: ignore[arg-type]
            percent=self.percent,
            meta=self.meta.to_proto(mod_revision),
        )
        if self.replaced is not None:
            msg.replaced.CopyFrom(self.replaced.to_proto())
        return msg

    def describe(self) -> str:
        return describe_shedding(self.tier, self.percent)


@dataclass(frozen=True, slots=True)
class PinHistory:
    """The pin a pin replaced, kept for the record."""

    version: str
    actor: str
    reason: str
    set_at: datetime

    def to_record(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "actor": self.actor,
            "reason": self.reason,
            "set_at": format_time(self.set_at),
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> PinHistory:
        return cls(
            version=_req_str(data, "version"),
            actor=_req_str(data, "actor"),
            reason=_req_str(data, "reason"),
            set_at=parse_time(_req_str(data, "set_at")),
        )

    def to_proto(self) -> pb.PinHistory:
        return pb.PinHistory(
            version=self.version,
            actor=self.actor,
            reason=self.reason,
            set_at=datetime_to_timestamp(self.set_at),
        )


@dataclass(frozen=True, slots=True)
class Pin:
    """A service pinned to a known-good version."""

    service: str
    version: str
    meta: Meta
    previous: PinHistory | None = None
    replaced: Pin | None = None

    def history(self) -> PinHistory:
        return PinHistory(self.version, self.meta.actor, self.meta.reason, self.meta.set_at)

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": "pin",
            "service": self.service,
            "version": self.version,
            "meta": self.meta.to_record(),
            "previous": self.previous.to_record() if self.previous else None,
            "replaced": self.replaced.to_record() if self.replaced else None,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Pin:
        _expect_kind(data, "pin")
        previous = data.get("previous")
        replaced = data.get("replaced")
        return cls(
            service=_valid(validate_service, _req_str(data, "service")),
            version=_valid(validate_version, _req_str(data, "version")),
            meta=Meta.from_record(_req(data, "meta")),
            previous=PinHistory.from_record(previous) if previous else None,
            replaced=cls.from_record(replaced) if replaced else None,
        )

    def to_proto(self, mod_revision: int = 0) -> pb.Pin:
        msg = pb.Pin(
            service=self.service, version=self.version, meta=self.meta.to_proto(mod_revision)
        )
        if self.previous is not None:
            msg.previous.CopyFrom(self.previous.to_proto())
        if self.replaced is not None:
            msg.replaced.CopyFrom(self.replaced.to_proto())
        return msg


@dataclass(frozen=True, slots=True)
class KnownGood:
    """A version the deploy pipeline verified and marked as a rollback target."""

    service: str
    version: str
    meta: Meta

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": "known_good",
            "service": self.service,
            "version": self.version,
            "meta": self.meta.to_record(),
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> KnownGood:
        _expect_kind(data, "known_good")
        return cls(
            service=_valid(validate_service, _req_str(data, "service")),
            version=_valid(validate_version, _req_str(data, "version")),
            meta=Meta.from_record(_req(data, "meta")),
        )

    def to_proto(self, mod_revision: int = 0) -> pb.KnownGood:
        return pb.KnownGood(
            service=self.service, version=self.version, meta=self.meta.to_proto(mod_revision)
        )


Record: TypeAlias = Flag | Shedding | Pin | KnownGood

MAX_BUNDLE_CHANGES = 31  # 128 etcd operations per transaction, up to 4 per change
_BUNDLE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def validate_bundle_name(value: str, field_name: str = "name") -> str:
    """Return ``value`` if it is a bundle name (like a flag name, at most 64 characters)."""
    if not value:
        raise InvalidArgumentError(field_name, "is required")
    if not _BUNDLE_NAME_RE.fullmatch(value):
        raise InvalidArgumentError(
            field_name,
            f"{show(value)} is not a bundle name: 1-64 characters a-z, 0-9, '.', '_' and "
            "'-', starting with a letter or digit",
        )
    return value


@dataclass(frozen=True, slots=True)
class BundleEntry:
    """One key a bundle changed: the record before and after (None: absent)."""

    path: str
    kind: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    def to_record(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "before": self.before, "after": self.after}

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> BundleEntry:
        return cls(
            path=_req_str(data, "path"),
            kind=_req_str(data, "kind"),
            before=data.get("before"),
            after=data.get("after"),
        )


@dataclass(frozen=True, slots=True)
class Bundle:
    """Several changes applied in one transaction, and what each replaced."""

    id: str
    name: str
    # Each change as the JSON form of its BundleChange message (options removed).
    changes: tuple[dict[str, Any], ...]
    meta: Meta
    entries: tuple[BundleEntry, ...]
    fingerprint: str
    reverted: Meta | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": "bundle",
            "id": self.id,
            "name": self.name,
            "changes": list(self.changes),
            "meta": self.meta.to_record(),
            "entries": [e.to_record() for e in self.entries],
            "fingerprint": self.fingerprint,
            "reverted": self.reverted.to_record() if self.reverted else None,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Bundle:
        _expect_kind(data, "bundle")
        reverted = data.get("reverted")
        changes = _req(data, "changes")
        entries = _req(data, "entries")
        if not isinstance(changes, list) or not isinstance(entries, list):
            raise RecordError("fields 'changes' and 'entries' must be lists")
        return cls(
            id=_req_str(data, "id"),
            name=_req_str(data, "name"),
            changes=tuple(changes),
            meta=Meta.from_record(_req(data, "meta")),
            entries=tuple(BundleEntry.from_record(e) for e in entries),
            fingerprint=_req_str(data, "fingerprint"),
            reverted=Meta.from_record(reverted) if reverted else None,
        )


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One change, as the post-mortem reads it. Written in the change's transaction."""

    id: str
    time: datetime
    actor: str
    action: str
    kind: str
    scope: str
    name: str
    key: str
    reason: str
    incident: str = ""
    actor_authenticated: bool = False
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    bundle_id: str = ""
    expires_at: datetime | None = None
    revision: int = field(default=0, compare=False)

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": "audit",
            "id": self.id,
            "time": format_time(self.time),
            "actor": self.actor,
            "actor_authenticated": self.actor_authenticated,
            "action": self.action,
            "record_kind": self.kind,
            "scope": self.scope,
            "name": self.name,
            "key": self.key,
            "reason": self.reason,
            "incident": self.incident,
            "before": self.before,
            "after": self.after,
            "bundle_id": self.bundle_id,
            "expires_at": format_time(self.expires_at) if self.expires_at else None,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any], revision: int = 0) -> AuditEntry:
        _expect_kind(data, "audit")
        expires = data.get("expires_at")
        return cls(
            id=_req_str(data, "id"),
            time=parse_time(_req_str(data, "time")),
            actor=_req_str(data, "actor"),
            actor_authenticated=bool(data.get("actor_authenticated", False)),
            action=_req_str(data, "action"),
            kind=_req_str(data, "record_kind"),
            scope=_req_str(data, "scope"),
            name=str(data.get("name") or ""),
            key=_req_str(data, "key"),
            reason=_req_str(data, "reason"),
            incident=str(data.get("incident") or ""),
            before=data.get("before"),
            after=data.get("after"),
            bundle_id=str(data.get("bundle_id") or ""),
            expires_at=parse_time(expires) if expires else None,
            revision=revision,
        )

    def to_proto(self, shown_bytes: int = MAX_SHOWN_RECORD_BYTES) -> pb.AuditEntry:
        """The entry for the API; a record before or after over ``shown_bytes`` of JSON is
        shown as ``{"truncated": true, "bytes": N, "sha256": ...}``, never an error."""
        msg = pb.AuditEntry(
            id=self.id,
            revision=self.revision,
            time=datetime_to_timestamp(self.time),
            actor=self.actor,
            actor_authenticated=self.actor_authenticated,
            action=self.action,
            kind=self.kind,
            scope=self.scope,
            name=self.name,
            reason=self.reason,
            incident=self.incident,
            before_json=shown_json(self.before, shown_bytes) if self.before is not None else "",
            after_json=shown_json(self.after, shown_bytes) if self.after is not None else "",
            bundle_id=self.bundle_id,
        )
        if self.expires_at is not None:
            msg.expires_at.CopyFrom(datetime_to_timestamp(self.expires_at))
        return msg


def _expect_kind(data: Mapping[str, Any], kind: str) -> None:
    if not isinstance(data, Mapping):
        raise RecordError("record must be a JSON object")
    if data.get("kind") != kind:
        raise RecordError(f"field 'kind' must be {kind!r}, not {data.get('kind')!r}")


def _valid(check: Any, value: Any) -> Any:
    try:
        return check(value)
    except InvalidArgumentError as exc:
        raise RecordError(exc.message) from None
