"""The agent's state: an immutable snapshot and the pure functions that make the next one.

No I/O, no clock reads, no locks, no threads: the client feeds in what the server
sends and the time, and swaps the snapshot it gets back into one attribute. Reads
are a few attribute lookups on whatever snapshot is current, so the read path
needs no lock::

    empty_snapshot(service)                 before anything arrived: reads give defaults
    at(snapshot, now)                       the timer, at snapshot.next_expiry
    apply_override(base, override)          a break-glass override above the server's
                                            state: the snapshot the reads see
    diff(old, new)                          what the on_change callbacks receive
    enabled / value                         the flag reads

The rest of the agent's state lives next to this module: the value types in
``agents._types``, the server's messages into snapshots (``snapshot_from_proto``,
``apply_change``) and back in ``agents._codec``, the cache file's encoding in
``agents._cache``, and the shedding decisions (``should_shed``,
``should_shed_key``) in ``agents._shed``.

Records arrive with their layers: a time-boxed record keeps the record it
replaced. The snapshot keeps the layers still in force and the effective values
computed from them; at ``next_expiry`` the timer calls :func:`at` and the
replaced layer applies again, also while the server is unreachable. The server's
own restore arrives later as a Change and finds the agent already there.

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

This module imports only the value types and the standard library; the agent as
a whole only the generated ``controlplane.api.v1`` modules, protobuf and the
standard library besides gRPC, so that a service embedding it pulls in nothing
else.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from agents._types import (
    Criticality,
    FlagValue,
    Override,
    PinnedVersion,
    SheddingLevel,
)

GLOBAL_SCOPE = "global"
OVERRIDE_SCOPE = "override"
"""The scope :attr:`Snapshot.flag_scopes` names for a flag a break-glass override sets."""
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

    Built only by :func:`build` (through this module's functions and those of
    ``agents._codec``); never mutated (``flags`` and the other
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
            :func:`agents._shed.should_shed_key`.
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
    return build(service, 0, {}, None, None, datetime.min.replace(tzinfo=UTC))


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


# ---------------------------------------------------------------- building


def at(snapshot: Snapshot, now: datetime) -> Snapshot:
    """The snapshot as it stands at ``now``: expired layers give way to what they replaced.

    Returns ``snapshot`` itself when nothing has expired, so a caller can tell a
    no-op by identity. The revision stays: this is the agent catching up with time,
    not a new state from the server.
    """
    if snapshot.next_expiry is None or now < snapshot.next_expiry:
        return snapshot
    return build(
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


def build(
    service: str,
    revision: int,
    flag_records: Mapping[tuple[str, str], FlagRecord],
    shedding_record: SheddingRecord | None,
    pin_record: PinRecord | None,
    now: datetime,
) -> Snapshot:
    """The snapshot of these records as they stand at ``now``, effective values
    precomputed; the one constructor of :class:`Snapshot`."""
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
