"""A flag's type across scopes, replicas and bundles, driven through `cpctl` as users do."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server import ControlServer
from tests.helpers.cpctl import Run
from tests.helpers.raw_etcd import RawEtcd
from tests.integration.conftest import server_config


@pytest.fixture
async def replica(etcd: EmbeddedEtcd, prefix: str) -> AsyncIterator[ControlServer]:
    """A second server on the same etcd and prefix: what it remembers of keys is its own."""
    srv = ControlServer(server_config(etcd.endpoint, prefix), registry=CollectorRegistry())
    await srv.start()
    yield srv
    await srv.stop(grace=0)


async def test_a_replica_that_saw_a_key_unset_decides_on_what_etcd_holds(
    cpctl: Run, server: ControlServer, replica: ControlServer
) -> None:
    on_b = replica.address
    assert (await cpctl("flag", "set", "global", "k", "false", "--reason", "r")).returncode == 0
    # The test's server writes checkout/k, then clears it: it remembers it unset.
    assert (await cpctl("flag", "set", "checkout", "k", "true", "--reason", "r")).returncode == 0
    assert (await cpctl("flag", "clear", "checkout", "k", "--reason", "r")).returncode == 0
    # The replica gives checkout a string of its own, on purpose.
    meant = await cpctl(
        "flag", "set", "checkout", "k", "lite", "--change-type", "--reason", "r",
        server_list=on_b,
    )  # fmt: skip
    assert meant.returncode == 0, meant.stderr
    # Another string through the first server: checkout's own value is a string now,
    # whatever that server last saw.
    again = await cpctl("--json", "flag", "set", "checkout", "k", "full", "--reason", "r")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["flag"]["value"] == "full"


async def test_a_first_value_of_another_type_is_refused_in_a_bundle_and_noted_when_meant(
    cpctl: Run, raw_etcd: RawEtcd, prefix: str, tmp_path: Path
) -> None:
    assert (await cpctl("flag", "set", "global", "k", "false", "--reason", "r")).returncode == 0
    bundle = tmp_path / "typo.yaml"
    bundle.write_text(
        "name: typo\nreason: r\nchanges:\n"
        "  - shed: {service: checkout, percent: 10}\n"
        "  - flag: {service: checkout, name: k, value: 'Off'}\n"
    )
    refused = await cpctl("bundle", "apply", str(bundle))
    assert refused.returncode == 3, refused.stdout
    # Named as the request names it: the change and its field.
    assert "changes[1].set_flag.value: k is a boolean flag (scope global)" in refused.stderr
    assert "change_type: true in a bundle file" in refused.stderr
    assert await raw_etcd.get(prefix + "flags/checkout/k") is None
    assert await raw_etcd.get(prefix + "shedding/checkout") is None

    # Meant: the summary, and so the audit, says what differs.
    meant = await cpctl(
        "--json", "flag", "set", "checkout", "k", "lite", "--change-type", "--reason", "r"
    )
    assert meant.returncode == 0, meant.stderr
    summary = json.loads(meant.stdout)["result"]["summary"]
    assert summary.endswith("(a string in checkout, where scope global holds a boolean)")
    # The audit keeps both sides: nothing before in checkout, the string after.
    history = json.loads((await cpctl("--json", "history", "--service", "checkout")).stdout)
    (entry,) = [e for e in history["entries"] if e["scope"] == "checkout"]
    assert (entry["before"], entry["after"]["value"]) == (None, "lite")

    # A dry run is refused the same way.
    dry = await cpctl("flag", "set", "payments", "k", "7", "--reason", "r", "--dry-run")
    assert dry.returncode == 3, dry.stdout
    assert "k is a boolean flag (scope global); 7 is not true or false" in dry.stderr


async def test_two_first_values_of_one_flag_in_a_bundle_agree_on_its_type(
    cpctl: Run, raw_etcd: RawEtcd, prefix: str, tmp_path: Path
) -> None:
    """Nothing in etcd yet: the bundle's own changes are what the type is checked against."""

    def bundle(*changes: str) -> Path:
        path = tmp_path / "b.yaml"
        path.write_text("name: b\nreason: r\nchanges:\n" + "".join(f"  - {c}\n" for c in changes))
        return path

    typo = bundle(
        "flag: {scope: global, name: fresh, value: false}",
        "flag: {service: checkout, name: fresh, value: 'flase'}",
    )
    refused = await cpctl("bundle", "apply", str(typo))
    assert refused.returncode == 3, refused.stdout
    assert (
        "changes[0].set_flag.value: this bundle gives fresh two types: false (a boolean) in "
        "global and 'flase' (a string) in checkout: give it one type, or say the difference "
        "is meant (change_type;" in refused.stderr
    ), refused.stderr
    for scope in ("global", "checkout"):
        assert await raw_etcd.get(prefix + f"flags/{scope}/fresh") is None
    # The same with one type everywhere, or a new type said to be meant, is applied.
    agreed = bundle(
        "flag: {scope: global, name: fresh, value: false}",
        "flag: {service: checkout, name: fresh, value: true}",
        "flag: {service: payments, name: mode, value: lite}",
        "flag: {scope: global, name: mode, value: 3, change_type: true}",
    )
    applied = await cpctl("--json", "bundle", "apply", str(agreed))
    assert applied.returncode == 0, applied.stderr
    summary = json.loads(applied.stdout)["result"]["summary"]
    # Both sides of the meant difference say it, and so the audit does.
    assert "a number in global, where scope payments in this bundle holds a string" in summary
    assert "a string in payments, where scope global in this bundle holds a number" in summary
    # Services are free of each other: two services, two types, both first values.
    apart = bundle(
        "flag: {service: search, name: other, value: 1}",
        "flag: {service: checkout, name: other, value: 'x'}",
    )
    assert (await cpctl("bundle", "apply", str(apart))).returncode == 0

    # What the bundle leaves counts: global's kill switch cleared, checkout's string is
    # no other type than anything in force.
    assert (await cpctl("flag", "set", "global", "k2", "true", "--reason", "r")).returncode == 0
    swap = bundle(
        "clear_flag: {scope: global, name: k2}",
        "flag: {service: checkout, name: k2, value: 'lite'}",
    )
    swapped = await cpctl("bundle", "apply", str(swap))
    assert swapped.returncode == 0, swapped.stderr
    # A change_type in one scope that holds a value says nothing of another scope's typo.
    assert (await cpctl("flag", "set", "global", "m", "off", "--reason", "r")).returncode == 0
    excused = bundle(
        "flag: {scope: global, name: m, value: true, change_type: true}",
        "flag: {service: checkout, name: m, value: 'flase'}",
    )
    refused_typo = await cpctl("bundle", "apply", str(excused))
    assert refused_typo.returncode == 3, refused_typo.stdout
    assert "changes[1].set_flag.value: m is a boolean flag (scope global)" in refused_typo.stderr
    assert await raw_etcd.get(prefix + "flags/checkout/m") is None
