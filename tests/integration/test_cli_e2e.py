"""The real `cpctl` entry point against a real server and etcd."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from controlplane.cli._output import JSON_SHAPES
from controlplane.embedded_etcd import EmbeddedEtcd, free_port
from controlplane.server import ControlServer
from tests.helpers.cpctl import CPCTL, Run, clean_env
from tests.helpers.raw_agent import RawAgent
from tests.helpers.raw_etcd import RawEtcd
from tests.integration.conftest import server_config


async def test_the_readme_commands(cpctl: Run, raw_etcd: RawEtcd, prefix: str) -> None:
    out = await cpctl(
        "flag",
        "set",
        "checkout",
        "new-ui",
        "false",
        "--reason",
        "errors on /pay",
        "--incident",
        "INC-42",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("checkout: flag new-ui = false")

    got = await cpctl("--json", "flag", "get", "checkout", "new-ui")
    assert got.returncode == 0, got.stderr
    doc = json.loads(got.stdout)
    assert doc["flag"]["value"] is False
    assert doc["flag"]["meta"]["incident"] == "INC-42"
    assert doc["flag"]["meta"]["actor"] == "oncall"

    shed = await cpctl(
        "shed", "set", "checkout", "50", "--tier", "SHEDDABLE_PLUS", "--reason", "overload"
    )
    assert shed.returncode == 0, shed.stderr
    pin = await cpctl("pin", "set", "checkout", "v1.4.2", "--reason", "bad deploy")
    assert pin.returncode == 0, pin.stderr

    history = await cpctl("--json", "history", "--incident", "INC-42")
    assert history.returncode == 0, history.stderr
    entries = json.loads(history.stdout)["entries"]
    assert [(e["action"], e["scope"], e["name"]) for e in entries] == [
        ("flag.set", "checkout", "new-ui")
    ]

    stored = await raw_etcd.get_prefix(prefix)
    kinds = sorted(json.loads(v)["kind"] for v in stored.values())
    assert kinds == ["audit", "audit", "audit", "flag", "pin", "shedding"]


async def test_shed_150_is_a_clear_error_and_writes_nothing(
    cpctl: Run, raw_etcd: RawEtcd, prefix: str
) -> None:
    revision = await raw_etcd.revision()
    out = await cpctl("shed", "set", "checkout", "150", "--reason", "overload")
    assert out.returncode == 3
    assert "150" in out.stderr and "100" in out.stderr
    assert out.stdout == ""
    assert await raw_etcd.revision() == revision
    assert await raw_etcd.get_prefix(prefix) == {}


async def test_dry_run_writes_nothing(cpctl: Run, raw_etcd: RawEtcd) -> None:
    revision = await raw_etcd.revision()
    out = await cpctl(
        "--json", "flag", "set", "global", "new-ui", "false", "--reason", "x", "--dry-run"
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["result"]["dry_run"] is True
    assert await raw_etcd.revision() == revision


async def test_exit_codes_for_each_kind_of_failure(cpctl: Run) -> None:
    async def code(*args: str) -> int:
        return (await cpctl(*args)).returncode

    assert await code("flag", "set", "checkout", "x", "true") == 2  # no --reason
    assert await code("flag", "set", "Checkout", "x", "true", "--reason", "r") == 3
    assert await code("flag", "get", "checkout", "missing") == 5
    created = await cpctl("--json", "flag", "set", "checkout", "x", "true", "--reason", "r")
    rev = json.loads(created.stdout)["result"]["mod_revision"]
    conflict = await cpctl(
        "--json",
        "flag",
        "set",
        "checkout",
        "x",
        "false",
        "--reason",
        "r",
        "--expect-revision",
        str(rev - 1),
    )
    assert conflict.returncode == 4
    error = json.loads(conflict.stderr)["error"]
    assert error["code"] == "ABORTED"
    assert f"current mod revision {rev}" in error["message"]
    assert await code("rollback", "checkout", "--reason", "r") == 11
    unchanged = await cpctl("flag", "set", "checkout", "x", "true", "--reason", "re-run")
    assert unchanged.returncode == 0
    assert "unchanged" in unchanged.stdout
    boxed = await cpctl("flag", "set", "checkout", "x", "false", "--reason", "r", "--ttl", "30m")
    assert boxed.returncode == 0, boxed.stderr
    assert "expires" in boxed.stdout


async def test_server_list_falls_over_to_the_next_server(cpctl: Run, server: ControlServer) -> None:
    down = f"127.0.0.1:{free_port()}"
    out = await cpctl(
        "flag",
        "set",
        "global",
        "kill",
        "true",
        "--reason",
        "r",
        server_list=f"{down},{server.address}",
    )
    assert out.returncode == 0, out.stderr
    nobody = await cpctl("flag", "list", server_list=down)
    assert nobody.returncode == 6
    assert "no server reachable" in nobody.stderr


@pytest.fixture
async def server_on_fresh_etcd(fresh_etcd: EmbeddedEtcd) -> AsyncIterator[ControlServer]:
    """A second server, on an etcd of the test's own that the test may stop."""
    config = server_config(fresh_etcd.endpoint, "/controlplane/v1/", etcd_timeout=1.0)
    srv = ControlServer(config, registry=CollectorRegistry())
    await srv.start()
    yield srv
    await srv.stop(grace=0)


