"""Which mitigations GetStatus calls stale: in force, without expiry, set longer ago than
the server's --stale-after."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import types_pb2 as t
from controlplane.server._config import DEFAULT_STALE_AFTER, ServerConfig
from controlplane.server._mitigation_service import stale_mitigations

NOW = datetime(2026, 11, 26, 17, 30, tzinfo=UTC)


def meta(age: timedelta, expires_in: timedelta | None = None) -> t.Meta:
    value = t.Meta(actor="sre")
    value.set_at.CopyFrom(_ts(NOW - age))
    if expires_in is not None:
        value.expires_at.CopyFrom(_ts(NOW + expires_in))
    return value


def _ts(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def test_the_default_threshold_is_four_hours() -> None:
    assert timedelta(hours=4) == DEFAULT_STALE_AFTER
    assert ServerConfig().stale_after == DEFAULT_STALE_AFTER


def test_only_records_without_expiry_older_than_the_threshold_are_stale_oldest_first() -> None:
    status = m.GetStatusResponse(
        service="checkout",
        flags=[
            t.Flag(scope="global", name="old-ui", meta=meta(timedelta(days=3))),
            t.Flag(scope="checkout", name="fresh", meta=meta(timedelta(hours=3, minutes=59))),
            t.Flag(
                scope="checkout",
                name="boxed",
                meta=meta(timedelta(days=9), expires_in=timedelta(minutes=5)),
            ),
        ],
        shedding=t.Shedding(service="checkout", percent=30, meta=meta(timedelta(hours=5))),
        pin=t.Pin(service="checkout", version="v1.4.2", meta=meta(timedelta(hours=4, seconds=1))),
    )
    stale = stale_mitigations(status, NOW, DEFAULT_STALE_AFTER)
    assert [(s.kind, s.scope, s.name) for s in stale] == [
        ("flag", "global", "old-ui"),
        ("shedding", "checkout", ""),
        ("pin", "checkout", "v1.4.2"),
    ]
    assert [s.age.ToTimedelta() for s in stale] == [
        timedelta(days=3),
        timedelta(hours=5),
        timedelta(hours=4, seconds=1),
    ]
    assert stale[0].set_at == status.flags[0].meta.set_at


def test_nothing_in_force_is_nothing_stale() -> None:
    assert stale_mitigations(m.GetStatusResponse(service="checkout"), NOW, timedelta(0)) == []
