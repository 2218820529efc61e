"""Triggers driven as users do: `cpctl trigger`, Alertmanager's webhook payload posted to
the HTTP listener, and FireTrigger; the bundle applied, repeated, reverted, refused."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client import CollectorRegistry

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server import ControlServer
from controlplane.server.auth import hash_token
from tests.helpers.cpctl import Run
from tests.integration.conftest import server_config
from tests.integration.test_auth import write_auth

FALSE = {"boolValue": False}
BUNDLE = """\
name: degrade-checkout
reason: payment provider timeouts
ttl: 30m
changes:
  - flag: {service: checkout, name: new-ui, value: false}
  - shed: {service: checkout, percent: 30, tier: SHEDDABLE}
"""


def payload(status: str, group: str = '{}:{alertname="HighErrorRate"}', **labels: str) -> Any:
    """Alertmanager's webhook payload (version 4), as it posts it."""
    common = {"alertname": "HighErrorRate", "service": "checkout", **labels}
    return {
        "receiver": "controlplane",
        "status": status,
        "alerts": [
            {
                "status": status,
                "labels": common,
                "annotations": {"summary": "5xx above 5% on /pay"},
                "startsAt": "2026-12-06T10:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus.example/graph?g0.expr=errors",
                "fingerprint": "c5d2b0a0b1e1f2a3",
            }
        ],
        "groupLabels": {"alertname": "HighErrorRate"},
        "commonLabels": common,
        "commonAnnotations": {"summary": "5xx above 5% on /pay"},
        "externalURL": "http://alertmanager.example:9093",
        "version": "4",
        "groupKey": group,
        "truncatedAlerts": 0,
    }


@pytest.fixture
async def srv(etcd: EmbeddedEtcd, prefix: str) -> AsyncIterator[ControlServer]:
    config = server_config(etcd.endpoint, prefix, http="127.0.0.1:0")
    server = ControlServer(config, registry=CollectorRegistry())
    await server.start()
    yield server
    await server.stop(grace=0)


@pytest.fixture
async def http(srv: ControlServer) -> AsyncIterator[httpx.AsyncClient]:
    assert srv.http is not None
    async with httpx.AsyncClient(base_url=srv.http.url, timeout=10) as client:
        yield client


