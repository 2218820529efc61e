"""Bundles on a real server and etcd: one transaction to apply, one to revert."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.bundles import load_bundle_file, parse_bundle
from controlplane.server import ControlServer
from tests.helpers.raw_etcd import RawEtcd

Stub = mitigation_pb2_grpc.MitigationServiceStub

BUNDLE_YAML = """
name: degrade-checkout
reason: payment provider timeouts
incident: INC-42
changes:
  - flag: {service: checkout, name: new-ui, value: false}
  - shed: {service: checkout, percent: 30, tier: SHEDDABLE_PLUS}
  - pin: {service: checkout, version: v1.4.2}
"""


def opts(reason: str = "r", **kw: Any) -> t.WriteOptions:
    return t.WriteOptions(reason=reason, actor="oncall", **kw)


async def audits(raw: RawEtcd, prefix: str) -> list[dict[str, Any]]:
    rows = await raw.get_prefix(prefix + "audit/")
    return [json.loads(v) for _, v in sorted(rows.items())]


async def apply(stub: Stub, text: str = BUNDLE_YAML, **kw: Any) -> m.ApplyBundleResponse:
    response: m.ApplyBundleResponse = await stub.ApplyBundle(
        parse_bundle(text).to_request(actor="runbook", **kw)
    )
    return response


async def test_apply_writes_every_change_in_one_transaction(
    stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    await stub.SetFlag(
        m.SetFlagRequest(
            scope="checkout", name="new-ui", value=t.FlagValue(bool_value=True), options=opts()
        )
    )
    resp = await apply(stub)
    assert resp.result.changed
    bundle = resp.bundle
    assert bundle.state == m.APPLIED
    assert bundle.name == "degrade-checkout"
    assert sorted(bundle.keys) == ["flags/checkout/new-ui", "pins/checkout", "shedding/checkout"]
    revisions = set()
    for key in bundle.keys:
        got = await raw_etcd.get(prefix + key)
        assert got is not None
        revisions.add(got[1])
        assert json.loads(got[0])["meta"]["bundle_id"] == bundle.id
    assert revisions == {resp.result.revision}
    record = await raw_etcd.get(prefix + f"bundles/{bundle.id}")
    assert record is not None and record[1] == resp.result.revision
    stored = json.loads(record[0])
    assert stored["entries"][0]["before"]["value"] is True
    bundle_audits = [a for a in await audits(raw_etcd, prefix) if a["bundle_id"] == bundle.id]
    assert sorted(a["action"] for a in bundle_audits) == ["flag.set", "pin.set", "shedding.set"]
    assert all(a["incident"] == "INC-42" for a in bundle_audits)

    got_bundle = await stub.GetBundle(m.GetBundleRequest(bundle_id=bundle.id))
    assert got_bundle.bundle.changes[1].set_shedding.percent == 30
    assert got_bundle.bundle.changes[0].set_flag.value.bool_value is False
    listed = await stub.ListBundles(m.ListBundlesRequest())
    assert [b.id for b in listed.bundles] == [bundle.id]

    # The same bundle again, still in force: unchanged, the same id, nothing written.
    revision = await raw_etcd.revision()
    again = await apply(stub)
    assert not again.result.changed
    assert again.bundle.id == bundle.id
    assert await raw_etcd.revision() == revision


async def test_revert_restores_what_each_change_replaced_in_one_transaction(
    stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    await stub.SetFlag(
        m.SetFlagRequest(
            scope="checkout", name="new-ui", value=t.FlagValue(bool_value=True), options=opts()
        )
    )
    bundle = (await apply(stub)).bundle
    reverted = await stub.RevertBundle(
        m.RevertBundleRequest(bundle_id=bundle.id, options=opts("recovered"))
    )
    assert reverted.result.changed
    assert reverted.bundle.state == m.REVERTED
    assert reverted.bundle.reverted.reason == "recovered"
    flag = await raw_etcd.get(prefix + "flags/checkout/new-ui")
    assert flag is not None and json.loads(flag[0])["value"] is True
    assert flag[1] == reverted.result.revision
    assert await raw_etcd.get(prefix + "shedding/checkout") is None
    assert await raw_etcd.get(prefix + "pins/checkout") is None
    actions = [
        a["action"] for a in await audits(raw_etcd, prefix) if a["action"].endswith("revert")
    ]
    assert sorted(actions) == ["flag.revert", "pin.revert", "shedding.revert"]

    again = await stub.RevertBundle(m.RevertBundleRequest(bundle_id=bundle.id, options=opts()))
    assert not again.result.changed
    got = await stub.GetBundle(m.GetBundleRequest(bundle_id=bundle.id))
    assert got.bundle.state == m.REVERTED
    # Reverted, so applying the same bundle again applies it anew.
    anew = await apply(stub)
    assert anew.result.changed
    assert anew.bundle.id != bundle.id


async def test_revert_is_refused_after_a_colleague_changed_a_key_then_forced(
    stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    bundle = (await apply(stub)).bundle
    colleague = await stub.SetShedding(
        m.SetSheddingRequest(service="checkout", percent=80, options=opts("worse"))
    )
    got = await stub.GetBundle(m.GetBundleRequest(bundle_id=bundle.id))
    assert got.bundle.state == m.PARTIALLY_OVERRIDDEN
    assert list(got.bundle.overridden_keys) == ["shedding/checkout"]

    revision = await raw_etcd.revision()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RevertBundle(m.RevertBundleRequest(bundle_id=bundle.id, options=opts()))
    assert info.value.code() == grpc.StatusCode.ABORTED
    details = info.value.details() or ""
    assert "shedding/checkout" in details
    assert str(colleague.result.revision) in details
    assert await raw_etcd.revision() == revision

    forced = await stub.RevertBundle(
        m.RevertBundleRequest(bundle_id=bundle.id, force=True, options=opts("roll it all back"))
    )
    assert forced.result.changed
    assert list(forced.overwritten_keys) == ["shedding/checkout"]
    assert await raw_etcd.get(prefix + "shedding/checkout") is None
    forced_audit = [a for a in await audits(raw_etcd, prefix) if a["action"] == "shedding.revert"]
    assert "forced" in forced_audit[0]["reason"]
    assert forced_audit[0]["before"]["percent"] == 80


async def test_bad_bundles_are_refused_with_nothing_written(
    stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    too_many = m.ApplyBundleRequest(
        name="big",
        changes=[
            m.BundleChange(
                set_flag=m.SetFlagRequest(
                    scope="checkout", name=f"f{i}", value=t.FlagValue(bool_value=False)
                )
            )
            for i in range(32)
        ],
        options=opts(),
    )
    twice = m.ApplyBundleRequest(
        name="twice",
        changes=[
            m.BundleChange(pin_version=m.PinVersionRequest(service="checkout", version="v1")),
            m.BundleChange(pin_version=m.PinVersionRequest(service="checkout", version="v2")),
        ],
        options=opts(),
    )
    bad_percent = m.ApplyBundleRequest(
        name="bad",
        changes=[
            m.BundleChange(pin_version=m.PinVersionRequest(service="checkout", version="v1")),
            m.BundleChange(set_shedding=m.SetSheddingRequest(service="checkout", percent=150)),
        ],
        options=opts(),
    )
    clear_with_ttl = m.ApplyBundleRequest(
        name="ttl",
        changes=[m.BundleChange(clear_shedding=m.ClearSheddingRequest(service="checkout"))],
        options=opts(ttl={"seconds": 60}),
    )
    empty = m.ApplyBundleRequest(name="empty", changes=[m.BundleChange()], options=opts())
    cases = [
        (too_many, "maximum of 31"),
        (twice, "changes[1]"),
        (bad_percent, "changes[1].set_shedding.percent"),
        (clear_with_ttl, "changes[0].clear_shedding"),
        (empty, "changes[0]"),
        (m.ApplyBundleRequest(name="Bad Name", options=opts()), "name"),
    ]
    revision = await raw_etcd.revision()
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ApplyBundle(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in (info.value.details() or ""), (field, info.value.details())
    assert await raw_etcd.revision() == revision
    assert await raw_etcd.get_prefix(prefix) == {}

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RevertBundle(
            m.RevertBundleRequest(bundle_id="20260101-000000-nope-abcd", options=opts())
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetBundle(m.GetBundleRequest(bundle_id="../flags"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_dry_run_bundle_writes_nothing(stub: Stub, raw_etcd: RawEtcd, prefix: str) -> None:
    revision = await raw_etcd.revision()
    dry = await apply(stub, dry_run=True)
    assert dry.result.dry_run and dry.result.would_change and not dry.result.changed
    assert "new-ui = false" in dry.result.summary
    assert await raw_etcd.revision() == revision


async def test_a_time_boxed_bundle_expires_change_by_change_and_then_cannot_be_reverted(
    stub: Stub, raw_etcd: RawEtcd, prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "b.json"
    path.write_text(
        json.dumps(
            {
                "name": "short",
                "reason": "try it",
                "ttl": "1s",
                "changes": [
                    {"flag": {"scope": "global", "name": "x", "value": 1}},
                    {"shed": {"service": "checkout", "percent": 5}},
                ],
            }
        )
    )
    bundle = (await stub.ApplyBundle(load_bundle_file(path).to_request())).bundle
    assert bundle.meta.HasField("expires_at")
    deadline = time.monotonic() + 10
    while await raw_etcd.get_prefix(prefix + "flags/") or await raw_etcd.get_prefix(
        prefix + "shedding/"
    ):
        assert time.monotonic() < deadline, "the bundle's changes did not expire"
        await asyncio.sleep(0.05)
    got = await stub.GetBundle(m.GetBundleRequest(bundle_id=bundle.id))
    assert got.bundle.state == m.EXPIRED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RevertBundle(m.RevertBundleRequest(bundle_id=bundle.id, options=opts()))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expired" in (info.value.details() or "")


async def test_an_expired_layer_of_someone_else_leaves_the_bundle_in_force(
    stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    text = BUNDLE_YAML.replace("incident: INC-42", "incident: INC-42\nttl: 10m")
    bundle = (await apply(stub, text)).bundle
    await stub.SetShedding(
        m.SetSheddingRequest(
            service="checkout", percent=90, options=opts(ttl={"nanos": 800_000_000})
        )
    )
    got = await stub.GetBundle(m.GetBundleRequest(bundle_id=bundle.id))
    assert got.bundle.state == m.PARTIALLY_OVERRIDDEN
    deadline = time.monotonic() + 10
    while True:
        shed = await raw_etcd.get(prefix + "shedding/checkout")
        if shed is not None and json.loads(shed[0])["percent"] == 30:
            break
        assert time.monotonic() < deadline, "the 0.8 s layer did not expire"
        await asyncio.sleep(0.05)
    got = await stub.GetBundle(m.GetBundleRequest(bundle_id=bundle.id))
    assert got.bundle.state == m.APPLIED
    reverted = await stub.RevertBundle(m.RevertBundleRequest(bundle_id=bundle.id, options=opts()))
    assert reverted.result.changed
    assert not reverted.overwritten_keys
    # The bundle's layers had expiry index entries: the revert removed them.
    assert await raw_etcd.get_prefix(prefix + "expiries/") == {}


async def test_a_time_boxed_bundle_applied_again_is_applied_anew(stub: Stub) -> None:
    text = BUNDLE_YAML.replace("incident: INC-42", "incident: INC-42\nttl: 10m")
    first = await apply(stub, text)
    second = await apply(stub, text)
    assert second.result.changed
    assert second.bundle.id != first.bundle.id


async def test_retention_keeps_bundles_in_force(
    server: ControlServer, stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    kept = (await apply(stub)).bundle
    other = BUNDLE_YAML.replace("degrade-checkout", "other").replace("checkout", "search")
    gone = (await apply(stub, other)).bundle
    await stub.RevertBundle(m.RevertBundleRequest(bundle_id=gone.id, options=opts()))
    assert server.store is not None
    # Everything is "older" than a cutoff in the future.
    await server.store.prune_bundles(datetime.now(UTC) + timedelta(days=1))
    assert await raw_etcd.get(prefix + f"bundles/{kept.id}") is not None
    assert await raw_etcd.get(prefix + f"bundles/{gone.id}") is None


async def test_a_change_with_options_of_its_own_is_refused(stub: Stub) -> None:
    request = parse_bundle(BUNDLE_YAML).to_request()
    request.changes[1].set_shedding.options.reason = "mine"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ApplyBundle(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "changes[1].set_shedding.options" in (info.value.details() or "")
