"""The key layout in etcd, in one place.

Records live under one prefix (default ``/controlplane/v1/``), each a JSON record
readable with ``etcdctl get --prefix``. Paths here are relative to that prefix::

    flags/<scope>/<name>                       scope: "global" or a service
    shedding/<service>
    pins/<service>
    known-good/<service>/<version>
    bundles/<id>                               id: <yyyymmdd-hhmmss>-<name>-<4 hex>
    bundle-fingerprints/<sha256>               the id of the bundle applied with those changes
    audit/<20-digit unix ns>-<8 hex>           time-ordered: retention is one range delete
    expiries/<20-digit unix ns>/<record path>  the index of time-boxed records, soonest first
    overrides/<service>/<instance>             digest of the break-glass override last audited
    event-marks/<kind>/<...>                   an audited event (not a change), once

Agents watch the prefix. What servers record of their agents lives under a prefix
of its own, which agents do not watch (``/controlplane/v1-presence/``)::

    servers/<server id>/<chunk>                a server process's instances (leased)
    applied/<20-digit revision>/<service>/<server id>
                                               when its instances applied a revision
    seen/<service>                             when an agent of it was last connected

The notifier's state has a prefix of its own too (``/controlplane/v1-notify/``), laid
out in ``store/_notifications.py``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from controlplane.model import Flag, KnownGood, Pin, RecordError, Shedding

__all__ = [
    "AUDIT",
    "BUNDLES",
    "DEFAULT_PREFIX",
    "EVENT_MARKS",
    "EXPIRIES",
    "FLAGS",
    "KNOWN_GOOD",
    "MITIGATIONS",
    "PINS",
    "SHEDDING",
    "Key",
    "applied_key",
    "applied_prefix",
    "audit_at",
    "audit_path",
    "bundle_id_of",
    "bundle_path",
    "bundle_stamp",
    "event_mark_path",
    "expiry_at",
    "expiry_path",
    "fingerprint",
    "fingerprint_path",
    "flag_key",
    "key_for_path",
    "known_good_key",
    "new_audit_id",
    "new_bundle_id",
    "notify_prefix",
    "ns",
    "override_path",
    "parse_expiry_path",
    "pin_key",
    "presence_prefix",
    "range_end",
    "seen_key",
    "seen_prefix",
    "server_chunk_key",
    "servers_prefix",
    "shedding_key",
]

DEFAULT_PREFIX = "/controlplane/v1/"

FLAGS = "flags/"
SHEDDING = "shedding/"
PINS = "pins/"
KNOWN_GOOD = "known-good/"
BUNDLES = "bundles/"
AUDIT = "audit/"
EXPIRIES = "expiries/"
EVENT_MARKS = "event-marks/"
MITIGATIONS = (FLAGS, SHEDDING, PINS)
"""What agents receive: every record under these is theirs."""


@dataclass(slots=True)
class Key:
    """Where a record lives and how to parse and name it."""

    path: str  # relative to the prefix, e.g. "flags/global/new-ui"
    kind: str  # flag, shedding, pin, known_good
    scope: str
    name: str
    parse: Callable[[dict[str, Any]], Any] = field(repr=False)


def range_end(prefix: bytes) -> bytes:
    """The etcd range end that covers every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def ns(value: datetime) -> int:
    """A time as unix nanoseconds, as keys spell it."""
    return int(value.timestamp()) * 1_000_000_000 + value.microsecond * 1000


# ---------------------------------------------------------------- mitigation records


def flag_key(scope: str, name: str) -> Key:
    def parse(data: dict[str, Any]) -> Flag:
        flag = Flag.from_record(data)
        if (flag.scope, flag.name) != (scope, name):
            raise RecordError(f"record names {flag.scope}/{flag.name}, not {scope}/{name}")
        return flag

    return Key(f"{FLAGS}{scope}/{name}", "flag", scope, name, parse)


def _service_key(path: str, kind: str, record_type: type[Shedding] | type[Pin]) -> Key:
    """The key of a record kind that a service has one of."""
    service = path.rsplit("/", 1)[-1]

    def parse(data: dict[str, Any]) -> Shedding | Pin:
        record = record_type.from_record(data)
        if record.service != service:
            raise RecordError(f"record names service {record.service}, not {service}")
        return record

    return Key(path, kind, service, "", parse)


def shedding_key(service: str) -> Key:
    return _service_key(f"{SHEDDING}{service}", "shedding", Shedding)


def pin_key(service: str) -> Key:
    return _service_key(f"{PINS}{service}", "pin", Pin)


