"""The wire: the server's Snapshot and Change messages into snapshots, and back.

Pure, like ``agents._state``: the client passes in the message and the time and
gets the next snapshot, or an error that leaves the current one as it is::

    snapshot_from_proto(service, msg, now)  a Snapshot message: the whole state
    apply_change(snapshot, msg, now)        a Change: one revision, one swap, one ack
    snapshot_to_proto(snapshot)             the records, layers included (the cache)

Imports only the generated ``controlplane.api.v1`` modules, protobuf and the
standard library.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2

from agents import _types
from agents._state import (
    GLOBAL_SCOPE,
    FlagRecord,
    InvalidChangeError,
    Meta,
    PinHistory,
    PinRecord,
    SheddingRecord,
    Snapshot,
    StaleRevisionError,
    build,
)
from agents._types import Criticality, FlagValue
from controlplane.api.v1 import agent_pb2, types_pb2

# Bound by assignment, not imported, so that ``_CRITICALITY.get`` compiles to
# LOAD_METHOD (CPython 3.11 does not use it on an imported name).
_CRITICALITY = _types._CRITICALITY

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
    return build(service, msg.revision, flags, shedding, pin, now)


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

    return build(service, msg.revision, flags, shedding, pin, now)


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


flag_record_to_proto = _flag_to_proto
shedding_record_to_proto = _shedding_to_proto
pin_record_to_proto = _pin_to_proto


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
