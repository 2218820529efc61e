"""cpctl bundle: its output, the services it concerns, and its checks before a call."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from controlplane.api.v1 import mitigation_pb2, types_pb2
from controlplane.cli._output import to_plain
from controlplane.cli.bundle import (
    change_services,
    key_services,
    render_bundle_apply,
    render_bundle_get,
    render_bundle_list,
    render_bundle_revert,
)
from tests.unit.cli.support import NOW, Server, run, ts


def test_services_of_a_bundle() -> None:
    keys = ["flags/checkout/new-ui", "flags/global/checkout.mode", "shedding/search", "pins/a"]
    assert key_services(keys) == (["a", "checkout", "search"], True)
    assert key_services(["flags/global/kill"]) == ([], True)
    changes: list[dict[str, Any]] = [
        {"set_flag": {"scope": "global", "name": "x"}, "clear_flag": None},
        {"set_shedding": {"service": "search", "percent": 30}},
        {"unpin_version": {"service": "payments"}},
    ]
    assert change_services(changes) == (["payments", "search"], True)


def _bundle(**fields: Any) -> mitigation_pb2.Bundle:
    return mitigation_pb2.Bundle(
        id="20261126-164500-degrade-checkout-3fa2",
        name="degrade-checkout",
        meta=types_pb2.Meta(
            actor="sre-1", reason="payment provider timeouts", incident="INC-42",
            set_at=ts(NOW - timedelta(minutes=45)),
        ),
        revision=812,
        changes=[
            mitigation_pb2.BundleChange(
                set_flag=mitigation_pb2.SetFlagRequest(
                    scope="checkout", name="new-ui", value=types_pb2.FlagValue(bool_value=False)
                )
            ),
            mitigation_pb2.BundleChange(
                set_shedding=mitigation_pb2.SetSheddingRequest(service="checkout", percent=30)
            ),
            mitigation_pb2.BundleChange(
                pin_version=mitigation_pb2.PinVersionRequest(service="checkout", version="v1.4.2")
            ),
            mitigation_pb2.BundleChange(
                clear_flag=mitigation_pb2.ClearFlagRequest(
                    scope="global", name="x", all_layers=True
                )
            ),
            mitigation_pb2.BundleChange(
                clear_shedding=mitigation_pb2.ClearSheddingRequest(service="search")
            ),
            mitigation_pb2.BundleChange(
                unpin_version=mitigation_pb2.UnpinVersionRequest(service="payments")
            ),
        ],
        keys=["flags/checkout/new-ui", "shedding/checkout", "pins/checkout"],
        **fields,
    )  # fmt: skip


def test_bundle_get_shows_state_changes_and_who_why_when() -> None:
    overridden = _bundle(
        state=mitigation_pb2.PARTIALLY_OVERRIDDEN, overridden_keys=["shedding/checkout"]
    )
    lines = list(
        render_bundle_get(to_plain(mitigation_pb2.GetBundleResponse(bundle=overridden)), NOW).lines
    )
    assert lines == [
        "bundle 20261126-164500-degrade-checkout-3fa2 (degrade-checkout): partially overridden "
        "(changed since by others: shedding/checkout)",
        "  applied   by sre-1, 2026-11-26T16:45:00Z (45m ago) · rev 812",
        "  reason    payment provider timeouts",
        "  incident  INC-42",
        "  changes:",
        "    checkout: flag new-ui = false",
        "    checkout: shedding SHEDDABLE 30%",
        "    checkout: pin v1.4.2",
        "    global: clear flag x (all layers)",
        "    search: shedding off",
        "    payments: unpin",
        "  keys      flags/checkout/new-ui, shedding/checkout, pins/checkout",
    ]  # fmt: skip
    reverted = _bundle(
        state=mitigation_pb2.REVERTED,
        reverted=types_pb2.Meta(
            actor="sre-2", reason="recovered", set_at=ts(NOW - timedelta(minutes=5))
        ),
    )
    doc = to_plain(mitigation_pb2.GetBundleResponse(bundle=reverted))
    text = list(render_bundle_get(doc, NOW).lines)
    assert text[0].endswith(": reverted")
    assert "  reverted  by sre-2, 2026-11-26T17:25:00Z (5m ago): recovered" in text


@pytest.mark.parametrize(
    ("state", "text"),
    [
        (mitigation_pb2.APPLIED, "applied"),
        (mitigation_pb2.REVERTED, "reverted"),
        (mitigation_pb2.EXPIRED, "expired"),
        (mitigation_pb2.PARTIALLY_OVERRIDDEN, "partially overridden"),
    ],
)
def test_bundle_list_shows_each_state(state: int, text: str) -> None:
    response = mitigation_pb2.ListBundlesResponse(bundles=[_bundle(state=state)])
    header, row = render_bundle_list(to_plain(response), NOW).lines
    assert header.split() == [
        "ID", "STATE", "CHANGES", "APPLIED", "EXPIRES", "ACTOR", "INCIDENT", "REASON",
    ]  # fmt: skip
    assert row.startswith(f"20261126-164500-degrade-checkout-3fa2  {text}  ")
    assert " 6  " in row
    assert render_bundle_list({"bundles": []}, NOW).lines == ["no bundles"]


def test_bundle_apply_and_revert_lines() -> None:
    summary = "bundle degrade-checkout: checkout: flag new-ui = false (was true); checkout: pin v1"
    applied = mitigation_pb2.ApplyBundleResponse(
        result=types_pb2.WriteResult(changed=True, revision=812, summary=summary),
        bundle=_bundle(state=mitigation_pb2.APPLIED),
    )
    assert list(render_bundle_apply(to_plain(applied), NOW).lines) == [
        "bundle degrade-checkout applied as 20261126-164500-degrade-checkout-3fa2 · rev 812",
        "  checkout: flag new-ui = false (was true)",
        "  checkout: pin v1",
        'revert with: cpctl bundle revert 20261126-164500-degrade-checkout-3fa2 --reason "..."',
    ]
    twin = mitigation_pb2.ApplyBundleResponse(
        result=types_pb2.WriteResult(summary="bundle degrade-checkout is already applied as X")
    )
    assert list(render_bundle_apply(to_plain(twin), NOW).lines) == [
        "bundle degrade-checkout is already applied as X · unchanged"
    ]
    dry = mitigation_pb2.ApplyBundleResponse(
        result=types_pb2.WriteResult(dry_run=True, would_change=True, summary=summary),
        bundle=_bundle(),
    )
    assert render_bundle_apply(to_plain(dry), NOW).lines[0] == (
        "dry run: would apply bundle degrade-checkout · nothing written"
    )
    reverted = mitigation_pb2.RevertBundleResponse(
        result=types_pb2.WriteResult(
            changed=True,
            revision=900,
            summary="bundle degrade-checkout reverted: checkout: shedding removed",
        ),
        bundle=_bundle(state=mitigation_pb2.REVERTED),
        overwritten_keys=["shedding/checkout"],
    )
    rendered = render_bundle_revert(to_plain(reverted), NOW)
    assert list(rendered.lines) == [
        "bundle 20261126-164500-degrade-checkout-3fa2 (degrade-checkout) reverted · rev 900",
        "  checkout: shedding removed",
    ]
    assert list(rendered.warnings) == [
        "warning: --force overwrote changes made after the bundle: shedding/checkout"
    ]


def test_bundle_file_errors_exit_3_before_any_call(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("name: b\nreason: r\nchanges:\n  - shed: {service: checkout}\n")
    result = run("--server", server.address, "bundle", "apply", str(path))
    assert result.exit_code == 3
    assert result.stderr.startswith(f"error: {path}: changes[0].shed: missing percent")
    assert server.servicer.calls == []


def test_bundle_of_global_flags_needs_wait_service(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(
        json.dumps(
            {
                "name": "b",
                "reason": "r",
                "changes": [{"flag": {"scope": "global", "name": "kill", "value": True}}],
            }
        )
    )
    result = run("--server", server.address, "bundle", "apply", str(path), "--wait")
    assert result.exit_code == 2
    assert "this bundle changes only global flags" in result.stderr
    assert "--wait-service S" in result.stderr
    assert server.servicer.calls == []


def test_bundle_revert_needs_a_reason(server: Server) -> None:
    result = run("--server", server.address, "bundle", "revert", "20261126-164500-b-3fa2")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --reason is required")
    assert server.servicer.calls == []


def test_revert_with_wait_of_a_bundle_of_global_flags_needs_wait_service(server: Server) -> None:
    bundle_id = "20261126-164500-kill-3fa2"
    server.servicer.bundles[bundle_id] = mitigation_pb2.Bundle(
        id=bundle_id, name="kill", keys=["flags/global/kill"]
    )
    args = ["--server", server.address, "bundle", "revert", bundle_id, "--reason", "r"]
    result = run(*args, "--wait")
    assert result.exit_code == 2, result.output
    assert "this bundle changed only global flags" in result.stderr
    # Read, not written: the revert was never sent.
    assert server.servicer.calls == ["GetBundle"]
    missing = run(*args[:4], "20261126-164500-gone-3fa2", "--reason", "r", "--wait")
    assert missing.exit_code == 5
