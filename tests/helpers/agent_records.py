"""Protobuf records and snapshots for the pure tests of the agent's state.

A service's records as the server sends them (flags with their layers,
shedding, pins) and the snapshots an agent builds from them, at fixed times.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from agents import _codec
from agents._state import Snapshot
from controlplane.api.v1 import agent_pb2, types_pb2

SERVICE = "checkout"
T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=30)
T2 = T0 + timedelta(minutes=10)
TICK = timedelta(microseconds=1)


# ---------------------------------------------------------------- builders


def meta(expires_at: datetime | None = None, reason: str = "incident") -> types_pb2.Meta:
    msg = types_pb2.Meta(actor="oncall", reason=reason, incident="INC-1", mod_revision=7)
    msg.set_at.FromDatetime(T0 - timedelta(days=1))
    if expires_at is not None:
        msg.expires_at.FromDatetime(expires_at)
    return msg


def fv(value: Any) -> types_pb2.FlagValue:
    if isinstance(value, bool):
        return types_pb2.FlagValue(bool_value=value)
    if isinstance(value, float | int):
        return types_pb2.FlagValue(number_value=value)
    if isinstance(value, str):
        return types_pb2.FlagValue(string_value=value)
    return types_pb2.FlagValue(json_value=json.dumps(value))


def flag(
    name: str,
    value: Any,
    scope: str = SERVICE,
    expires_at: datetime | None = None,
    replaced: types_pb2.Flag | None = None,
) -> types_pb2.Flag:
    msg = types_pb2.Flag(scope=scope, name=name, value=fv(value), meta=meta(expires_at))
    if replaced is not None:
        msg.replaced.CopyFrom(replaced)
    return msg


def shedding(
    tier: int,
    percent: float,
    expires_at: datetime | None = None,
    replaced: types_pb2.Shedding | None = None,
) -> types_pb2.Shedding:
    msg = types_pb2.Shedding(service=SERVICE, percent=percent, meta=meta(expires_at))
    msg.tier = tier  # type: ignore[assignment]
    if replaced is not None:
        msg.replaced.CopyFrom(replaced)
    return msg


def pin(
    version: str, expires_at: datetime | None = None, replaced: types_pb2.Pin | None = None
) -> types_pb2.Pin:
    msg = types_pb2.Pin(service=SERVICE, version=version, meta=meta(expires_at, reason="bad"))
    if replaced is not None:
        msg.replaced.CopyFrom(replaced)
    return msg


def snap(
    *flags: types_pb2.Flag,
    shed: types_pb2.Shedding | None = None,
    pinned: types_pb2.Pin | None = None,
    revision: int = 10,
    now: datetime = T0,
) -> Snapshot:
    msg = agent_pb2.Snapshot(revision=revision, flags=list(flags))
    if shed is not None:
        msg.shedding.CopyFrom(shed)
    if pinned is not None:
        msg.pin.CopyFrom(pinned)
    return _codec.snapshot_from_proto(SERVICE, msg, now)


def fixed(x: float) -> Callable[[], float]:
    return lambda: x


def never() -> float:
    raise AssertionError("rand must not be called outside the tier itself")


def change(revision: int = 11, **fields: Any) -> agent_pb2.Change:
    return agent_pb2.Change(revision=revision, **fields)


def chain() -> types_pb2.Flag:
    """Base true; false layered until T1; "x" layered on that until T2 (< T1)."""
    return flag(
        "f", "x", expires_at=T2, replaced=flag("f", False, expires_at=T1, replaced=flag("f", True))
    )
