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