async def flag_value(srv: ControlServer, scope: str, name: str) -> Any:
    """The flag's boolean value, None when it is not set."""
    async with grpc.aio.insecure_channel(srv.address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        listed = await stub.ListFlags(m.ListFlagsRequest(scope=scope))
        found = [f for f in listed.flags if f.name == name]
        return found[0].value.bool_value if found else None


def at(cpctl: Run, srv: ControlServer) -> Run:
    """``cpctl`` against ``srv``."""

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await cpctl(*args, server_list=srv.address)

    return run


async def test_an_alert_applies_the_bundle_once_per_group_and_resolving_reverts_it(
    srv: ControlServer, http: httpx.AsyncClient, cpctl: Run, tmp_path: Path
) -> None:
    bundle = tmp_path / "degrade.yaml"
    bundle.write_text(BUNDLE)
    run = at(cpctl, srv)
    made = await run(
        "trigger", "set", "degrade", "--match", "alertname=HighErrorRate",
        "--match", "service=checkout", "--bundle", str(bundle), "--revert-on-resolve",
        "--reason", "page: degrade checkout at once",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == "trigger degrade set"
    listed = await run("trigger", "list")
    assert "degrade  enabled  alertname=HighErrorRate, service=checkout" in listed.stdout
    assert "degrade-checkout (2 changes)" in listed.stdout and "revert on resolve" in listed.stdout

    fired = await http.post("/v1/alertmanager", json=payload("firing", incident="INC-77"))
    assert fired.status_code == 200, fired.text
    [done] = fired.json()["triggers"]
    assert (done["trigger"], done["outcome"]) == ("degrade", "FIRED"), done
    assert await flag_value(srv, "checkout", "new-ui") is False
    # Alertmanager repeats a firing group every repeat_interval: nothing new applied.
    again = await http.post("/v1/alertmanager", json=payload("firing", incident="INC-77"))
    assert again.json()["triggers"][0]["outcome"] == "ALREADY_FIRED"
    assert again.json()["triggers"][0]["bundle_id"] == done["bundle_id"]
    # Another alert (labels not matched) fires nothing.
    other = await http.post("/v1/alertmanager", json=payload("firing", service="payments"))
    assert other.json() == {"triggers": []}

    history = await run("--json", "history", "--incident", "INC-77")
    entries = json.loads(history.stdout)["entries"]
    actions = sorted(e["action"] for e in entries)
    assert actions == ["flag.set", "shedding.set", "trigger.fired"], actions
    assert {e["actor"] for e in entries} == {"trigger:degrade"}
    fired_entry = next(e for e in entries if e["action"] == "trigger.fired")
    assert "5xx above 5% on /pay" in fired_entry["reason"]
    got = await run("trigger", "get", "degrade")
    assert "last fired: 20" in got.stdout, got.stdout

    resolved = await http.post("/v1/alertmanager", json=payload("resolved", incident="INC-77"))
    assert resolved.json()["triggers"][0]["outcome"] == "REVERTED", resolved.text
    assert await flag_value(srv, "checkout", "new-ui") is None
    # Resolving again: nothing more to revert.
    twice = await http.post("/v1/alertmanager", json=payload("resolved"))
    assert twice.json()["triggers"][0]["outcome"] == "NOT_REVERTED"


async def test_disabled_cooldown_and_dry_run_apply_nothing_and_say_so(
    srv: ControlServer, cpctl: Run, tmp_path: Path
) -> None:
    bundle = tmp_path / "degrade.yaml"
    bundle.write_text(BUNDLE)
    run = at(cpctl, srv)
    for name, extra in (("calm", ["--cooldown", "10m"]), ("rehearsal", ["--dry-run"])):
        made = await run(
            "trigger", "set", name, "--match", "alertname=X", "--bundle", str(bundle),
            "--reason", "r", *extra,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr

    disabled = await run("trigger", "disable", "calm", "--reason", "maintenance")
    assert disabled.stdout.strip() == "trigger calm disabled", disabled.stdout
    refused = await run("trigger", "fire", "calm", "--group-key", "g1")
    assert refused.stdout.startswith("disabled: trigger calm is disabled"), refused.stdout
    assert await flag_value(srv, "checkout", "new-ui") is None
    await run("trigger", "enable", "calm", "--reason", "back")
    first = await run("trigger", "fire", "calm", "--group-key", "g1", "--summary", "x")
    assert first.stdout.startswith("fired: trigger calm applied bundle"), first.stdout
    cooling = await run("--json", "trigger", "fire", "calm", "--group-key", "g2")
    answer = json.loads(cooling.stdout)
    assert answer["outcome"] == "TRIGGER_COOLDOWN", answer
    assert "is in its cooldown (0:10:00 after it fired at" in answer["message"]

    rehearsal = await run("--json", "trigger", "fire", "rehearsal", "--group-key", "g3")
    answer = json.loads(rehearsal.stdout)
    assert answer["outcome"] == "TRIGGER_WOULD_APPLY"
    assert "would apply bundle degrade-checkout (2 changes)" in answer["message"]
    # The refusals are in the audit trail (so in notifications and the timeline).
    history = json.loads((await run("--json", "history", "--service", "checkout")).stdout)
    said = [e["action"] for e in history["entries"] if e["action"].startswith("trigger.")]
    assert sorted(set(said)) == [
        "trigger.cooldown", "trigger.disable", "trigger.disabled", "trigger.enable",
        "trigger.fired", "trigger.set", "trigger.would_apply",
    ], said  # fmt: skip


async def test_bad_triggers_and_payloads_are_refused_naming_the_fix(
    srv: ControlServer, http: httpx.AsyncClient, cpctl: Run, tmp_path: Path
) -> None:
    run = at(cpctl, srv)
    bad_service = tmp_path / "bad.yaml"
    bad_service.write_text(
        BUNDLE.replace("service: checkout, name: new-ui", "service: Checkout, name: new-ui")
    )
    until = tmp_path / "until.yaml"
    until.write_text(BUNDLE.replace("ttl: 30m", "until: 2099-01-01T00:00:00Z"))
    good = tmp_path / "good.yaml"
    good.write_text(BUNDLE)
    for args, code, text in (
        (["--match", "alertname", "--bundle", str(good)], 2, "is not LABEL=VALUE"),
        (["--match", "alert-name=X", "--bundle", str(good)], 3, "is not an alert label name"),
        (["--match", "a=~crit(", "--bundle", str(good)], 3, "missing ): crit("),
        (["--match", 'a="open', "--bundle", str(good)], 2, "has no closing double quote"),
        (["--match", "a=", "--bundle", str(good)], 3, 'a!="" for any value'),
        (["--match", "a=X", "--match", "a=X", "--bundle", str(good)], 3, "a=X is given twice"),
        # Only conditions an alert without the labels meets: any alert would fire it.
        (
            ["--match", "env!=staging", "--match", "team!~db-.*", "--bundle", str(good)],
            3,
            "any alert would fire the trigger",
        ),
        (["--match", "a=X", "--bundle", str(until)], 3, "give the bundle a ttl"),
        (["--match", "a=X", "--bundle", str(bad_service)], 3, "Checkout"),
    ):
        ran = await run("trigger", "set", "t1", *args, "--reason", "r")
        assert ran.returncode == code, (args, ran.stdout, ran.stderr)
        assert text in ran.stderr, ran.stderr
    # An enum number beyond int32 is refused, not wrapped into another operator.
    wrapped = await http.post(
        "/v1/triggers",
        json={
            "trigger": {
                "name": "t1",
                "matchers": [{"label": "a", "value": "x", "type": 2**32 + 2}],
                "bundleName": "b",
                "changes": [{"setFlag": {"scope": "checkout", "name": "k", "value": FALSE}}],
            },
            "options": {"reason": "r"},
        },
    )
    assert wrapped.status_code == 400, wrapped.text
    assert "trigger.matchers.type: 4294967298 is not a value of MatchType" in wrapped.text
    missing = await run("trigger", "get", "nope")
    assert missing.returncode != 0 and "no trigger nope (there are none)" in missing.stderr
    no_reason = await run("trigger", "set", "t1", "--match", "a=X", "--bundle", str(good))
    assert no_reason.returncode == 2 and "--reason is required" in no_reason.stderr
    for body, text in (
        ({**payload("firing"), "version": "3"}, "payload version 4"),
        ({**payload("firing"), "status": "odd"}, "status must be"),
        ([], "Alertmanager's webhook payload"),
        ({**payload("firing"), "commonLabels": {"a": 1}}, "commonLabels must be an object"),
    ):
        answer = await http.post("/v1/alertmanager", json=body)
        assert answer.status_code == 400 and text in answer.text, answer.text
    assert (await run("trigger", "list")).stdout.strip() == "no triggers"


async def paging_trigger(run: Run, tmp_path: Path, *matches: str) -> None:
    """``cpctl trigger set paging`` for HighErrorRate alerts that also match ``matches``."""
    bundle = tmp_path / "degrade.yaml"
    bundle.write_text(BUNDLE)
    options = [arg for match in ("alertname=HighErrorRate", *matches) for arg in ("--match", match)]
    made = await run(
        "trigger", "set", "paging", *options, "--bundle", str(bundle), "--reason", "page-worthy"
    )
    assert made.returncode == 0, made.stderr


async def test_alertmanagers_four_operators_pick_the_alerts(
    srv: ControlServer, http: httpx.AsyncClient, cpctl: Run, tmp_path: Path
) -> None:
    run = at(cpctl, srv)
    await paging_trigger(run, tmp_path, 'severity=~"critical|page"', "env!=staging", "team!~db-.*")
    listed = await run("trigger", "list")
    assert (
        "alertname=HighErrorRate, severity=~critical|page, env!=staging, team!~db-.*"
        in listed.stdout
    ), listed.stdout
    got = await http.get("/v1/triggers/paging")
    assert [
        (x["label"], x.get("type", "MATCH_EQUAL")) for x in got.json()["trigger"]["matchers"]
    ] == [
        ("alertname", "MATCH_EQUAL"),
        ("severity", "MATCH_REGEX"),
        ("env", "MATCH_NOT_EQUAL"),
        ("team", "MATCH_NOT_REGEX"),
    ]
    cases = [
        ({"severity": "page", "env": "prod"}, True),
        ({"severity": "critical"}, True),  # no env, no team: "" is not staging, not db-*
        ({"severity": "critical-ish", "env": "prod"}, False),  # the whole value must match
        ({"severity": "warning", "env": "prod"}, False),
        ({"severity": "page", "env": "staging"}, False),
        ({"severity": "page", "team": "db-core"}, False),
        ({"severity": "page", "team": "web"}, True),
    ]
    for i, (labels, fires) in enumerate(cases):
        answer = await http.post("/v1/alertmanager", json=payload("firing", f"g{i}", **labels))
        outcomes = [t["outcome"] for t in answer.json()["triggers"]]
        assert outcomes == (["FIRED"] if fires else []), (labels, answer.text)


def mixed_group(group: str, *label_sets: dict[str, str]) -> Any:
    """A group of alerts that disagree on some labels: Alertmanager leaves those out of
    ``commonLabels``."""
    body = payload("firing", group)
    alerts = [{**body["alerts"][0], "labels": {**body["commonLabels"], **ls}} for ls in label_sets]
    common = {
        k: v for k, v in alerts[0]["labels"].items() if all(a["labels"].get(k) == v for a in alerts)
    }
    return {**body, "alerts": alerts, "commonLabels": common}


async def test_a_group_fires_when_every_alert_of_it_matches(
    srv: ControlServer, http: httpx.AsyncClient, cpctl: Run, tmp_path: Path
) -> None:
    await paging_trigger(at(cpctl, srv), tmp_path, "severity=~critical|page", "env!~staging|dev")
    cases = [
        # Every alert critical or page, though they differ: fires.
        ([{"severity": "critical"}, {"severity": "page"}], True),
        # Staging and dev alerts (env not common): every one is excluded, so none fires.
        ([{"severity": "page", "env": "staging"}, {"severity": "page", "env": "dev"}], False),
        # One alert of the group does not match: the group does not.
        ([{"severity": "page"}, {"severity": "warning"}], False),
    ]
    for i, (label_sets, fires) in enumerate(cases):
        answer = await http.post("/v1/alertmanager", json=mixed_group(f"m{i}", *label_sets))
        outcomes = [t["outcome"] for t in answer.json()["triggers"]]
        assert outcomes == (["FIRED"] if fires else []), (label_sets, answer.text)
    bad = mixed_group("bad", {"severity": "page"})
    bad["alerts"][0]["labels"]["n"] = 1
    refused = await http.post("/v1/alertmanager", json=bad)
    assert refused.status_code == 400 and "alerts[0].labels must be" in refused.text


async def test_the_trigger_role_fires_and_nothing_else(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    tokens = {"alerts": "alertmanager-token-0123456789", "oncall": "oncall-token-0123456789"}
    document = {
        "identities": [
            {
                "name": "alertmanager",
                "role": "trigger",
                "token_sha256": hash_token(tokens["alerts"]),
            },
            {"name": "oncall", "role": "operator", "token_sha256": hash_token(tokens["oncall"])},
        ]
    }
    path = write_auth(tmp_path / "auth.json", document)
    config = server_config(etcd.endpoint, prefix, http="127.0.0.1:0", auth_file=path)
    server = ControlServer(config, registry=CollectorRegistry())
    await server.start()
    try:
        assert server.http is not None
        async with httpx.AsyncClient(base_url=server.http.url, timeout=10) as http:

            def bearer(who: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {tokens[who]}"}

            trigger = {
                "trigger": {
                    "name": "t",
                    "matchers": [{"label": "alertname", "value": "HighErrorRate"}],
                    "bundleName": "b",
                    "changes": [
                        {
                            "setFlag": {
                                "scope": "checkout",
                                "name": "k",
                                "value": {"boolValue": False},
                            }
                        }
                    ],
                },
                "options": {"reason": "r"},
            }
            made = await http.post("/v1/triggers", json=trigger, headers=bearer("oncall"))
            assert made.status_code == 200, made.text
            denied = await http.post("/v1/triggers", json=trigger, headers=bearer("alerts"))
            assert denied.status_code == 403 and "needs the operator or admin role" in denied.text
            fired = await http.post(
                "/v1/alertmanager", json=payload("firing"), headers=bearer("alerts")
            )
            assert fired.json()["triggers"][0]["outcome"] == "FIRED", fired.text
            no_token = await http.post("/v1/alertmanager", json=payload("firing"))
            assert no_token.status_code == 401
            flags = await http.get("/v1/flags", headers=bearer("alerts"))
            assert flags.status_code == 403
            by_name = await http.post("/v1/triggers/t/fire", json={}, headers=bearer("alerts"))
            assert by_name.json()["outcome"] == "TRIGGER_FIRED", by_name.text
    finally:
        await server.stop(grace=0)


async def test_a_key_changed_since_keeps_the_bundle_when_the_alert_resolves(
    srv: ControlServer, http: httpx.AsyncClient, cpctl: Run, tmp_path: Path
) -> None:
    bundle = tmp_path / "degrade.yaml"
    bundle.write_text(BUNDLE)
    run = at(cpctl, srv)
    made = await run(
        "trigger", "set", "degrade", "--match", "alertname=HighErrorRate", "--bundle",
        str(bundle), "--revert-on-resolve", "--reason", "r",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    fired = await http.post("/v1/alertmanager", json=payload("firing"))
    assert fired.json()["triggers"][0]["outcome"] == "FIRED", fired.text
    # Someone adjusts one of the bundle's keys by hand during the incident.
    adjusted = await run(
        "flag", "set", "checkout", "new-ui", "true", "--reason", "only half the users"
    )
    assert adjusted.returncode == 0, adjusted.stderr
    resolved = await http.post("/v1/alertmanager", json=payload("resolved"))
    [done] = resolved.json()["triggers"]
    assert done["outcome"] == "NOT_REVERTED", done
    assert "was not reverted" in done["message"] and "flags/checkout/new-ui" in done["message"]
    assert await flag_value(srv, "checkout", "new-ui") is True  # the hand-made value stays
    history = json.loads((await run("--json", "history", "--service", "checkout")).stdout)
    assert "trigger.not_reverted" in [e["action"] for e in history["entries"]]


async def set_trigger(http: httpx.AsyncClient, name: str, **extra: Any) -> None:
    body = {
        "trigger": {
            "name": name,
            "matchers": [{"label": "alertname", "value": "X"}],
            "bundleName": "b",
            "changes": [{"setFlag": {"scope": "checkout", "name": "k", "value": FALSE}}],
            **extra,
        },
        "options": {"reason": "r"},
    }
    made = await http.post("/v1/triggers", json=body)
    assert made.status_code == 200, made.text


async def fire(http: httpx.AsyncClient, name: str, group: str) -> Any:
    answer = await http.post(f"/v1/triggers/{name}/fire", json={"groupKey": group})
    assert answer.status_code == 200, answer.text
    return answer.json()


async def test_one_firing_per_group_and_per_cooldown_under_concurrency(
    srv: ControlServer, http: httpx.AsyncClient
) -> None:
    await set_trigger(http, "t", ttl="600s")
    same = await asyncio.gather(*(fire(http, "t", "g1") for _ in range(4)))
    outcomes = sorted(a["outcome"] for a in same)
    assert outcomes == ["TRIGGER_ALREADY_FIRED"] * 3 + ["TRIGGER_FIRED"], same
    assert len({a["bundleId"] for a in same}) <= 2  # the bundle, or "pending" then
    await set_trigger(http, "calm", cooldown="600s", changes=[
        {"setFlag": {"scope": "search", "name": "k", "value": FALSE}}
    ])  # fmt: skip
    groups = await asyncio.gather(*(fire(http, "calm", f"g{i}") for i in range(4)))
    outcomes = sorted(a["outcome"] for a in groups)
    assert outcomes == ["TRIGGER_COOLDOWN"] * 3 + ["TRIGGER_FIRED"], groups


async def test_resolving_after_the_bundle_expired_lets_the_group_fire_again(
    srv: ControlServer, http: httpx.AsyncClient
) -> None:
    await set_trigger(http, "short", ttl="0.5s", revertOnResolve=True)
    first = await fire(http, "short", "g")
    assert first["outcome"] == "TRIGGER_FIRED", first
    assert srv.hub is not None
    # The bundle's flag goes when its expiry passes (the server restores what it replaced).
    feed = srv.hub.feed("checkout")
    async with asyncio.timeout(10):
        while True:
            latest = feed.latest  # before the read: an expiry during it is waited for no more
            if await flag_value(srv, "checkout", "k") is None:
                break
            await feed.wait_past(latest)
    resolved = await http.post("/v1/triggers/short/resolve", json={"groupKey": "g"})
    answer = resolved.json()
    assert answer["outcome"] == "TRIGGER_NOT_REVERTED", answer
    assert "was not reverted" in answer["message"], answer
    again = await fire(http, "short", "g")
    assert again["outcome"] == "TRIGGER_FIRED", again


async def test_a_bundle_in_force_before_the_alert_stays_when_it_resolves(
    srv: ControlServer, http: httpx.AsyncClient
) -> None:
    change = {"setFlag": {"scope": "checkout", "name": "k", "value": FALSE}}
    applied = await http.post(
        "/v1/bundles", json={"name": "b", "changes": [change], "options": {"reason": "by hand"}}
    )
    assert applied.status_code == 200, applied.text
    await set_trigger(http, "t", revertOnResolve=True)
    fired = await fire(http, "t", "g")
    assert fired["outcome"] == "TRIGGER_FIRED" and "in force already" in fired["message"]
    resolved = (await http.post("/v1/triggers/t/resolve", json={"groupKey": "g"})).json()
    assert resolved["outcome"] == "TRIGGER_NOT_REVERTED", resolved
    assert "was in force before the alert" in resolved["message"]
    assert await flag_value(srv, "checkout", "k") is False