def known_good_key(service: str, version: str) -> Key:
    def parse(data: dict[str, Any]) -> KnownGood:
        record = KnownGood.from_record(data)
        if (record.service, record.version) != (service, version):
            raise RecordError(
                f"record names {record.service}/{record.version}, not {service}/{version}"
            )
        return record

    return Key(f"{KNOWN_GOOD}{service}/{version}", "known_good", service, version, parse)


def key_for_path(path: str) -> Key | None:
    """The key of a relative path, or None for a path outside the record layout."""
    parts = path.split("/")
    if parts[0] == "flags" and len(parts) == 3:
        return flag_key(parts[1], parts[2])
    if parts[0] == "shedding" and len(parts) == 2:
        return shedding_key(parts[1])
    if parts[0] == "pins" and len(parts) == 2:
        return pin_key(parts[1])
    if parts[0] == "known-good" and len(parts) == 3:
        return known_good_key(parts[1], parts[2])
    return None


# ---------------------------------------------------------------- the audit trail


def new_audit_id(now: datetime) -> str:
    """A time-ordered audit id: 20-digit unix nanoseconds and 8 random hex digits."""
    return f"{ns(now):020d}-{secrets.token_hex(4)}"


def audit_path(audit_id: str) -> str:
    return AUDIT + audit_id


def audit_at(nanoseconds: int) -> str:
    """Where audit records of that time start (a range bound)."""
    return f"{AUDIT}{nanoseconds:020d}"


def event_mark_path(mark: str) -> str:
    """Where the mark of an audited event lives (``nack/checkout/vm-3/812``)."""
    return f"{EVENT_MARKS}{mark}"


def override_path(service: str, instance_id: str) -> str:
    return f"overrides/{service}/{instance_id}"


# ---------------------------------------------------------------- the expiry index


def expiry_path(path: str, expires_at: datetime) -> str:
    """The index entry of the record at ``path`` whose top layer expires then."""
    return f"{EXPIRIES}{ns(expires_at):020d}/{path}"


def expiry_at(nanoseconds: int) -> str:
    """Where index entries of that time start (a range bound)."""
    return f"{EXPIRIES}{nanoseconds:020d}"


def parse_expiry_path(path: str) -> tuple[int, str] | None:
    """``(unix ns, record path)`` of an index entry; None when it is not one."""
    stamp, _, record = path.removeprefix(EXPIRIES).partition("/")
    if len(stamp) != 20 or not (stamp.isascii() and stamp.isdigit()):
        return None  # not as expiry_at writes it (it would sort out of time order)
    return int(stamp), record


# ---------------------------------------------------------------- bundles


def bundle_stamp(now: datetime) -> str:
    """The time part of a bundle id (also the range bound of bundles before ``now``)."""
    return now.astimezone(UTC).strftime("%Y%m%d-%H%M%S")


def new_bundle_id(now: datetime, name: str) -> str:
    """A bundle id people can read and type, ordered by time: ``20261126-164500-name-3fa2``."""
    return f"{bundle_stamp(now)}-{name}-{secrets.token_hex(2)}"


def bundle_path(bundle_id: str) -> str:
    return BUNDLES + bundle_id


def bundle_id_of(path: str) -> str:
    """The bundle id in a bundle's path."""
    return path.rsplit("/", 1)[-1]


def fingerprint(name: str, changes: Sequence[dict[str, Any]]) -> str:
    """What identifies a bundle's content: its name and its changes."""
    text = json.dumps({"name": name, "changes": list(changes)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint_path(digest: str) -> str:
    return f"bundle-fingerprints/{digest}"


# ---------------------------------------------------------------- presence


def presence_prefix(prefix: str) -> str:
    """The presence prefix that goes with a record prefix (``/controlplane/v1-presence/``)."""
    return prefix.rstrip("/") + "-presence/"


def notify_prefix(prefix: str) -> str:
    """The notifier's prefix that goes with a record prefix (``/controlplane/v1-notify/``)."""
    return prefix.rstrip("/") + "-notify/"


def servers_prefix(presence: str, server_id: str = "") -> str:
    """Every server's instances, or one server's (absolute, under ``presence``)."""
    return f"{presence}servers/{server_id}/" if server_id else f"{presence}servers/"


def server_chunk_key(presence: str, server_id: str, index: int) -> str:
    return f"{presence}servers/{server_id}/{index:04d}"


def applied_prefix(presence: str, revision: int | None = None) -> str:
    """Every applied record, or where those of ``revision`` and later start."""
    if revision is None:
        return f"{presence}applied/"
    return f"{presence}applied/{revision:020d}"


def applied_key(presence: str, revision: int, service: str, server_id: str) -> str:
    return f"{presence}applied/{revision:020d}/{service}/{server_id}"


def seen_prefix(presence: str) -> str:
    return f"{presence}seen/"


def seen_key(presence: str, service: str) -> str:
    return f"{presence}seen/{service}"