@pytest.mark.etcd_fault
async def test_write_to_a_server_whose_etcd_is_down_is_not_retried_elsewhere(
    cpctl: Run,
    server: ControlServer,
    server_on_fresh_etcd: ControlServer,
    fresh_etcd: EmbeddedEtcd,
    raw_etcd: RawEtcd,
    prefix: str,
) -> None:
    fresh_etcd.stop()
    servers = f"{server_on_fresh_etcd.address},{server.address}"
    out = await cpctl("flag", "set", "global", "kill", "true", "--reason", "r", server_list=servers)
    assert out.returncode == 6, out.stderr
    assert "etcd is unreachable" in out.stderr
    assert "may or may not have been applied" in out.stderr
    # The next server in the list was not asked: nothing under its prefix.
    assert await raw_etcd.get_prefix(prefix) == {}


# ---- status, --wait, bundles, watch (agents are raw Sync streams) ----


async def connected(agent: RawAgent) -> RawAgent:
    """The agent once the server registered it (its first response, the snapshot, came)."""
    await agent.next()
    return agent


async def test_status_shows_mitigations_instances_and_drift(
    cpctl: Run, server: ControlServer
) -> None:
    flag = await cpctl(
        "flag", "set", "checkout", "new-ui", "false", "--reason", "errors", "--ttl", "30m"
    )
    assert flag.returncode == 0, flag.stderr
    global_flag = await cpctl(
        "flag", "set", "global", "checkout.mode", "read-only", "--reason", "r"
    )
    assert global_flag.returncode == 0, global_flag.stderr
    async with (
        RawAgent(server.address, "checkout", "checkout-1", version="v1.4.2") as one,
        RawAgent(server.address, "checkout", "checkout-2", version="v1.5.0") as two,
    ):
        await connected(one)
        await connected(two)
        pinned = await cpctl("pin", "set", "checkout", "v1.4.2", "--reason", "bad deploy", "--wait")
        assert pinned.returncode == 0, pinned.stderr
        assert "checkout: applied by 2/2 instances in " in pinned.stdout
        pin_revision = int(re.findall(r"rev (\d+)", pinned.stdout)[0])

        human = await cpctl("status", "checkout")
        assert human.returncode == 0, human.stderr
        lines = human.stdout.splitlines()
        assert lines[0].startswith("checkout · revision ")
        assert lines[0].endswith("2 of 2 instance(s) connected")
        new_ui = next(line for line in lines if line.strip().startswith("new-ui"))
        # Rounded to the nearest minute: a few seconds after a 30m write, "in 30m".
        assert "checkout (own)" in new_ui and re.search(r"\(in (30|29)m\)", new_ui)
        mode = next(line for line in lines if line.strip().startswith("checkout.mode"))
        assert '"read-only"' in mode and "global" in mode
        assert "pin: v1.4.2" in lines
        row_one = next(line for line in lines if line.startswith("checkout-1"))
        row_two = next(line for line in lines if line.startswith("checkout-2"))
        assert row_one.split()[2:6] == ["yes", str(pin_revision), "0", "v1.4.2"]
        assert "DRIFT" not in row_one
        assert row_two.split()[2:6] == ["yes", str(pin_revision), "0", "v1.5.0"]
        assert "DRIFT: pinned v1.4.2" in row_two
        assert "drift: 1 instance(s) run v1.5.0, not the pinned v1.4.2" in lines
        assert "no connected instances" not in human.stdout

        out = await cpctl("--json", "status", "checkout")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert list(doc) == [
            "service", "revision", "flags", "shedding", "pin", "instances", "drift",
            "last_contact", "unknown", "sync_clients", "stale", "stale_after",
        ]  # fmt: skip
        assert doc["last_contact"] is not None and doc["unknown"] is None
        assert doc["drift"] == {"v1.5.0": 1}
        assert doc["pin"]["version"] == "v1.4.2"
        assert doc["shedding"] is None
        assert {(f["scope"], f["name"], f["value"]) for f in doc["flags"]} == {
            ("checkout", "new-ui", False),
            ("global", "checkout.mode", "read-only"),
        }
        flags = {f["scope"]: f for f in doc["flags"]}
        assert flags["checkout"]["meta"]["expires_at"] is not None
        assert flags["global"]["meta"]["expires_at"] is None
        instances = {i["instance_id"]: i for i in doc["instances"]}
        assert set(instances) == {"checkout-1", "checkout-2"}
        assert instances["checkout-2"]["running_version"] == "v1.5.0"
        assert all(i["connected"] and i["lag"] == 0 for i in instances.values())
        assert all(i["applied_revision"] == pin_revision for i in instances.values())


