"""cpctl status: what is in force for a service and which instances applied it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from controlplane.api.v1 import mitigation_pb2, types_pb2
from controlplane.cli._output import to_plain
from controlplane.cli.status import NO_INSTANCES, render_status
from tests.unit.cli.support import NOW, instance_message, ts


def _status(**fields: Any) -> mitigation_pb2.GetStatusResponse:
    return mitigation_pb2.GetStatusResponse(service="checkout", revision=900, **fields)


def test_status_marks_scope_time_left_drift_lag_and_stale_instances() -> None:
    own = types_pb2.Flag(
        scope="checkout",
        name="new-ui",
        value=types_pb2.FlagValue(bool_value=False),
        meta=types_pb2.Meta(
            actor="sre-1", reason="errors", expires_at=ts(NOW + timedelta(minutes=29))
        ),
    )
    inherited = types_pb2.Flag(
        scope="global", name="checkout.mode", value=types_pb2.FlagValue(string_value="read-only")
    )
    response = _status(
        flags=[own, inherited],
        shedding=types_pb2.Shedding(
            service="checkout",
            tier=types_pb2.SHEDDABLE_PLUS,
            percent=30,
            meta=types_pb2.Meta(actor="sre-1", expires_at=ts(NOW + timedelta(hours=2))),
        ),
        pin=types_pb2.Pin(service="checkout", version="v1.4.2", meta=types_pb2.Meta(actor="sre-2")),
        instances=[
            instance_message("i-1", running_version="v1.4.2", applied_revision=900, connected=True,
                      server_id="s1"),
            instance_message("i-2", running_version="v1.5.0", applied_revision=899, lag=1,
                      connected=True, server_id="s1"),
            instance_message("i-3", running_version="v1.4.2", lag=-1, server_id="s2",
                      last_seen=ts(NOW - timedelta(minutes=3))),
        ],
        drift={"v1.5.0": 1},
    )  # fmt: skip
    lines = list(render_status(to_plain(response), NOW).lines)
    assert lines[0] == "checkout · revision 900 · 2 of 3 instance(s) connected"
    new_ui = next(line for line in lines if line.strip().startswith("new-ui"))
    assert "checkout (own)" in new_ui
    assert "2026-11-26T17:59:00Z (in 29m)" in new_ui
    mode = next(line for line in lines if line.strip().startswith("checkout.mode"))
    assert mode.split()[1:3] == ['"read-only"', "global"]
    shedding = next(line for line in lines if line.startswith("shedding:"))
    assert shedding.startswith("shedding: SHEDDABLE_PLUS 30% (sheds all of SHEDDABLE and 30%")
    assert "expires 2026-11-26T19:30:00Z (in 2h), then off" in shedding
    assert "pin: v1.4.2" in lines
    rows = {line.split()[0]: line for line in lines if line.startswith("i-")}
    assert rows["i-1"].split() == ["i-1", "s1", "yes", "900", "0", "v1.4.2"]
    assert rows["i-2"].split()[:6] == ["i-2", "s1", "yes", "899", "1", "v1.5.0"]
    assert "DRIFT: pinned v1.4.2" in rows["i-2"] and "behind by 1 change(s)" in rows["i-2"]
    assert rows["i-3"].split()[:6] == ["i-3", "s2", "no", "-", "?", "v1.4.2"]
    assert "stale (disconnected, last seen 3m ago)" in rows["i-3"]
    assert "lag unknown" in rows["i-3"] and "DRIFT" not in rows["i-3"]
    assert "drift: 1 instance(s) run v1.5.0, not the pinned v1.4.2" in lines
    assert NO_INSTANCES not in lines


def test_status_without_connected_instances_says_so() -> None:
    lines = list(render_status(to_plain(_status()), NOW).lines)
    assert lines[0] == "checkout · revision 900 · 0 of 0 instance(s) connected"
    assert lines[2:5] == ["flags: none", "shedding: off", "pin: none"]
    assert lines[-1] == NO_INSTANCES
    stale = _status(instances=[instance_message("i-1", connected=False)])
    assert render_status(to_plain(stale), NOW).lines[-1] == NO_INSTANCES


def test_status_warns_of_each_stale_mitigation_with_the_command_that_clears_it() -> None:
    def stale(kind: str, scope: str, name: str, age: timedelta) -> mitigation_pb2.StaleMitigation:
        message = mitigation_pb2.StaleMitigation(
            kind=kind, scope=scope, name=name, set_at=ts(NOW - age)
        )
        message.age.FromTimedelta(age)
        return message

    response = _status(
        stale=[
            stale("flag", "global", "old-ui", timedelta(days=2, hours=3)),
            stale("flag", "checkout", "new-ui", timedelta(hours=5, minutes=12)),
            stale("shedding", "checkout", "", timedelta(hours=4, minutes=1)),
            stale("pin", "checkout", "v1.4.2", timedelta(hours=6)),
        ]
    )
    response.stale_after.FromTimedelta(timedelta(hours=4))
    assert render_status(to_plain(response), NOW).warnings == [
        "warning: flag old-ui (global) has been in force for 2d3h with no expiry (stale after "
        "4h): clear it once its incident is over (cpctl flag clear global old-ui --reason ...)",
        "warning: flag new-ui has been in force for 5h12m with no expiry (stale after 4h): "
        "clear it once its incident is over (cpctl flag clear checkout new-ui --reason ...)",
        "warning: shedding has been in force for 4h1m with no expiry (stale after 4h): "
        "clear it once its incident is over (cpctl shed clear checkout --reason ...)",
        "warning: pin v1.4.2 has been in force for 6h with no expiry (stale after 4h): "
        "clear it once its incident is over (cpctl pin clear checkout --reason ...)",
    ]


def test_status_without_stale_mitigations_warns_of_none() -> None:
    response = _status()
    response.stale_after.FromTimedelta(timedelta(hours=4))
    assert render_status(to_plain(response), NOW).warnings == []
