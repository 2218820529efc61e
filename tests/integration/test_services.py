"""A service nobody runs is suspicious: writes, dry runs and status say so, `cpctl services`
lists what is known, and --wait answers "is it applied everywhere" also when unchanged."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from controlplane import model
from controlplane.server import ControlServer
from controlplane.store import keys
from tests.helpers.cpctl import Run
from tests.helpers.raw_agent import RawAgent
from tests.helpers.raw_etcd import RawEtcd
from tests.integration.test_cli_e2e import connected


async def _gone(server: ControlServer, service: str) -> None:
    """Until the server has seen every instance of ``service`` leave."""
    assert server.presence is not None
    while server.presence.local(service):
        await server.presence.changed(service)


async def test_a_mistyped_service_is_named_with_the_closest_known_ones(
    cpctl: Run, server: ControlServer, raw_etcd: RawEtcd, prefix: str
) -> None:
    async with RawAgent(server.address, "checkout", "checkout-1") as agent:
        await connected(agent)
        # A write to the service its agents run: no warning.
        ok = await cpctl("flag", "set", "checkout", "new-ui", "false", "--reason", "r")
        assert ok.returncode == 0, ok.stderr
        assert "warning" not in ok.stderr

        # The typo: written all the same (a kill switch may be staged before a service
        # ships), but said, with the closest known name.
        typo = await cpctl("flag", "set", "chekout", "new-ui", "false", "--reason", "r")
        assert typo.returncode == 0, typo.stderr
        assert (
            "warning: no agent of service chekout has connected in the last 30d; did you mean "
            "checkout? (`cpctl services` lists the services known)"
        ) in typo.stderr
        assert await raw_etcd.get(prefix + "flags/chekout/new-ui") is not None
        doc = json.loads(
            (
                await cpctl("--json", "shed", "set", "chekout", "50", "--reason", "r", "--dry-run")
            ).stdout
        )
        (unknown,) = doc["result"]["unknown_services"]
        assert unknown == {
            "service": "chekout",
            "did_you_mean": ["checkout"],
            "memory": 30 * 86400,
        }
        status = await cpctl("status", "chekout")
        assert status.returncode == 0, status.stderr
        assert "no agent of service chekout has connected" in status.stderr
        assert "did you mean checkout?" in status.stderr

        # Re-running the --wait write: unchanged, and still exit 9, since nobody runs it.
        again = await cpctl(
            "--json", "flag", "set", "chekout", "new-ui", "false", "--reason", "r", "--wait"
        )
        assert again.returncode == 9, again.stderr
        wait = json.loads(again.stdout)
        assert wait["result"]["changed"] is False
        assert wait["wait"]["outcome"] == "no_instances"
        # For the real service, an unchanged write waits and finds it applied.
        applied = await cpctl(
            "--json", "flag", "set", "checkout", "new-ui", "false", "--reason", "r", "--wait"
        )
        assert applied.returncode == 0, applied.stderr
        assert json.loads(applied.stdout)["wait"]["outcome"] == "applied"
        # A --wait-service typo: the wait names the closest known service too.
        waited = await cpctl(
            "flag", "set", "global", "new-ui", "false", "--reason", "r",
            "--wait-service", "chekout",
        )  # fmt: skip
        assert waited.returncode == 9, waited.stderr
        assert (
            "chekout: no connected instance to apply it, and no agent of chekout has "
            "connected in the last 30d: did you mean checkout?"
        ) in waited.stderr, waited.stderr
        waited_json = await cpctl(
            "--json", "flag", "set", "global", "new-ui", "false", "--reason", "r",
            "--wait-service", "chekout",
        )  # fmt: skip
        (service_wait,) = json.loads(waited_json.stdout)["wait"]["services"]
        assert service_wait["unknown"]["did_you_mean"] == ["checkout"]

        listed = json.loads((await cpctl("--json", "services")).stdout)
        by_name = {s["service"]: s for s in listed["services"]}
        assert by_name["checkout"]["connected"] == 1
        assert by_name["checkout"]["last_contact"] is not None
        assert by_name["chekout"]["connected"] == 0
        assert by_name["chekout"]["last_contact"] is None
        assert by_name["chekout"]["flags"] == 1
        human = await cpctl("services")
        assert human.returncode == 0, human.stderr
        rows = {line.split()[0]: line for line in human.stdout.splitlines()[1:]}
        assert rows["checkout"].split()[1:3] == ["1", "now"]
        assert rows["chekout"].split()[1:3] == ["0", "never"]
        assert "warning: no agent of chekout has connected in the last 30d" in human.stderr

    # The agent left: its service stays known, with when it was last in contact.
    await _gone(server, "checkout")
    assert server.presence is not None
    await server.presence.flush()
    raw = await raw_etcd.get(keys.seen_key(keys.presence_prefix(prefix), "checkout"))
    assert raw is not None
    left = json.loads((await cpctl("--json", "services")).stdout)
    (checkout,) = [s for s in left["services"] if s["service"] == "checkout"]
    assert checkout["connected"] == 0
    assert checkout["last_contact"] is not None
    quiet = await cpctl("flag", "set", "checkout", "old-ui", "true", "--reason", "r")
    assert "warning" not in quiet.stderr, quiet.stderr
    # Known, with no instance now: the wait says so, and does not call it unknown.
    empty = await cpctl("flag", "set", "checkout", "old-ui", "true", "--reason", "r", "--wait")
    assert empty.returncode == 9, empty.stderr
    assert "checkout: no connected instance to apply it (is the service name" in empty.stderr
    assert "has connected" not in empty.stderr, empty.stderr


async def test_last_contacts_are_forgotten_with_the_audit_trail(
    server: ControlServer, raw_etcd: RawEtcd, prefix: str
) -> None:
    assert server.presence is not None
    async with RawAgent(server.address, "checkout", "checkout-1") as agent:
        await connected(agent)
    await _gone(server, "checkout")
    await server.presence.flush()
    seen = keys.seen_key(keys.presence_prefix(prefix), "checkout")
    assert await raw_etcd.get(seen) is not None
    # Kept while within memory...
    assert await server.presence.prune_seen(model.utcnow() - timedelta(days=30)) == 0
    # ...and forgotten past it.
    assert await server.presence.prune_seen(model.utcnow() + timedelta(seconds=1)) == 1
    assert await raw_etcd.get(seen) is None


async def test_an_unchanged_bundle_waits_for_each_services_own_revision(
    cpctl: Run, server: ControlServer, tmp_path: Path
) -> None:
    async with (
        RawAgent(server.address, "alpha", "a-1") as a,
        RawAgent(server.address, "beta", "b-1") as b,
    ):
        await connected(a)
        await connected(b)
        for service, name in (("alpha", "x"), ("beta", "y")):
            out = await cpctl("flag", "set", service, name, "false", "--reason", "r", "--wait")
            assert out.returncode == 0, out.stderr
        bundle = tmp_path / "both.yaml"
        bundle.write_text(
            "name: both\nreason: r\nchanges:\n"
            "  - flag: {service: alpha, name: x, value: false}\n"
            "  - flag: {service: beta, name: y, value: false}\n"
        )
        # Every change is in force already: alpha's instances never see beta's newer
        # revision, and need not, so each service is waited for at its own.
        again = await cpctl("--json", "bundle", "apply", str(bundle), "--wait")
        assert again.returncode == 0, again.stderr
        doc = json.loads(again.stdout)
        assert doc["result"]["changed"] is False
        since = doc["result"]["in_force_since"]
        assert set(since) == {"alpha", "beta"} and since["alpha"] < since["beta"]
        waited = {s["service"]: s for s in doc["wait"]["services"]}
        assert waited["alpha"]["revision"] == since["alpha"]
        assert waited["beta"]["revision"] == since["beta"]
        assert doc["wait"]["outcome"] == "applied"

        # A clear of what is not set: nothing to apply, but --wait still says whether
        # instances are there.
        unset = await cpctl("flag", "clear", "alpha", "z", "--reason", "r", "--wait")
        assert unset.returncode == 0, unset.stderr
        assert "alpha: applied by 1/1 instances" in unset.stdout
    nobody = await cpctl("flag", "clear", "gamma", "z", "--reason", "r", "--wait")
    assert nobody.returncode == 9, nobody.stderr
    assert (
        "hint: nothing is set there, so there is nothing to apply, but no instance" in nobody.stderr
    )


async def test_a_departure_moves_the_last_contact_and_bad_records_are_skipped(
    cpctl: Run, server: ControlServer, raw_etcd: RawEtcd, prefix: str
) -> None:
    assert server.presence is not None
    seen = keys.seen_key(keys.presence_prefix(prefix), "checkout")
    async with RawAgent(server.address, "checkout", "checkout-1") as agent:
        await connected(agent)
        await server.presence.flush()
        arrived = await raw_etcd.get(seen)
        assert arrived is not None
    await _gone(server, "checkout")
    await server.presence.flush()
    left = await raw_etcd.get(seen)
    assert left is not None
    assert left[1] > arrived[1]  # written again when the last instance left
    assert json.loads(left[0])["last_contact"] >= json.loads(arrived[0])["last_contact"]
    # A record that does not parse is skipped, not fatal.
    await raw_etcd.put(keys.seen_key(keys.presence_prefix(prefix), "broken"), b"{not json")
    listed = await cpctl("--json", "services")
    assert listed.returncode == 0, listed.stderr
    names = [s["service"] for s in json.loads(listed.stdout)["services"]]
    assert "checkout" in names and "broken" not in names
