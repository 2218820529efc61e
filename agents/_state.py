"""The agent's state: an immutable snapshot and the pure functions that make the next one.

No I/O, no clock reads, no locks, no threads: the client feeds in what the server
sends and the time, and swaps the snapshot it gets back into one attribute. Reads
are a few attribute lookups on whatever snapshot is current, so the read path
needs no lock (DESIGN.md, "Agent protocol"; issue 4, "Read path")::

    empty_snapshot(service)                 before anything arrived: reads give defaults
    snapshot_from_proto(service, msg, now)  a Snapshot message: the whole state
    apply_change(snapshot, msg, now)        a Change: one revision, one swap, one ack
    at(snapshot, now)                       the timer, at snapshot.next_expiry
    apply_override(base, override)          a break-glass override above the server's
                                            state: the snapshot the reads see
    snapshot_from_cache(data, service, now) boot from the cache file
    snapshot_to_cache(snapshot)             ... and write it
    diff(old, new)                          what the on_change callbacks receive
    enabled / value / should_shed / should_shed_key      the reads

Records arrive with their layers: a time-boxed record keeps the record it
replaced (DESIGN.md, "State model"). The snapshot keeps the layers still in
force and the effective values computed from them; at ``next_expiry`` the timer
calls :func:`at` and the replaced layer applies again, also while the server is
unreachable. The server's own restore arrives later as a Change and finds the
agent already there.

Errors (the client decides what each means for the stream)::

    AgentStateError
     ├── StaleRevisionError   a Change at or below the applied revision: drop it
     ├── InvalidChangeError   a malformed record: nack the revision with str(error)
     │                        and keep the old snapshot (also a ValueError)
     └── CorruptCacheError    an unusable cache file: warn, start without it
                              (also a ValueError)

A break-glass override (``agents._override``) is kept apart from the server's
state: the client holds the base snapshot (what the server sent, which keeps
updating) and the override, and publishes ``apply_override(base, override)``,
one snapshot like any other, so reads stay one attribute lookup.

The agent imports only the generated ``controlplane.api.v1`` modules, protobuf and
the standard library, so that a service embedding it pulls in nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf import json_format, timestamp_pb2

from agents._types import (
    _CRITICALITY,
    Criticality,
    FlagValue,
    Override,
    PinnedVersion,
    SheddingLevel,
)
from controlplane.api.v1 import agent_pb2, types_pb2

GLOBAL_SCOPE = "global"
OVERRIDE_SCOPE = "override"
"""The scope :attr:`Snapshot.flag_scopes` names for a flag a break-glass override sets."""
CACHE_FORMAT = 1
MAX_REVISION = 2**63 - 1
"""The largest revision there is (etcd's revisions are int64)."""

_T = TypeVar("_T")


# ---------------------------------------------------------------- errors


class AgentStateError(Exception):
    """Base of the errors of the agent's state functions."""


class StaleRevisionError(AgentStateError):
    """A Change whose revision is not newer than the snapshot's."""


class InvalidChangeError(AgentStateError, ValueError):
    """A record the agent cannot apply; ``str(error)`` is the reason for the nack."""


class CorruptCacheError(AgentStateError, ValueError):
    """A cache file that cannot be used; ``str(error)`` says why."""


# A snapshot without shedding gets this tier: every criticality compares below it.
_NO_SHEDDING_TIER: int = max(Criticality) + 1
_HASH_SPACE = 2**32


# ---------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Meta:
    """Who set a record, why and when (a copy of the protobuf ``Meta``)."""

    actor: str = ""
    reason: str = ""
    set_at: datetime | None = None
    incident: str = ""
    actor_authenticated: bool = False
    expires_at: datetime | None = None
    mod_revision: int = 0
    bundle_id: str = ""


@dataclass(frozen=True, slots=True)
class FlagRecord:
    """A flag record for one scope, with the layers it replaced.

    Every layer of a chain carries the top layer's scope and name.
    """

    scope: str
    name: str
    value: FlagValue
    meta: Meta
    replaced: FlagRecord | None = None


@dataclass(frozen=True, slots=True)
class SheddingRecord:
    """The service's shedding record, with the layers it replaced."""

    service: str
    tier: Criticality
    percent: float
    meta: Meta
    replaced: SheddingRecord | None = None


@dataclass(frozen=True, slots=True)
class PinHistory:
    """The pin a pin replaced, kept for the record (never restored)."""

    version: str
    actor: str = ""
    reason: str = ""
    set_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PinRecord:
    """The service's pin record, with the layers it replaced."""

    service: str
    version: str
    meta: Meta
    previous: PinHistory | None = None
    replaced: PinRecord | None = None


_Record = TypeVar("_Record", FlagRecord, SheddingRecord, PinRecord)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state of one service at one revision, ready for lock-free reads.

    Built only by this module's functions; never mutated (``flags`` and the other
    mappings are plain dicts nobody writes after construction). The effective
    values are precomputed so that a read is a lookup:

    Attributes:
        service: The service this state is for.
        revision: The etcd revision it reflects (0: no state yet).
        flags: Flag name to effective value; the service's own entry wins over
            the global one. JSON objects are shared by every reader: treat them as
            read-only.
        flag_scopes: Flag name to the scope its effective value comes from
            (``"global"``, the service, or ``"override"`` for a break-glass
            override), for status and debugging.
        shedding: The shedding level in force, or None.
        pin: The pin in force, or None.
        flag_records: ``(scope, name)`` to the record in force with the layers
            beneath it, for both scopes (a global record hidden by the
            service's own stays here).
        shedding_record: The shedding record in force, with its layers.
        pin_record: The pin record in force, with its layers.
        next_expiry: The earliest ``expires_at`` of a record or override in
            force: when a timer must call :func:`at` (None: nothing expires).
        shed_tier: The shedding tier as an int; one past the least critical
            tier when nothing is shed, so every criticality compares below it.
        shed_fraction: ``percent / 100`` of the tier itself.
        shed_threshold: ``shed_fraction`` scaled to the 32-bit hash space of
            :func:`should_shed_key`.
        override: The break-glass override applied above the server's state
            (:func:`apply_override`), or None. The records above stay the
            server's.
    """

    service: str
    revision: int
    flags: Mapping[str, FlagValue]
    flag_scopes: Mapping[str, str]
    shedding: SheddingLevel | None
    pin: PinnedVersion | None
    flag_records: Mapping[tuple[str, str], FlagRecord]
    shedding_record: SheddingRecord | None
    pin_record: PinRecord | None
    next_expiry: datetime | None
    shed_tier: int
    shed_fraction: float
    shed_threshold: int
    override: Override | None = None


def empty_snapshot(service: str) -> Snapshot:
    """The state before anything arrived: revision 0, every read gives its default."""
    return _build(service, 0, {}, None, None, datetime.min.replace(tzinfo=UTC))


# ---------------------------------------------------------------- reads


def enabled(snapshot: Snapshot, name: str, default: bool) -> bool:
    """The flag's value if it is a bool, else ``default``.

    A flag holding another kind of value (a string, a number, an object) is not a
    kill switch, and reading it as one gives the default rather than guessing
    what its truthiness means. Never raises: a name that is no flag name (an
    unhashable one included) gives the default.
    """
    try:
        v = snapshot.flags.get(name)
    except Exception:
        return default
    if v is True:
        return True
    if v is False:
        return False
    return default


def value(snapshot: Snapshot, name: str, default: _T) -> FlagValue | _T:
    """The flag's value of whatever kind, or ``default`` when the flag is not set.

    Never raises: a name that is no flag name (an unhashable one included) gives
    the default.
    """
    try:
        return snapshot.flags.get(name, default)
    except Exception:
        return default


def should_shed(
    snapshot: Snapshot,
    criticality: Criticality | str | object,
    rand: Callable[[], float] = random.random,
) -> bool:
    """Whether to shed a request of this criticality (DESIGN.md, "Load shedding").

    Less critical than the tier: shed; the tier itself: shed when ``rand()`` (in
    [0, 1)) falls below ``percent / 100``; more critical, or no shedding: not shed.
    ``rand`` is called only for requests of the tier itself. A criticality that
    :meth:`Criticality.parse` does not recognise, of whatever type, counts as
    ``CRITICAL``: never an exception on the read path.
    """
    # One dict lookup for a member or an exact name; anything else, even
    # unhashable, goes to Criticality.parse. True == 1 and hashes alike, but a
    # bool is no criticality.
    try:
        c = _CRITICALITY.get(criticality)
    except Exception:
        c = None
    if c is None or criticality is True:
        c = Criticality.parse(criticality)
    tier = snapshot.shed_tier
    if c < tier:
        return False
    if c > tier:
        return True
    return rand() < snapshot.shed_fraction


def _key_bytes(key: object) -> bytes:
    """The bytes a request key hashes as: a string's UTF-8 (lone surrogates kept),
    bytes as they are, anything else as its ``str()``; never raises."""
    try:
        if isinstance(key, str):
            return str.encode(key, "utf-8", "surrogatepass")
        if isinstance(key, bytes | bytearray | memoryview):
            return bytes(key)
        return str.encode(str(key), "utf-8", "surrogatepass")
    except Exception:  # a str() that raises: one bucket for all such keys
        return b""


def should_shed_key(
    snapshot: Snapshot, criticality: Criticality | str | object, key: str | object
) -> bool:
    """Like :func:`should_shed`, with a stable decision per request key.

    The key (a user or session id) hashes to [0, 2**32): the same key gets the
    same decision for as long as the level holds, in every process and service,
    and a key shed at 20 % is also shed at 30 %. A key that is not a string is
    hashed as its ``str()`` (bytes as they are); never an exception.
    """
    # One dict lookup for a member or an exact name; anything else, even
    # unhashable, goes to Criticality.parse. True == 1 and hashes alike, but a
    # bool is no criticality.
    try:
        c = _CRITICALITY.get(criticality)
    except Exception:
        c = None
    if c is None or criticality is True:
        c = Criticality.parse(criticality)
    tier = snapshot.shed_tier
    if c < tier:
        return False
    if c > tier:
        return True
    # CRC-32 is fast but linear: keys differing in a few digits ("session-1",
    # "session-2", ...) get correlated hashes, and the share shed drifted by 5
    # standard deviations from the set percentage. Murmur3's 32-bit finalizer
    # mixes it; together still well under a microsecond, and stable across
    # processes, unlike hash().
    h = zlib.crc32(_key_bytes(key))
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h < snapshot.shed_threshold


# ---------------------------------------------------------------- building


def snapshot_from_proto(service: str, msg: agent_pb2.Snapshot, now: datetime) -> Snapshot:
    """The state a Snapshot message describes, evaluated at ``now``.

    Raises:
        InvalidChangeError: A record is malformed or concerns another service.
    """
    if msg.revision < 0:
        raise InvalidChangeError(f"revision {msg.revision} is negative")
    flags: dict[tuple[str, str], FlagRecord] = {}
    for flag_msg in msg.flags:
        record = _flag_from_proto(service, flag_msg)
        key = (record.scope, record.name)
        if key in flags:
            raise InvalidChangeError(f"{_flag_label(key)} appears twice")
        flags[key] = record
    shedding = _shedding_from_proto(service, msg.shedding) if msg.HasField("shedding") else None
    pin = _pin_from_proto(service, msg.pin) if msg.HasField("pin") else None
    return _build(service, msg.revision, flags, shedding, pin, now)


def apply_change(snapshot: Snapshot, msg: agent_pb2.Change, now: datetime) -> Snapshot:
    """The snapshot after one revision's changes, evaluated at ``now``.

    A Change carries whole records (with their layers) for what was set, and
    references for what was removed. Removing what is not there is not an error:
    the agent may have dropped an expired record on its own before the server's
    restore arrived. All or nothing: on an error ``snapshot`` stays as it is.

    Raises:
        StaleRevisionError: ``msg.revision`` is not above ``snapshot.revision``.
        InvalidChangeError: A record is malformed, concerns another service, or
            the Change both sets and removes the same thing.
    """
    if msg.revision <= snapshot.revision:
        raise StaleRevisionError(
            f"change at revision {msg.revision} is not newer than the applied "
            f"revision {snapshot.revision}"
        )
    service = snapshot.service
    flags = dict(snapshot.flag_records)
    set_keys: set[tuple[str, str]] = set()
    for flag_msg in msg.flags_set:
        record = _flag_from_proto(service, flag_msg)
        key = (record.scope, record.name)
        if key in set_keys:
            raise InvalidChangeError(f"{_flag_label(key)} is set twice")
        set_keys.add(key)
        flags[key] = record
    for ref in msg.flags_removed:
        key = (_check_scope(service, ref.scope, "flag ref"), ref.name)
        if not ref.name:
            raise InvalidChangeError(f"flag ref in scope {ref.scope!r} has no name")
        if key in set_keys:
            raise InvalidChangeError(f"{_flag_label(key)} is both set and removed")
        flags.pop(key, None)

    shedding = snapshot.shedding_record
    if msg.HasField("shedding"):
        if msg.shedding_removed:
            raise InvalidChangeError("shedding is both set and removed")
        shedding = _shedding_from_proto(service, msg.shedding)
    elif msg.shedding_removed:
        shedding = None

    pin = snapshot.pin_record
    if msg.HasField("pin"):
        if msg.pin_removed:
            raise InvalidChangeError("pin is both set and removed")
        pin = _pin_from_proto(service, msg.pin)
    elif msg.pin_removed:
        pin = None

    return _build(service, msg.revision, flags, shedding, pin, now)


def at(snapshot: Snapshot, now: datetime) -> Snapshot:
    """The snapshot as it stands at ``now``: expired layers give way to what they replaced.

    Returns ``snapshot`` itself when nothing has expired, so a caller can tell a
    no-op by identity. The revision stays: this is the agent catching up with time,
    not a new state from the server.
    """
    if snapshot.next_expiry is None or now < snapshot.next_expiry:
        return snapshot
    return _build(
        snapshot.service,
        snapshot.revision,
        snapshot.flag_records,
        snapshot.shedding_record,
        snapshot.pin_record,
        now,
    )


def apply_override(base: Snapshot, override: Override | None) -> Snapshot:
    """The snapshot the reads see: ``base`` (the server's state) with ``override``'s
    values above it.

    What the override names (flags, shedding, pin) replaces the server's
    effective value; everything else is the server's. The records stay the
    server's, so that the state underneath is cached and goes on expiring;
    ``next_expiry`` is the earlier of the server's and the override's. Without
    an override, ``base`` itself. No clock: whether the override has expired is
    the caller's to check.
    """
    if override is None:
        return base
    flags = dict(base.flags)
    scopes = dict(base.flag_scopes)
    for name, flag_value in override.flags.items():
        flags[name] = flag_value
        scopes[name] = OVERRIDE_SCOPE
    shedding = base.shedding
    shed_tier, shed_fraction, shed_threshold = (
        base.shed_tier,
        base.shed_fraction,
        base.shed_threshold,
    )
    if override.shedding is not None:
        shedding = override.shedding
        shed_tier, shed_fraction = int(shedding.tier), shedding.percent / 100.0
        shed_threshold = round(shed_fraction * _HASH_SPACE)
    pin = base.pin
    if override.pin is not None:
        pin = PinnedVersion(override.pin, override.reason, None, override.expires_at)
    next_expiry = override.expires_at
    if base.next_expiry is not None and base.next_expiry < next_expiry:
        next_expiry = base.next_expiry
    return dataclasses.replace(
        base,
        flags=flags,
        flag_scopes=scopes,
        shedding=shedding,
        pin=pin,
        next_expiry=next_expiry,
        shed_tier=shed_tier,
        shed_fraction=shed_fraction,
        shed_threshold=shed_threshold,
        override=override,
    )


def _build(
    service: str,
    revision: int,
    flag_records: Mapping[tuple[str, str], FlagRecord],
    shedding_record: SheddingRecord | None,
    pin_record: PinRecord | None,
    now: datetime,
) -> Snapshot:
    expiries: list[datetime] = []
    records: dict[tuple[str, str], FlagRecord] = {}
    flags: dict[str, FlagValue] = {}
    scopes: dict[str, str] = {}
    for key, chain in flag_records.items():
        record = _prune(chain, now)
        if record is None:
            continue
        records[key] = record
        if record.meta.expires_at is not None:
            expiries.append(record.meta.expires_at)
        scope, name = key
        # The service's own entry wins whichever order the two arrive in.
        if scope == GLOBAL_SCOPE and name in scopes:
            continue
        flags[name] = record.value
        scopes[name] = scope

    shedding_record = _prune(shedding_record, now)
    shedding: SheddingLevel | None = None
    shed_tier, shed_fraction = _NO_SHEDDING_TIER, 0.0
    if shedding_record is not None:
        shedding = SheddingLevel(shedding_record.tier, shedding_record.percent)
        shed_tier, shed_fraction = int(shedding_record.tier), shedding_record.percent / 100.0
        if shedding_record.meta.expires_at is not None:
            expiries.append(shedding_record.meta.expires_at)

    pin_record = _prune(pin_record, now)
    pin: PinnedVersion | None = None
    if pin_record is not None:
        meta = pin_record.meta
        pin = PinnedVersion(pin_record.version, meta.reason, meta.set_at, meta.expires_at)
        if meta.expires_at is not None:
            expiries.append(meta.expires_at)

    return Snapshot(
        service=service,
        revision=revision,
        flags=flags,
        flag_scopes=scopes,
        shedding=shedding,
        pin=pin,
        flag_records=records,
        shedding_record=shedding_record,
        pin_record=pin_record,
        next_expiry=min(expiries) if expiries else None,
        shed_tier=shed_tier,
        shed_fraction=shed_fraction,
        shed_threshold=round(shed_fraction * _HASH_SPACE),
    )


def _prune(record: _Record | None, now: datetime) -> _Record | None:
    """The chain without the layers expired by ``now`` (they never apply again)."""
    if record is None:
        return None
    expires_at = record.meta.expires_at
    if expires_at is not None and expires_at <= now:
        return _prune(record.replaced, now)
    below = _prune(record.replaced, now)
    return record if below is record.replaced else dataclasses.replace(record, replaced=below)


# ---------------------------------------------------------------- protobuf -> records


def _check_scope(service: str, scope: str, what: str) -> str:
    if scope != GLOBAL_SCOPE and scope != service:
        raise InvalidChangeError(
            f"{what} in scope {scope!r} concerns neither {service!r} nor {GLOBAL_SCOPE!r}"
        )
    return scope


def _check_service(service: str, got: str, what: str) -> str:
    # An empty service in a record means the stream's own: the stream is per service.
    if got and got != service:
        raise InvalidChangeError(f"{what} is for service {got!r}, not {service!r}")
    return service


def _flag_label(key: tuple[str, str]) -> str:
    return f"flag {key[1]!r} (scope {key[0]!r})"


def _layers(msg: Any) -> Iterable[Any]:
    """The layers of a record message, top first."""
    while True:
        yield msg
        if not msg.HasField("replaced"):
            return
        msg = msg.replaced


def _flag_from_proto(service: str, msg: types_pb2.Flag) -> FlagRecord:
    scope = _check_scope(service, msg.scope, f"flag {msg.name!r}")
    if not msg.name:
        raise InvalidChangeError(f"flag in scope {scope!r} has no name")
    label = _flag_label((scope, msg.name))
    layers = [(_flag_value(layer.value, label), _meta(layer.meta, label)) for layer in _layers(msg)]
    record: FlagRecord | None = None
    for flag_value, meta in reversed(layers):
        record = FlagRecord(scope, msg.name, flag_value, meta, record)
    assert record is not None  # _layers yields the top at least
    return record


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _flag_value(msg: types_pb2.FlagValue, label: str) -> FlagValue:
    kind = msg.WhichOneof("kind")
    if kind == "bool_value":
        return msg.bool_value
    if kind == "number_value":
        if not math.isfinite(msg.number_value):
            raise InvalidChangeError(f"{label}: number {msg.number_value!r} is not finite")
        return msg.number_value
    if kind == "string_value":
        return msg.string_value
    if kind == "json_value":
        try:
            parsed = json.loads(msg.json_value, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise InvalidChangeError(f"{label}: json_value is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise InvalidChangeError(f"{label}: json_value is not a JSON object")
        return parsed
    raise InvalidChangeError(f"{label} has no value")


def _time(ts: timestamp_pb2.Timestamp, label: str, field: str) -> datetime:
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidChangeError(f"{label}: {field} is not a valid time") from None


def _meta(msg: types_pb2.Meta, label: str) -> Meta:
    return Meta(
        actor=msg.actor,
        reason=msg.reason,
        set_at=_time(msg.set_at, label, "meta.set_at") if msg.HasField("set_at") else None,
        incident=msg.incident,
        actor_authenticated=msg.actor_authenticated,
        expires_at=(
            _time(msg.expires_at, label, "meta.expires_at") if msg.HasField("expires_at") else None
        ),
        mod_revision=msg.mod_revision,
        bundle_id=msg.bundle_id,
    )


def _shedding_from_proto(service: str, msg: types_pb2.Shedding) -> SheddingRecord:
    _check_service(service, msg.service, "shedding")
    layers: list[tuple[Criticality, float, Meta]] = []
    for layer in _layers(msg):
        tier = _CRITICALITY.get(layer.tier)
        if tier is None:
            name = "unspecified" if layer.tier == types_pb2.TIER_UNSPECIFIED else "unknown"
            raise InvalidChangeError(f"shedding: {name} tier {layer.tier}")
        percent = layer.percent
        if not math.isfinite(percent) or not 0.0 <= percent <= 100.0:
            raise InvalidChangeError(f"shedding: percent {percent!r} is not between 0 and 100")
        layers.append((tier, percent, _meta(layer.meta, "shedding")))
    record: SheddingRecord | None = None
    for tier, percent, meta in reversed(layers):
        record = SheddingRecord(service, tier, percent, meta, record)
    assert record is not None
    return record


def _pin_from_proto(service: str, msg: types_pb2.Pin) -> PinRecord:
    _check_service(service, msg.service, "pin")
    layers: list[tuple[str, Meta, PinHistory | None]] = []
    for layer in _layers(msg):
        if not layer.version:
            raise InvalidChangeError("pin has no version")
        previous = None
        if layer.HasField("previous"):
            prev = layer.previous
            previous = PinHistory(
                version=prev.version,
                actor=prev.actor,
                reason=prev.reason,
                set_at=(
                    _time(prev.set_at, "pin", "previous.set_at")
                    if prev.HasField("set_at")
                    else None
                ),
            )
        layers.append((layer.version, _meta(layer.meta, "pin"), previous))
    record: PinRecord | None = None
    for version, meta, previous in reversed(layers):
        record = PinRecord(service, version, meta, previous, record)
    assert record is not None
    return record


# ---------------------------------------------------------------- records -> protobuf


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def _meta_to_proto(meta: Meta) -> types_pb2.Meta:
    msg = types_pb2.Meta(
        actor=meta.actor,
        actor_authenticated=meta.actor_authenticated,
        reason=meta.reason,
        incident=meta.incident,
        mod_revision=meta.mod_revision,
        bundle_id=meta.bundle_id,
    )
    if meta.set_at is not None:
        msg.set_at.CopyFrom(_timestamp(meta.set_at))
    if meta.expires_at is not None:
        msg.expires_at.CopyFrom(_timestamp(meta.expires_at))
    return msg


def flag_value_to_proto(v: FlagValue) -> types_pb2.FlagValue:
    """A flag value as the protobuf ``FlagValue`` (ints count as numbers).

    Raises:
        InvalidChangeError: ``v`` is none of the four kinds.
    """
    if isinstance(v, bool):
        return types_pb2.FlagValue(bool_value=v)
    if isinstance(v, int | float):
        return types_pb2.FlagValue(number_value=float(v))
    if isinstance(v, str):
        return types_pb2.FlagValue(string_value=v)
    if isinstance(v, dict):
        try:
            text = json.dumps(v, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidChangeError(f"flag value is not a JSON object: {exc}") from None
        return types_pb2.FlagValue(json_value=text)
    raise InvalidChangeError(f"flag value {v!r} is none of bool, number, string or JSON object")


def _flag_to_proto(record: FlagRecord) -> types_pb2.Flag:
    msg = types_pb2.Flag(
        scope=record.scope,
        name=record.name,
        value=flag_value_to_proto(record.value),
        meta=_meta_to_proto(record.meta),
    )
    if record.replaced is not None:
        msg.replaced.CopyFrom(_flag_to_proto(record.replaced))
    return msg


def _shedding_to_proto(record: SheddingRecord) -> types_pb2.Shedding:
    msg = types_pb2.Shedding(
        service=record.service,
        tier=record.tier.name,
        percent=record.percent,
        meta=_meta_to_proto(record.meta),
    )
    if record.replaced is not None:
        msg.replaced.CopyFrom(_shedding_to_proto(record.replaced))
    return msg


def _pin_to_proto(record: PinRecord) -> types_pb2.Pin:
    msg = types_pb2.Pin(
        service=record.service, version=record.version, meta=_meta_to_proto(record.meta)
    )
    if record.previous is not None:
        prev = record.previous
        msg.previous.CopyFrom(
            types_pb2.PinHistory(version=prev.version, actor=prev.actor, reason=prev.reason)
        )
        if prev.set_at is not None:
            msg.previous.set_at.CopyFrom(_timestamp(prev.set_at))
    if record.replaced is not None:
        msg.replaced.CopyFrom(_pin_to_proto(record.replaced))
    return msg


def snapshot_to_proto(snapshot: Snapshot) -> agent_pb2.Snapshot:
    """The snapshot's records (layers in force) as a Snapshot message."""
    msg = agent_pb2.Snapshot(
        revision=snapshot.revision,
        flags=[_flag_to_proto(r) for r in snapshot.flag_records.values()],
    )
    if snapshot.shedding_record is not None:
        msg.shedding.CopyFrom(_shedding_to_proto(snapshot.shedding_record))
    if snapshot.pin_record is not None:
        msg.pin.CopyFrom(_pin_to_proto(snapshot.pin_record))
    return msg


# ---------------------------------------------------------------- cache file


def snapshot_to_cache(snapshot: Snapshot) -> bytes:
    """The cache file's content: JSON with the service, the revision and the records.

    The records are in protobuf's JSON form (field names as in the .proto), layers
    included, so that an agent booting from the cache switches on time too.
    """
    records = snapshot_to_proto(snapshot)
    records.ClearField("revision")
    doc = {
        "format": CACHE_FORMAT,
        "service": snapshot.service,
        "revision": snapshot.revision,
        "records": json_format.MessageToDict(records, preserving_proto_field_name=True),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def snapshot_from_cache(data: bytes, service: str, now: datetime) -> Snapshot:
    """The snapshot a cache file holds, evaluated at ``now``.

    Fields the .proto does not know are ignored, so that a service rolled back to
    an older agent still boots from the cache a newer one wrote.

    Raises:
        CorruptCacheError: The content is not a cache of this format, is for
            another service, or holds a record the agent would reject; whatever
            is wrong with the content, never another exception.
    """
    try:
        return _snapshot_from_cache(data, service, now)
    except CorruptCacheError:
        raise
    except InvalidChangeError as exc:
        raise CorruptCacheError(f"invalid record: {exc}") from None
    except Exception as exc:  # anything else a damaged or hand-edited file can cause
        raise CorruptCacheError(f"unusable ({type(exc).__name__}: {exc})") from None


def _snapshot_from_cache(data: bytes, service: str, now: datetime) -> Snapshot:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CorruptCacheError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CorruptCacheError("not a JSON object")
    if doc.get("format") != CACHE_FORMAT:
        raise CorruptCacheError(
            f"format {doc.get('format')!r} is not the supported format {CACHE_FORMAT}"
        )
    cached_service = doc.get("service")
    if cached_service != service:
        raise CorruptCacheError(f"the cache is for service {cached_service!r}, not {service!r}")
    revision = doc.get("revision")
    if (
        not isinstance(revision, int)
        or isinstance(revision, bool)
        or not 0 <= revision <= MAX_REVISION
    ):
        raise CorruptCacheError(f"revision {revision!r} is not a revision")
    records = doc.get("records")
    if not isinstance(records, dict):
        raise CorruptCacheError("'records' is missing or not a JSON object")
    msg = agent_pb2.Snapshot()
    try:
        json_format.ParseDict(records, msg, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise CorruptCacheError(f"records do not parse: {exc}") from None
    msg.revision = revision
    return snapshot_from_proto(service, msg, now)


# ---------------------------------------------------------------- changes for callbacks


@dataclass(frozen=True, slots=True)
class StateChange:
    """What changed in the effective state, as ``on_change`` callbacks receive it.

    Attributes:
        revision: The revision of the new state.
        flags: Flag name to ``(old, new)`` effective values; None for absent.
        shedding: ``(old, new)`` shedding levels when the level changed, else None.
        pin: ``(old, new)`` pins when the pin changed (version, reason or expiry),
            else None.
        override: ``(old, new)`` break-glass overrides when the override in
            force changed (applied, replaced, expired or removed), else None;
            None in a pair is no override.
    """

    revision: int
    flags: Mapping[str, tuple[FlagValue | None, FlagValue | None]]
    shedding: tuple[SheddingLevel | None, SheddingLevel | None] | None = None
    pin: tuple[PinnedVersion | None, PinnedVersion | None] | None = None
    override: tuple[Override | None, Override | None] | None = None

    @property
    def empty(self) -> bool:
        """Nothing a service sees changed (callbacks are not called for it)."""
        return (
            not self.flags and self.shedding is None and self.pin is None and self.override is None
        )


def _same_value(a: FlagValue | None, b: FlagValue | None) -> bool:
    # True == 1.0 in Python, but a kill switch turning into a number is a change.
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return _canonical(a) == _canonical(b)
    return a == b


def _canonical(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def diff(old: Snapshot, new: Snapshot) -> StateChange:
    """What a service sees change from ``old`` to ``new`` (effective values, and the
    break-glass override in force).

    A record moving between scopes with the same effective value (the service's
    own entry removed, the global one equal) is no change.
    """
    flags: dict[str, tuple[FlagValue | None, FlagValue | None]] = {}
    old_flags, new_flags = old.flags, new.flags
    for name in old_flags.keys() | new_flags.keys():
        before, after = old_flags.get(name), new_flags.get(name)
        if not _same_value(before, after):
            flags[name] = (before, after)
    return StateChange(
        revision=new.revision,
        flags=flags,
        shedding=None if old.shedding == new.shedding else (old.shedding, new.shedding),
        pin=None if old.pin == new.pin else (old.pin, new.pin),
        override=None if old.override == new.override else (old.override, new.override),
    )
