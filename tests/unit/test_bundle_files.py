"""Bundle files: parsing, validation with errors that name the change and field."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from controlplane.api.v1 import types_pb2 as pb
from controlplane.bundles import BundleFileError, load_bundle_file, parse_bundle

GOOD = """
name: degrade-checkout
reason: payment provider timeouts
incident: INC-42
ttl: 30m
changes:
  - flag: {service: checkout, name: new-ui, value: false}
  - flag: {scope: global, name: checkout.mode, value: read-only}
  - flag: {service: checkout, name: limits, value: {rps: 100}}
  - shed: {service: checkout, percent: 30, tier: SHEDDABLE_PLUS}
  - pin: {service: checkout, version: v1.4.2}
"""


def test_a_good_file_becomes_an_apply_request() -> None:
    spec = parse_bundle(GOOD)
    assert spec.name == "degrade-checkout"
    assert spec.ttl == timedelta(minutes=30)
    request = spec.to_request(actor="runbook", dry_run=True)
    assert request.options.reason == "payment provider timeouts"
    assert request.options.incident == "INC-42"
    assert request.options.ttl.seconds == 1800
    assert request.options.dry_run
    kinds = [c.WhichOneof("change") for c in request.changes]
    assert kinds == ["set_flag", "set_flag", "set_flag", "set_shedding", "pin_version"]
    assert request.changes[0].set_flag.value.bool_value is False
    assert request.changes[1].set_flag.scope == "global"
    assert request.changes[2].set_flag.value.json_value == '{"rps": 100}'
    assert request.changes[3].set_shedding.tier == pb.SHEDDABLE_PLUS


def test_json_files_and_clears(tmp_path: Path) -> None:
    path = tmp_path / "undo.json"
    path.write_text(
        '{"name": "undo", "reason": "r", "until": "2030-01-01T00:00Z", "changes": ['
        '{"clear_flag": {"service": "checkout", "name": "x", "all_layers": true}},'
        '{"clear_shed": {"service": "checkout"}}, {"unpin": {"service": "checkout"}}]}'
    )
    spec = load_bundle_file(path)
    assert spec.until is not None and spec.until.year == 2030
    request = spec.to_request()
    assert request.changes[0].clear_flag.all_layers
    assert request.changes[2].unpin_version.service == "checkout"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nreason: r\nchanges: []", "changes must be a non-empty list"),
        ("reason: r\nchanges: [{pin: {service: a, version: v1}}]", "name is required"),
        ("name: x\nchanges: [{pin: {service: a, version: v1}}]", "reason is required"),
        ("name: x\nreason: r\nextra: 1\nchanges: [{pin: {service: a, version: v1}}]", "extra"),
        (
            "name: x\nreason: r\nchanges: [{pin: {service: a, version: v1}}, "
            "{shed: {service: a, percent: 150}}]",
            "changes[1].shed.percent: 150.0 is out of range",
        ),
        (
            "name: x\nreason: r\nchanges: [{shed: {service: a, percent: '5'}}]",
            "changes[0].shed.percent",
        ),
        (
            "name: x\nreason: r\nchanges: [{shed: {service: a, percent: 5, tier: LOW}}]",
            "changes[0].shed.tier",
        ),
        (
            "name: x\nreason: r\nchanges: [{flag: {service: A, name: n, value: 1}}]",
            "changes[0].flag.service",
        ),
        ("name: x\nreason: r\nchanges: [{flag: {name: n, value: 1}}]", "give service or scope"),
        (
            "name: x\nreason: r\nchanges: [{flag: {service: a, name: n, value: [1]}}]",
            "changes[0].flag.value",
        ),
        ("name: x\nreason: r\nchanges: [{flag: {service: a, name: n}}]", "missing value"),
        ("name: x\nreason: r\nchanges: [{nuke: {service: a}}]", "unknown change 'nuke'"),
        ("name: x\nreason: r\nttl: 5\nchanges: [{unpin: {service: a}}]", "ttl"),
        (
            "name: x\nreason: r\nttl: 5m\nuntil: 2030-01-01T00:00Z\n"
            "changes: [{unpin: {service: a}}]",
            "not both",
        ),
        ("name: [x\n", "not valid YAML"),
        ("name: x\nreason: r\nchanges: [{pin: {service: a, version: 1.10}}]", "quote it"),
        ("name: x\nreason: r\nchanges: [{flag: {service: a, name: 7, value: 1}}]", "must be text"),
        ("- just a list", "must be a mapping"),
    ],
)
def test_bad_files_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(BundleFileError) as info:
        parse_bundle(text, source="f.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("f.yaml")


def test_too_many_changes_and_unreadable_files(tmp_path: Path) -> None:
    changes = "".join(f"\n  - flag: {{service: a, name: f{i}, value: true}}" for i in range(32))
    with pytest.raises(BundleFileError, match="maximum of 31"):
        parse_bundle(f"name: x\nreason: r\nchanges:{changes}")
    with pytest.raises(BundleFileError, match="cannot read"):
        load_bundle_file(tmp_path / "missing.yaml")
