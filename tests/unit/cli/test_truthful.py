"""cpctl says what is so: relative times, the closest flag names, what a clear left in
force, a reverted bundle's expiry, and warnings in --json."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from controlplane.api.v1 import mitigation_pb2, types_pb2
from controlplane.cli._errors import CliError, ExitCode, report_error, report_warning
from controlplane.cli._output import format_age, format_time, to_plain
from controlplane.cli.bundle import render_bundle_get, render_bundle_list
from controlplane.cli.flag import closest_flags, did_you_mean_hint
from controlplane.cli.pin import render_pin_clear
from controlplane.cli.shed import render_shed_clear
from tests.unit.cli.support import NOW, ts


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=44.6), "45s"),
        (timedelta(seconds=59.6), "1m"),
        (timedelta(minutes=4, seconds=30), "4m30s"),
        (timedelta(minutes=9, seconds=59.4), "9m59s"),
        # A 30m expiry read a moment after the write.
        (timedelta(minutes=29, seconds=59, milliseconds=800), "30m"),
        (timedelta(minutes=29, seconds=29), "29m"),
        (timedelta(hours=1, minutes=59, seconds=40), "2h"),
        (timedelta(hours=2, minutes=5, seconds=10), "2h5m"),
        (timedelta(hours=23, minutes=59, seconds=50), "1d"),
        (timedelta(days=1, hours=2, minutes=59), "1d3h"),
        (timedelta(days=3, hours=4), "3d4h"),
        (-timedelta(minutes=11, seconds=40), "12m"),
    ],
)
def test_durations_are_rounded_to_the_unit_they_show(delta: timedelta, text: str) -> None:
    assert format_age(delta) == text


def test_times_say_in_or_ago_rounded() -> None:
    written = NOW + timedelta(minutes=30) - timedelta(milliseconds=150)
    assert format_time(written, NOW) == "2026-11-26T17:59:59Z (in 30m)"
    assert format_time(NOW - timedelta(seconds=90), NOW) == "2026-11-26T17:28:30Z (1m30s ago)"


SEEN = [
    ("checkout", "new-ui"),
    ("checkout", "checkout.mode"),
    ("global", "new-ux"),
    ("global", "payments.mode"),
    ("global", "kill-all"),
]


def test_closest_flags_first_and_in_their_scope() -> None:
    # Equally close by difflib's ratio: the swapped letters first, then the service's own.
    assert closest_flags("new-iu", SEEN) == [("checkout", "new-ui"), ("global", "new-ux")]
    assert closest_flags("payment.mode", SEEN) == [("global", "payments.mode")]
    assert closest_flags("zzz", SEEN) == []
    assert closest_flags("new-iu", SEEN, limit=1) == [("checkout", "new-ui")]
    # A name the service does not have but sees globally is that flag, in global.
    assert closest_flags("kill-all", [("global", "kill-all")]) == [("global", "kill-all")]
    # The same flag listed twice comes once.
    assert closest_flags("new-iu", [("checkout", "new-ui")] * 2) == [("checkout", "new-ui")]


def test_did_you_mean_names_each_scope_or_where_to_look() -> None:
    similar = [("checkout", "new-ui"), ("global", "new-ux")]
    assert did_you_mean_hint("checkout", similar) == (
        "did you mean new-ui (in checkout), new-ux (in global)?"
    )
    assert did_you_mean_hint("checkout", []) == (
        "no flag checkout sees (its own or global) has a similar name: "
        "`cpctl flag list checkout --effective` lists them"
    )
    assert did_you_mean_hint("global", []) == (
        "no global flag has a similar name: `cpctl flag list global` lists them"
    )


def test_warnings_and_errors_carry_did_you_mean_in_json(capsys: pytest.CaptureFixture[str]) -> None:
    details = {"did_you_mean": [{"scope": "checkout", "name": "new-ui"}]}
    report_warning("NOT_FOUND", "no flag new-iu", True, hint="did you mean", details=details)
    error = CliError("NOT_FOUND", "flag new-iu is not set", ExitCode.NOT_FOUND, details=details)
    assert report_error(error, True) == 5
    captured = capsys.readouterr()
    assert captured.out == ""
    warning_line, error_line = captured.err.splitlines()
    assert json.loads(warning_line) == {
        "warning": {"code": "NOT_FOUND", "message": "no flag new-iu", **details}
    }
    assert json.loads(error_line) == {
        "error": {
            "code": "NOT_FOUND",
            "message": "flag new-iu is not set",
            "exit_code": 5,
            **details,
        }
    }

    report_warning("NOT_FOUND", "no flag new-iu", False, hint="did you mean new-ui?")
    assert capsys.readouterr().err == "warning: no flag new-iu\nhint: did you mean new-ui?\n"


def _pin(version: str, minutes: int | None = None) -> types_pb2.Pin:
    meta = types_pb2.Meta(actor="sre-1", reason="r", set_at=ts(NOW - timedelta(hours=3)))
    if minutes is not None:
        meta.expires_at.CopyFrom(ts(NOW + timedelta(minutes=minutes)))
    return types_pb2.Pin(service="checkout", version=version, meta=meta)


def test_a_cleared_pin_layer_says_the_pin_beneath_applies_now() -> None:
    beneath = _pin("v1.4.2", minutes=120)
    top = _pin("v1.5.0", minutes=30)
    top.replaced.CopyFrom(beneath)
    response = mitigation_pb2.UnpinVersionResponse(
        result=types_pb2.WriteResult(changed=True, revision=901), removed=top, restored=beneath
    )
    assert list(render_pin_clear(to_plain(response), NOW, "checkout").lines) == [
        "checkout: time-boxed pin v1.5.0 removed; checkout is still pinned · rev 901",
        "  the pin beneath it, v1.4.2, applies now, until 2026-11-26T19:30:00Z (in 2h), "
        "then unpinned",
        '  to remove every layer: cpctl pin clear checkout --all-layers --reason "..."',
    ]


def test_all_layers_names_the_layers_it_removed_but_not_expired_ones() -> None:
    expired = _pin("v1.3.0", minutes=-5)
    middle = _pin("v1.4.2", minutes=120)
    middle.replaced.CopyFrom(expired)
    top = _pin("v1.5.0", minutes=30)
    top.replaced.CopyFrom(middle)
    response = mitigation_pb2.UnpinVersionResponse(
        result=types_pb2.WriteResult(changed=True, revision=902), removed=top
    )
    assert list(render_pin_clear(to_plain(response), NOW, "checkout").lines) == [
        "checkout: unpinned (was v1.5.0, and every layer beneath it: v1.4.2) · rev 902"
    ]


def test_a_plain_clear_says_nothing_of_layers() -> None:
    response = mitigation_pb2.ClearSheddingResponse(
        result=types_pb2.WriteResult(changed=True, revision=903),
        removed=types_pb2.Shedding(service="checkout", tier=types_pb2.SHEDDABLE, percent=30),
    )
    assert list(render_shed_clear(to_plain(response), NOW, "checkout").lines) == [
        "checkout: shedding off (was SHEDDABLE 30%) · rev 903"
    ]


def _bundle(state: int, expires_in: timedelta) -> mitigation_pb2.Bundle:
    return mitigation_pb2.Bundle(
        id="20261126-164500-degrade-3fa2",
        name="degrade",
        state=state,  # type: ignore[arg-type]
        meta=types_pb2.Meta(
            actor="sre-1",
            reason="timeouts",
            set_at=ts(NOW - timedelta(minutes=10)),
            expires_at=ts(NOW + expires_in),
        ),
    )


def test_a_reverted_bundle_shows_no_expiry_to_come() -> None:
    reverted = _bundle(mitigation_pb2.REVERTED, timedelta(hours=2))
    listed = to_plain(mitigation_pb2.ListBundlesResponse(bundles=[reverted]))
    header, row = render_bundle_list(listed, NOW).lines
    expires = row[header.index("EXPIRES") :].split()[0]
    assert expires == "-"
    shown = list(
        render_bundle_get(to_plain(mitigation_pb2.GetBundleResponse(bundle=reverted)), NOW).lines
    )
    assert "  expiry    none: reverted before its expiry at 2026-11-26T19:30:00Z" in shown
    assert not any("(in " in line for line in shown)

    applied = _bundle(mitigation_pb2.APPLIED, timedelta(hours=2))
    listed = to_plain(mitigation_pb2.ListBundlesResponse(bundles=[applied]))
    header, row = render_bundle_list(listed, NOW).lines
    assert row[header.index("EXPIRES") :].startswith("2026-11-26T19:30:00Z (in 2h)")

    expired = _bundle(mitigation_pb2.EXPIRED, -timedelta(minutes=3))
    shown = list(
        render_bundle_get(to_plain(mitigation_pb2.GetBundleResponse(bundle=expired)), NOW).lines
    )
    assert (
        "  expired   2026-11-26T17:27:00Z (3m ago): what each change replaced applied again then"
        in shown
    )