async def test_status_with_no_connected_instance_says_so_and_exits_0(cpctl: Run) -> None:
    out = await cpctl("status", "checkout")
    assert out.returncode == 0, out.stderr
    assert "0 of 0 instance(s) connected" in out.stdout
    assert "no connected instances: nothing applies these mitigations" in out.stdout
    doc = json.loads((await cpctl("--json", "status", "checkout")).stdout)
    assert doc["instances"] == [] and doc["pin"] is None


async def test_wait_until_every_instance_applied_the_change(
    cpctl: Run, server: ControlServer
) -> None:
    async with (
        RawAgent(server.address, "checkout", "checkout-1") as one,
        RawAgent(server.address, "checkout", "checkout-2") as two,
        RawAgent(server.address, "search", "search-1") as other,
    ):
        for agent in (one, two, other):
            await connected(agent)
        out = await cpctl(
            "--json", "shed", "set", "checkout", "30", "--reason", "overload", "--wait"
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        revision = doc["result"]["revision"]
        wait = doc["wait"]
        assert list(wait) == ["outcome", "revision", "seconds", "services"]
        assert (wait["outcome"], wait["revision"]) == ("applied", revision)
        (checkout,) = wait["services"]
        assert (checkout["service"], checkout["outcome"]) == ("checkout", "applied")
        assert (checkout["connected"], checkout["applied"]) == (2, 2)
        assert checkout["all_applied"] is True and checkout["pending"] == []
        # The agents really had it: each received the change of that revision.
        for agent in (one, two):
            assert (await agent.until_revision(revision)).change.revision == revision

        # A global flag reaches every service: --wait-service names the ones to wait for.
        human = await cpctl(
            "flag", "set", "global", "kill", "true", "--reason", "r",
            "--wait-service", "checkout", "--wait-service", "search",
        )  # fmt: skip
        assert human.returncode == 0, human.stderr
        assert re.search(r"^checkout: applied by 2/2 instances in \d+\.\d\d s$", human.stdout, re.M)
        assert re.search(r"^search: applied by 1/1 instances in \d+\.\d\d s$", human.stdout, re.M)

        # Re-run: unchanged, and --wait still answers whether it is applied everywhere.
        again = await cpctl("--json", "shed", "set", "checkout", "30", "--reason", "r", "--wait")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["wait"]["outcome"] == "applied"


async def test_wait_for_a_global_flag_needs_a_service(cpctl: Run, raw_etcd: RawEtcd) -> None:
    revision = await raw_etcd.revision()
    out = await cpctl("flag", "set", "global", "kill", "true", "--reason", "r", "--wait")
    assert out.returncode == 2
    assert "--wait needs a service scope; for a global flag name the service with " in out.stderr
    assert "--wait-service S" in out.stderr
    assert await raw_etcd.revision() == revision


async def test_wait_times_out_when_an_instance_does_not_apply_it(
    cpctl: Run, server: ControlServer
) -> None:
    async with (
        RawAgent(server.address, "checkout", "checkout-1") as fast,
        RawAgent(server.address, "checkout", "checkout-stuck", auto_ack=False) as stuck,
    ):
        await connected(fast)
        await connected(stuck)
        out = await cpctl(
            "pin", "set", "checkout", "v1.4.2", "--reason", "bad deploy",
            "--wait", "--wait-timeout", "1s",
        )  # fmt: skip
        assert out.returncode == 8, out.stderr
        assert out.stdout.startswith("checkout: pinned to v1.4.2 (was unpinned) · rev ")
        error = out.stderr.splitlines()[0]
        assert error.startswith("error: --wait: checkout: applied by only 1/2 instances within ")
        assert "pending: checkout-stuck (at rev 0)" in error
        assert "checkout-1" not in error
        assert "the change is written" in out.stderr

        doc_out = await cpctl(
            "--json", "pin", "set", "checkout", "v1.4.3", "--reason", "r", "--wait-timeout", "1s"
        )
        assert doc_out.returncode == 8
        wait = json.loads(doc_out.stdout)["wait"]
        assert wait["outcome"] == "timed_out"
        (checkout,) = wait["services"]
        assert [p["instance_id"] for p in checkout["pending"]] == ["checkout-stuck"]
        assert (checkout["connected"], checkout["applied"], checkout["all_applied"]) == (
            2,
            1,
            False,
        )
        error_doc = json.loads(doc_out.stderr)["error"]
        assert (error_doc["code"], error_doc["exit_code"]) == ("WAIT_TIMEOUT", 8)


async def test_wait_with_no_connected_instance_exits_9_and_the_change_is_written(
    cpctl: Run, raw_etcd: RawEtcd, prefix: str
) -> None:
    out = await cpctl("shed", "set", "chekout", "30", "--reason", "overload", "--wait")
    assert out.returncode == 9, out.stderr
    assert "chekout: no connected instance" in out.stderr
    assert "is the service name right?" in out.stderr
    assert await raw_etcd.get(prefix + "shedding/chekout") is not None
    doc = await cpctl("--json", "shed", "set", "chekout", "40", "--reason", "r", "--wait")
    assert doc.returncode == 9
    assert json.loads(doc.stdout)["wait"]["outcome"] == "no_instances"
    assert json.loads(doc.stderr)["error"]["code"] == "WAIT_NO_INSTANCES"


async def test_wait_reports_an_instance_that_rejected_the_change(
    cpctl: Run, server: ControlServer
) -> None:
    async with (
        RawAgent(server.address, "checkout", "checkout-1") as good,
        RawAgent(server.address, "checkout", "checkout-2", auto_ack=False) as picky,
    ):
        await connected(good)
        await connected(picky)
        run = asyncio.create_task(
            cpctl("flag", "set", "checkout", "limits", '{"rps": -1}', "--reason", "r", "--wait")
        )
        change = (await picky.next()).change
        assert [f.name for f in change.flags_set] == ["limits"]
        await picky.ack(change.revision, rejected="limits.rps must be positive")
        out = await run
        assert out.returncode == 10, out.stderr
        error = out.stderr.splitlines()[0]
        assert error.startswith("error: --wait: checkout: rejected by 1 of 2 instance(s): ")
        assert "checkout-2 (limits.rps must be positive)" in error
        assert "checkout-1" not in error


BUNDLE = """\
name: degrade-checkout
reason: payment provider timeouts
incident: INC-42
ttl: 30m
changes:
  - flag: {service: checkout, name: new-ui, value: false}
  - shed: {service: checkout, percent: 30, tier: SHEDDABLE_PLUS}
  - pin: {service: checkout, version: v1.4.2}
"""


async def test_bundle_applied_from_a_file_then_reverted(
    cpctl: Run, server: ControlServer, raw_etcd: RawEtcd, prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "degrade-checkout.yaml"
    path.write_text(BUNDLE, encoding="utf-8")
    revision = await raw_etcd.revision()
    dry = await cpctl("bundle", "apply", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("dry run: would apply bundle degrade-checkout")
    assert await raw_etcd.revision() == revision

    async with RawAgent(server.address, "checkout", "checkout-1") as agent:
        await connected(agent)
        applied = await cpctl("--json", "bundle", "apply", str(path), "--wait")
        assert applied.returncode == 0, applied.stderr
        doc = json.loads(applied.stdout)
        bundle = doc["bundle"]
        assert bundle["state"] == "APPLIED"
        assert bundle["meta"]["reason"] == "payment provider timeouts"
        assert bundle["meta"]["incident"] == "INC-42"
        assert bundle["meta"]["expires_at"] is not None
        assert sorted(bundle["keys"]) == [
            "flags/checkout/new-ui",
            "pins/checkout",
            "shedding/checkout",
        ]
        assert doc["wait"]["outcome"] == "applied"
        assert [s["service"] for s in doc["wait"]["services"]] == ["checkout"]
        assert (await agent.until_revision(doc["result"]["revision"])).HasField("change")
        for key in bundle["keys"]:
            stored = await raw_etcd.get(prefix + key)
            assert stored is not None
            assert json.loads(stored[0])["meta"]["bundle_id"] == bundle["id"]

        listed = await cpctl("bundle", "list")
        assert listed.returncode == 0, listed.stderr
        row = listed.stdout.splitlines()[1].split()
        assert row[:3] == [bundle["id"], "applied", "3"]
        got = await cpctl("bundle", "get", bundle["id"])
        assert got.returncode == 0, got.stderr
        assert got.stdout.splitlines()[0] == f"bundle {bundle['id']} (degrade-checkout): applied"
        assert "    checkout: shedding SHEDDABLE_PLUS 30%" in got.stdout.splitlines()

        missing_reason = await cpctl("bundle", "revert", bundle["id"])
        assert missing_reason.returncode == 2
        reverted = await cpctl(
            "bundle", "revert", bundle["id"], "--reason", "provider recovered", "--wait"
        )
        assert reverted.returncode == 0, reverted.stderr
        lines = reverted.stdout.splitlines()
        assert lines[0].startswith(f"bundle {bundle['id']} (degrade-checkout) reverted · rev ")
        revert_revision = int(lines[0].rsplit(" ", 1)[1])
        assert re.fullmatch(r"checkout: applied by 1/1 instances in \d+\.\d\d s", lines[-1])
        change = (await agent.until_revision(revert_revision)).change
        assert (change.shedding_removed, change.pin_removed) == (True, True)
    for key in bundle["keys"]:
        assert await raw_etcd.get(prefix + key) is None
    state = json.loads((await cpctl("--json", "bundle", "get", bundle["id"])).stdout)["bundle"]
    assert state["state"] == "REVERTED"
    assert state["reverted"]["reason"] == "provider recovered"
    again = await cpctl("bundle", "revert", bundle["id"], "--reason", "again")
    assert again.returncode == 0, again.stderr
    assert again.stdout.rstrip().endswith("· unchanged")


async def test_bundle_revert_is_refused_after_a_colleague_changed_a_key_then_forced(
    cpctl: Run, raw_etcd: RawEtcd, prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "degrade-checkout.yaml"
    path.write_text(BUNDLE, encoding="utf-8")
    applied = await cpctl("--json", "bundle", "apply", str(path), "--incident", "INC-43")
    assert applied.returncode == 0, applied.stderr
    bundle = json.loads(applied.stdout)["bundle"]
    assert bundle["meta"]["incident"] == "INC-43"
    colleague = await cpctl("shed", "set", "checkout", "80", "--reason", "worse")
    assert colleague.returncode == 0, colleague.stderr

    got = await cpctl("bundle", "get", bundle["id"])
    assert "partially overridden (changed since by others: shedding/checkout)" in got.stdout
    revision = await raw_etcd.revision()
    refused = await cpctl("bundle", "revert", bundle["id"], "--reason", "recovered")
    assert refused.returncode == 4, refused.stderr
    assert "shedding/checkout" in refused.stderr
    assert "--force reverts anyway" in refused.stderr
    assert await raw_etcd.revision() == revision

    forced = await cpctl("bundle", "revert", bundle["id"], "--reason", "recovered", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "--force overwrote changes made after the bundle: shedding/checkout" in forced.stderr
    assert await raw_etcd.get(prefix + "shedding/checkout") is None


async def test_bad_bundle_file_exits_3_naming_the_change(
    cpctl: Run, raw_etcd: RawEtcd, tmp_path: Path
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BUNDLE.replace("percent: 30", "percent: 150"), encoding="utf-8")
    revision = await raw_etcd.revision()
    out = await cpctl("bundle", "apply", str(path))
    assert out.returncode == 3
    assert "changes[1].shed.percent" in out.stderr and "150" in out.stderr
    missing = await cpctl("--json", "bundle", "apply", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 3
    assert "cannot read it" in json.loads(missing.stderr)["error"]["message"]
    assert await raw_etcd.revision() == revision


class Watch:
    """A running `cpctl watch`: lines as they come, stopped with SIGINT (Ctrl-C)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, address: str, *args: str, token: str | None = None) -> Watch:
        env = clean_env()
        if token is not None:
            env["CPCTL_TOKEN"] = token
        proc = await asyncio.create_subprocess_exec(
            str(CPCTL), "--server", address, *args,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        return cls(proc)

    async def line(self, stream: asyncio.StreamReader | None) -> str:
        assert stream is not None
        raw = await asyncio.wait_for(stream.readline(), 10)
        assert raw, "the watch ended"
        return raw.decode().rstrip("\n")

    async def stop(self) -> tuple[int, str, str]:
        """Ctrl-C; the exit code and what was left on stdout and stderr."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        stdout, stderr = await asyncio.wait_for(self.proc.communicate(), 10)
        assert self.proc.returncode is not None
        return self.proc.returncode, stdout.decode(), stderr.decode()


async def test_watch_json_streams_changes_made_while_it_runs(
    cpctl: Run, server: ControlServer
) -> None:
    watch = await Watch.start(server.address, "--json", "watch", "checkout")
    try:
        live = json.loads(await watch.line(watch.proc.stderr))
        assert live["watching"]["service"] == "checkout"
        start = live["watching"]["revision"]
        made = [
            await cpctl("flag", "set", "checkout", "new-ui", "false", "--reason", "errors",
                        "--incident", "INC-42"),
            await cpctl("shed", "set", "search", "50", "--reason", "not checkout's"),
            await cpctl("flag", "set", "global", "kill", "true", "--reason", "everyone"),
        ]  # fmt: skip
        assert all(out.returncode == 0 for out in made), [out.stderr for out in made]
        first = json.loads(await watch.line(watch.proc.stdout))
        second = json.loads(await watch.line(watch.proc.stdout))
    finally:
        code, rest, errors = await watch.stop()
    assert first["revision"] > start
    assert (first["action"], first["scope"], first["name"]) == ("flag.set", "checkout", "new-ui")
    assert (first["before"], first["after"]["value"]) == (None, False)
    assert (first["actor"], first["reason"], first["incident"]) == ("oncall", "errors", "INC-42")
    assert list(first) == list(JSON_SHAPES["AuditEntry"])
    # search's change is not checkout's; the global one is.
    assert (second["action"], second["scope"], second["name"]) == ("flag.set", "global", "kill")
    assert second["revision"] > first["revision"]
    assert rest == ""
    assert code == 130
    assert errors == ""


async def test_watch_prints_one_line_per_change_and_ctrl_c_exits_130_quietly(
    cpctl: Run, server: ControlServer
) -> None:
    watch = await Watch.start(server.address, "watch")
    try:
        note = await watch.line(watch.proc.stderr)
        assert re.fullmatch(r"watching every service from revision \d+ \(Ctrl-C to stop\)", note)
        out = await cpctl("shed", "set", "search", "50", "--reason", "overload now")
        assert out.returncode == 0, out.stderr
        line = await watch.line(watch.proc.stdout)
    finally:
        code, rest, errors = await watch.stop()
    assert re.fullmatch(
        r"\S+Z  rev \d+  shedding\.set  search  off -> SHEDDABLE 50%  by oncall  \"overload now\"",
        line,
    ), line
    assert (code, rest, errors) == (130, "", "")


async def test_a_typo_never_turns_a_kill_switch_into_a_string(
    cpctl: Run, raw_etcd: RawEtcd, prefix: str, tmp_path: Path
) -> None:
    assert (
        await cpctl("flag", "set", "checkout", "new-ui", "true", "--reason", "r")
    ).returncode == 0
    before = await raw_etcd.get(prefix + "flags/checkout/new-ui")
    # The tired engineer's typo: refused, exit 3, nothing written.
    typo = await cpctl("flag", "set", "checkout", "new-ui", "flase", "--reason", "kill it")
    assert typo.returncode == 3, typo.stdout
    assert "new-ui is a boolean flag; 'flase' is not true or false but a string" in typo.stderr
    assert "--change-type" in typo.stderr
    assert await raw_etcd.get(prefix + "flags/checkout/new-ui") == before
    # Booleans are true/false in any case, spaces around them aside.
    spaced = await cpctl("flag", "set", "checkout", "new-ui", " False ", "--reason", "kill it")
    assert spaced.returncode == 0, spaced.stderr
    # A bundle follows the same rule.
    path = tmp_path / "typo.yaml"
    path.write_text(
        "name: typo\nreason: r\nchanges:\n"
        "  - flag: {service: checkout, name: new-ui, value: 'off'}\n"
    )
    bundle = await cpctl("bundle", "apply", str(path))
    assert bundle.returncode == 3, bundle.stdout
    assert "is a boolean flag" in bundle.stderr
    # A change of type on purpose is written, and the audit says so.
    meant = await cpctl(
        "--json", "flag", "set", "checkout", "new-ui", "off", "--change-type", "--reason", "r"
    )
    assert meant.returncode == 0, meant.stderr
    assert "type changed from boolean to string" in json.loads(meant.stdout)["result"]["summary"]
    # A service's first entry takes the type the flag has globally: its own entry would
    # win over the global kill switch.
    killed = await cpctl("flag", "set", "global", "pay-v2", "false", "--reason", "r")
    assert killed.returncode == 0, killed.stderr
    stray = await cpctl("flag", "set", "payments", "pay-v2", "Off", "--reason", "kill it")
    assert stray.returncode == 3, stray.stdout
    assert "pay-v2 is a boolean flag (scope global); 'Off' is not true or false" in stray.stderr
    assert await raw_etcd.get(prefix + "flags/payments/pay-v2") is None
    # And a new global value takes the type the services hold.
    lone = await cpctl("flag", "set", "payments", "tier", "gold", "--reason", "r")
    assert lone.returncode == 0, lone.stderr
    clash = await cpctl("flag", "set", "global", "tier", "true", "--reason", "r")
    assert clash.returncode == 3, clash.stdout
    assert "tier is a string flag (scope payments)" in clash.stderr
