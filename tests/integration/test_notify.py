"""Notifications out (``--notify``): real servers and etcd, local HTTP receivers standing in
for Slack, PagerDuty and a webhook, each payload checked against the documented shape."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import structlog
import yaml
from prometheus_client import CollectorRegistry

import controlplane.store._audit
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.model import flag_value_to_proto
from controlplane.server import ControlServer
from tests.helpers.cpctl import Run
from tests.helpers.http_sink import Received, Sink
from tests.helpers.raw_agent import RawAgent
from tests.helpers.raw_etcd import RawEtcd
from tests.integration.conftest import server_config

SECRET = "webhook-signing-secret-0123"
ROUTING_KEY = "R0UT1NGKEY0123456789abcdef012345"

# Slack's incoming webhooks take {text, blocks}; Block Kit: at most 50 blocks, a
# section's text at most 3000 characters, context elements at most 10.
SLACK = {
    "type": "object",
    "required": ["text", "blocks"],
    "properties": {
        "text": {"type": "string", "minLength": 1},
        "blocks": {
            "type": "array",
            "maxItems": 50,
            "items": {
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["type", "text"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"const": "section"},
                            "text": {
                                "type": "object",
                                "required": ["type", "text"],
                                "properties": {
                                    "type": {"const": "mrkdwn"},
                                    "text": {"type": "string", "minLength": 1, "maxLength": 3000},
                                },
                            },
                        },
                    },
                    {
                        "type": "object",
                        "required": ["type", "elements"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"const": "context"},
                            "elements": {"type": "array", "minItems": 1, "maxItems": 10},
                        },
                    },
                ]
            },
        },
    },
}
# PagerDuty Events API v2, change events (POST /v2/change/enqueue).
PAGERDUTY = {
    "type": "object",
    "required": ["routing_key", "payload"],
    "additionalProperties": False,
    "properties": {
        "routing_key": {"type": "string", "minLength": 1},
        "payload": {
            "type": "object",
            "required": ["summary"],
            "additionalProperties": False,
            "properties": {
                "summary": {"type": "string", "minLength": 1, "maxLength": 1024},
                "source": {"type": "string"},
                "timestamp": {"type": "string", "format": "date-time"},
                "custom_details": {"type": "object"},
            },
        },
        "links": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["href"],
                "properties": {"href": {"type": "string"}, "text": {"type": "string"}},
            },
        },
    },
}


def write_notify(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)
    return path


def destinations(slack: Sink, pagerduty: Sink, webhook: Sink) -> list[dict[str, Any]]:
    return [
        {"name": "oncall", "kind": "slack", "url": slack.url},
        {"name": "pd", "kind": "pagerduty", "url": pagerduty.url, "routing_key": ROUTING_KEY},
        {"name": "siem", "kind": "webhook", "url": webhook.url, "secret": SECRET},
    ]


@pytest.fixture
async def sinks() -> AsyncIterator[tuple[Sink, Sink, Sink]]:
    made = (Sink(), Sink(), Sink())
    for sink in made:
        await sink.start()
    yield made
    for sink in made:
        await sink.stop()


async def start_server(
    etcd: EmbeddedEtcd, prefix: str, notify: Path, **overrides: Any
) -> ControlServer:
    config = server_config(etcd.endpoint, prefix, notify_file=notify, **overrides)
    server = ControlServer(config, registry=CollectorRegistry())
    await server.start()
    return server


async def until_sending(server: ControlServer) -> None:
    """Until the server holds the sender's place (its cursors are set from then on)."""
    assert server.notifier is not None
    async with asyncio.timeout(15):
        while not server.notifier.sending or not server.notifier.ready.is_set():
            await server.notifier.changed()


def opts(**extra: Any) -> t.WriteOptions:
    return t.WriteOptions(reason="errors on /pay", actor="alice", incident="INC-42", **extra)


async def set_flag(address: str, scope: str, name: str, value: Any, **extra: Any) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        await stub.SetFlag(
            m.SetFlagRequest(
                scope=scope, name=name, value=flag_value_to_proto(value), options=opts(**extra)
            )
        )


def siem_only(tmp_path: Path, webhook: Sink, window: str = "100ms", **extra: str) -> Path:
    """A notify file with one destination, ``siem``: the unsigned webhook sink."""
    destination = {"name": "siem", "kind": "webhook", "url": webhook.url}
    document = {"destinations": [destination], "group_window": window, **extra}
    return write_notify(tmp_path / "notify.yaml", document)


async def apply_bundle(address: str, changes: Sequence[tuple[str, str]]) -> m.ApplyBundleResponse:
    """Bundle ``degrade``: flag NAME of SERVICE true, for each (SERVICE, NAME)."""
    bundle = m.ApplyBundleRequest(name="degrade", options=opts())
    for service, name in changes:
        change = bundle.changes.add()
        change.set_flag.scope = service
        change.set_flag.name = name
        change.set_flag.value.CopyFrom(flag_value_to_proto(True))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        response: m.ApplyBundleResponse = await stub.ApplyBundle(bundle)
        return response


def check_webhook(received: Received, *, signed: bool = True) -> dict[str, Any]:
    body = received.json
    digest = hmac.new(SECRET.encode(), received.body, hashlib.sha256).hexdigest()
    if signed:
        assert received.headers["x-controlplane-signature"] == f"sha256={digest}"
    else:
        assert "x-controlplane-signature" not in received.headers
    assert received.headers["x-controlplane-event-id"] == body["id"]
    return dict(body)


async def test_a_change_is_told_to_every_destination_once(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path, sinks: tuple[Sink, Sink, Sink]
) -> None:
    slack, pagerduty, webhook = sinks
    notify = write_notify(
        tmp_path / "notify.yaml",
        {
            "destinations": destinations(slack, pagerduty, webhook),
            "group_window": "300ms",
            "link": "https://controlplane.example/",
        },
    )
    server = await start_server(etcd, prefix, notify)
    try:
        await until_sending(server)
        await set_flag(server.address, "checkout", "new-ui", False)
        [to_slack] = await slack.wait_for(1)
        [to_pd] = await pagerduty.wait_for(1)
        [to_hook] = await webhook.wait_for(1)

        jsonschema.validate(to_slack.json, SLACK)
        text = json.dumps(to_slack.json)
        assert "checkout: flag new-ui unset -&gt; false" in text, text
        assert "by alice" in text and "errors on /pay" in text and "INC-42" in text, text
        assert "https://controlplane.example/v1/incidents/INC-42/timeline" in text

        jsonschema.validate(to_pd.json, PAGERDUTY, format_checker=jsonschema.FormatChecker())
        assert to_pd.json["routing_key"] == ROUTING_KEY
        assert to_pd.json["payload"]["summary"] == "checkout: flag new-ui unset -> false"
        details = to_pd.json["payload"]["custom_details"]
        assert (details["actor"], details["incident"]) == ("alice", "INC-42")

        body = check_webhook(to_hook)
        assert (body["kind"], body["services"], body["actor"]) == ("change", ["checkout"], "alice")
        assert body["details"]["changes"][0]["after"] == "false"
        # One event id per destination, the same in the header and the body.
        ids = {r.headers["x-controlplane-event-id"] for r in (to_slack, to_pd, to_hook)}
        assert len(ids) == 3
        # Counted once the receiver answered (after the request the test saw).
        labels = {"destination": "siem", "kind": "change"}
        async with asyncio.timeout(10):
            while not server.registry.get_sample_value(
                "controlplane_notifications_sent_total", labels
            ):
                assert server.notifier is not None
                await server.notifier.changed()
        sent = server.registry.get_sample_value("controlplane_notifications_sent_total", labels)
        assert sent == 1.0
        # Nothing else comes.
        await set_flag(server.address, "payments", "x", True)
        await webhook.wait_for(2)
        assert len(slack.received) <= 2 and len(webhook.received) == 2
    finally:
        await server.stop(grace=0)


async def test_a_burst_and_a_bundle_are_one_message_each(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path, sinks: tuple[Sink, Sink, Sink]
) -> None:
    _, _, webhook = sinks
    # Ten writes one after another fit in the window even on a loaded machine.
    notify = siem_only(tmp_path, webhook, "3s")
    server = await start_server(etcd, prefix, notify)
    try:
        await until_sending(server)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
            for i in range(10):
                await stub.SetFlag(
                    m.SetFlagRequest(
                        scope="checkout",
                        name=f"f{i}",
                        value=flag_value_to_proto(True),
                        options=opts(),
                    )
                )
            [burst] = await webhook.wait_for(1)
            body = check_webhook(burst, signed=False)
            assert body["title"] == "10 changes on checkout", body["title"]
            assert [line.split(" ")[2] for line in body["lines"]] == [f"f{i}" for i in range(10)]
            services = ("checkout", "payments", "search")
            applied = await apply_bundle(server.address, [(s, "lite") for s in services])
            _, second = await webhook.wait_for(2)
            body = check_webhook(second, signed=False)
            assert body["details"]["bundle_id"] == applied.bundle.id
            assert body["services"] == ["checkout", "payments", "search"]
            assert body["title"].startswith(f"bundle {applied.bundle.id}: 3 changes")
    finally:
        await server.stop(grace=0)


async def test_a_failed_send_is_retried_then_given_up_and_recorded(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path, cpctl: Run
) -> None:
    flaky = Sink(answers=[500, (429, {"Retry-After": "0"})])
    dead = Sink(answers=[503] * 1000)
    await flaky.start()
    await dead.start("/hook/SECRET-IN-URL")
    notify = write_notify(
        tmp_path / "notify.yaml",
        {
            "destinations": [
                {"name": "flaky", "kind": "webhook", "url": flaky.url},
                {"name": "dead", "kind": "slack", "url": dead.url},
            ],
            "group_window": "100ms",
            # Long enough for flaky's third attempt on a loaded machine (about 2 s in).
            "give_up_after": "4s",
        },
    )
    server = await start_server(etcd, prefix, notify)
    try:
        with structlog.testing.capture_logs() as logs:
            await until_sending(server)
            await set_flag(server.address, "checkout", "new-ui", False)
            attempts = await flaky.wait_for(3)
            # The same event each time, delivered at the third attempt.
            assert len({r.headers["x-controlplane-event-id"] for r in attempts}) == 1
            assert server.notifier is not None and server.store is not None
            state = server.store.notify_state
            async with asyncio.timeout(15):
                while not (failed := await state.failed(10)):
                    await server.notifier.changed()
        [failure] = failed
        assert (failure["destination"], failure["kind"]) == ("dead", "change")
        assert failure["title"] == "checkout: flag new-ui unset -> false"
        assert failure["error"].startswith("HTTP 503") and failure["attempts"] >= 2
        assert (
            server.registry.get_sample_value(
                "controlplane_notifications_failed_total", {"destination": "dead"}
            )
            == 1.0
        )
        # The URL (a Slack webhook's is its secret) is in no log line.
        assert logs and not [e for e in logs if "SECRET-IN-URL" in json.dumps(e, default=str)]
        assert [e for e in logs if e["event"] == "notification_failed"]
        # What the on-call engineer reads (from any server: it is in etcd).
        listed = await cpctl("notifications", "failed")
        assert listed.returncode == 0, listed.stderr
        assert "dead  change  checkout: flag new-ui unset -> false" in listed.stdout
        assert "last error: HTTP 503" in listed.stdout and "SECRET-IN-URL" not in listed.stdout
        status = await cpctl("--json", "notifications", "status")
        document = json.loads(status.stdout)
        assert document["sender"] == server.server_id
        assert {d["name"] for d in document["destinations"]} == {"dead", "flaky"}
        assert all(not d.get("pending_id") for d in document["destinations"])
        human = await cpctl("notifications", "status")
        assert "some messages were given up on: cpctl notifications failed" in human.stderr
    finally:
        await server.stop(grace=0)
        await flaky.stop()
        await dead.stop()


async def test_filters_by_service_and_event(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path, sinks: tuple[Sink, Sink, Sink]
) -> None:
    checkout_only, expiries_only, _ = sinks
    notify = write_notify(
        tmp_path / "notify.yaml",
        {
            "destinations": [
                {
                    "name": "checkout-team",
                    "kind": "webhook",
                    "url": checkout_only.url,
                    "services": ["checkout"],
                },
                {
                    "name": "expiries",
                    "kind": "webhook",
                    "url": expiries_only.url,
                    "events": ["expiry"],
                },
            ],
            "group_window": "100ms",
        },
    )
    server = await start_server(etcd, prefix, notify, expiry_interval=0.1)
    try:
        await until_sending(server)
        await set_flag(server.address, "payments", "a", True)
        await set_flag(server.address, "global", "b", True)
        await set_flag(server.address, "checkout", "c", True, ttl={"nanos": 500_000_000})
        told = await checkout_only.wait_for(3)
        titles = sorted(r.json["title"] for r in told)
        assert titles[0] == "checkout: flag c expired: true -> unset again", titles
        assert re.fullmatch(r"checkout: flag c unset -> true until \S+:\d\dZ", titles[1]), titles
        assert titles[2] == "global: flag b unset -> true", titles
        [expired] = await expiries_only.wait_for(1)
        assert expired.json["kind"] == "expiry"
        assert expired.json["actor"] == "controlplane:expiry"
        assert not [r for r in told if "payments" in r.json["services"]]
    finally:
        await server.stop(grace=0)


async def until_sent(server: ControlServer, count: int) -> None:
    """Until ``server`` saved that it sent ``count`` change messages to siem."""
    labels = {"destination": "siem", "kind": "change"}
    async with asyncio.timeout(10):
        while (
            server.registry.get_sample_value("controlplane_notifications_sent_total", labels) or 0
        ) < count:
            assert server.notifier is not None
            await server.notifier.changed()


async def test_changes_made_while_no_one_sent_are_told_after_etcd_compacted_them(
    etcd: EmbeddedEtcd,
    prefix: str,
    tmp_path: Path,
    sinks: tuple[Sink, Sink, Sink],
    raw_etcd: RawEtcd,
) -> None:
    """No server sent notifications while three changes were made, and etcd compacted
    its history of them: the next sender reads them from the audit trail."""
    _, _, webhook = sinks
    notify = siem_only(tmp_path, webhook)
    first = await start_server(etcd, prefix, notify)
    try:
        await until_sending(first)
        await set_flag(first.address, "checkout", "a", True)
        await until_sent(first, 1)
    finally:
        await first.stop(grace=0)
    quiet = ControlServer(server_config(etcd.endpoint, prefix), registry=CollectorRegistry())
    await quiet.start()
    try:
        # Two audit records of one revision.
        await apply_bundle(quiet.address, [("checkout", "b"), ("checkout", "c")])
        await set_flag(quiet.address, "payments", "d", False)
    finally:
        await quiet.stop(grace=0)
    await raw_etcd.compact(await raw_etcd.revision())
    second = await start_server(etcd, prefix, notify)
    try:
        with structlog.testing.capture_logs() as logs:
            await until_sending(second)
            told = await webhook.wait_for(3)
        changes = [
            (c["service"], c["name"], c["after"])
            for r in told
            for c in check_webhook(r, signed=False)["details"]["changes"]
        ]
        # (The bundle's two come in their keys' order, not the transaction's.)
        assert changes[:1] + sorted(changes[1:3]) + changes[3:] == [
            ("checkout", "a", "true"),
            ("checkout", "b", "true"),
            ("checkout", "c", "true"),
            ("payments", "d", "false"),
        ], changes
        assert [e for e in logs if e["event"] == "notify_history_compacted"], logs
        await until_sent(second, 2)
        assert len(webhook.received) == 3
    finally:
        await second.stop(grace=0)


@pytest.mark.parametrize(("keys", "page_bytes"), [(1, 1), (2, 1), (3, 2**21), (10_000, 2**21)])
async def test_the_audit_of_compacted_revisions_reads_whole_whatever_the_page(
    etcd: EmbeddedEtcd, prefix: str, monkeypatch: pytest.MonkeyPatch, keys: int, page_bytes: int
) -> None:
    # Pages of keys, then of values (1 byte: a record a page).
    monkeypatch.setattr(controlplane.store._audit, "_BACKFILL_KEYS", keys)
    monkeypatch.setattr(controlplane.store._audit, "_PAGE_BYTES", page_bytes)
    server = ControlServer(server_config(etcd.endpoint, prefix), registry=CollectorRegistry())
    await server.start()
    try:
        assert server.store is not None
        before = await server.store.revision()
        await set_flag(server.address, "checkout", "a", True)
        # Three audit records of one revision.
        applied = await apply_bundle(server.address, [("checkout", n) for n in "bcd"])
        await set_flag(server.address, "checkout", "e", True)
        upto = await server.store.revision()
        await set_flag(server.address, "checkout", "f", True)  # after upto: not read
        found = await server.store.audit_between(before, upto)
        entries = [server.store.decode_audit(event) for event in found]
        names = [(e.revision, e.key.rsplit("/", 1)[1]) for e in entries if e is not None]
        bundle_revision = applied.result.revision
        assert names[:1] + sorted(names[1:4]) + names[4:] == [
            (bundle_revision - 1, "a"),
            (bundle_revision, "b"),
            (bundle_revision, "c"),
            (bundle_revision, "d"),
            (bundle_revision + 1, "e"),
        ], names
        assert await server.store.audit_between(upto, upto) == []
    finally:
        await server.stop(grace=0)


async def test_the_audit_of_compacted_revisions_is_read_in_answers_etcd_can_give(
    etcd: EmbeddedEtcd, prefix: str
) -> None:
    """More audit than one answer may carry (16 MiB): read all the same."""
    server = ControlServer(server_config(etcd.endpoint, prefix), registry=CollectorRegistry())
    await server.start()
    try:
        assert server.store is not None
        before = await server.store.revision()
        big = "x" * 60_000
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
            for i in range(300):  # each audit record holds the value: about 18 MB
                await stub.SetFlag(
                    m.SetFlagRequest(
                        scope="checkout",
                        name=f"f{i}",
                        value=flag_value_to_proto(big + str(i)),
                        options=opts(),
                    )
                )
        upto = await server.store.revision()
        found = await server.store.audit_between(before, upto)
        assert [e.mod_revision for e in found] == list(range(before + 1, upto + 1))
        entry = server.store.decode_audit(found[-1])
        assert entry is not None and entry.key.endswith("/f299")
    finally:
        await server.stop(grace=0)


async def test_one_server_sends_and_another_takes_over_when_it_stops(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path, sinks: tuple[Sink, Sink, Sink]
) -> None:
    _, _, webhook = sinks
    notify = siem_only(tmp_path, webhook)
    first = await start_server(etcd, prefix, notify)
    second = await start_server(etcd, prefix, notify)
    stopped = False
    try:
        await until_sending(first)
        assert second.notifier is not None and not second.notifier.sending
        await set_flag(second.address, "checkout", "a", True)
        await webhook.wait_for(1)
        # The receiver has the request before the sender saved that it was sent: stop
        # the first server only once it has (else the second one rightly sends it again).
        await until_sent(first, 1)
        await first.stop(grace=0)
        stopped = True
        await set_flag(second.address, "checkout", "b", True)
        await until_sending(second)
        told = await webhook.wait_for(2)
        assert [r.json["title"] for r in told] == [
            "checkout: flag a unset -> true",
            "checkout: flag b unset -> true",
        ]
        assert len(webhook.received) == 2
    finally:
        if not stopped:
            await first.stop(grace=0)
        await second.stop(grace=0)


def _ids(received: Sequence[Received]) -> list[str]:
    return [r.headers["x-controlplane-event-id"] for r in received]


async def test_a_server_killed_right_after_a_write_loses_no_message(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path, sinks: tuple[Sink, Sink, Sink]
) -> None:
    """kill -9 between the commit and the send: the next server sends it, once."""
    from tests.helpers.server_process import ServerProcess

    slack, _, webhook = sinks
    notify = write_notify(
        tmp_path / "notify.yaml",
        {
            "destinations": [
                {"name": "oncall", "kind": "slack", "url": slack.url},
                {"name": "siem", "kind": "webhook", "url": webhook.url},
            ],
            "group_window": "2s",
        },
    )
    args = ["--notify", str(notify)]
    first = ServerProcess(etcd.endpoint, prefix, extra_args=args)
    first.wait_output(r'"notify_sender"')
    await set_flag(first.address, "checkout", "new-ui", False)
    first.kill()
    assert not slack.received and not webhook.received  # still in its group window
    second = ServerProcess(etcd.endpoint, prefix, extra_args=args)
    try:
        # The killed server's lease must run out before another takes its place.
        [told] = await webhook.wait_for(1, within=30)
        await slack.wait_for(1, within=30)
        assert told.json["title"] == "checkout: flag new-ui unset -> false"
        second.wait_output(r'"destination": "oncall".*"notification_sent"')
        # Once per destination.
        assert len(slack.received) == 1 and len(webhook.received) == 1
    finally:
        second.stop()


def test_a_bad_notifications_file_stops_the_start_in_one_line(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    bad = write_notify(
        tmp_path / "notify.yaml",
        {"destinations": [{"name": "siem", "kind": "email", "url": "https://x.example/"}]},
    )
    ran = subprocess.run(
        [
            sys.executable, "-m", "controlplane.server", "serve", "--listen", "127.0.0.1:0",
            "--etcd", etcd.endpoint, "--prefix", prefix, "--metrics", "off",
            "--notify", str(bad),
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode != 0
    assert "--notify: destination siem: kind must be one of slack, pagerduty, webhook" in (
        ran.stderr
    ), ran.stderr
    assert "Traceback" not in ran.stderr


async def test_sighup_reads_the_file_again_and_keeps_it_when_it_is_bad(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path, sinks: tuple[Sink, Sink, Sink]
) -> None:
    first, second, _ = sinks
    path = tmp_path / "notify.yaml"
    write_notify(
        path,
        {
            "destinations": [{"name": "one", "kind": "webhook", "url": first.url}],
            "group_window": "100ms",
        },
    )
    server = await start_server(etcd, prefix, path)
    try:
        await until_sending(server)
        write_notify(path, {"destinations": "not a list"})
        with structlog.testing.capture_logs() as logs:
            assert server.reload() is False
        assert [e for e in logs if e["event"] == "notify_reload_failed"]
        write_notify(
            path,
            {
                "destinations": [
                    {"name": "one", "kind": "webhook", "url": first.url},
                    {"name": "two", "kind": "webhook", "url": second.url},
                ],
                "group_window": "100ms",
            },
        )
        assert server.reload() is True
        assert server.notifier is not None
        async with asyncio.timeout(10):
            while "two" not in await _destination_names(server):
                await server.notifier.changed()
        await set_flag(server.address, "checkout", "a", True)
        await first.wait_for(1)
        await second.wait_for(1)  # the new destination, from the reload on
    finally:
        await server.stop(grace=0)


async def _destination_names(server: ControlServer) -> set[str]:
    assert server.store is not None
    return set(await server.store.notify_state.states())


async def test_a_rejection_and_a_change_not_applied_in_time_are_told(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path, sinks: tuple[Sink, Sink, Sink], cpctl: Run
) -> None:
    """One instance rejects the change (nack), another never confirms it: both are in
    the audit trail once and reach the destination, naming the instances."""
    _, _, webhook = sinks
    notify = siem_only(tmp_path, webhook, incomplete_after="1s")
    server = await start_server(etcd, prefix, notify)
    try:
        await until_sending(server)
        async with (
            RawAgent(server.address, "checkout", "vm-1", auto_ack=False) as rejecting,
            RawAgent(server.address, "checkout", "vm-2", auto_ack=False) as stalled,
            RawAgent(server.address, "checkout", "vm-3") as fine,
        ):
            for agent in (rejecting, stalled, fine):
                await agent.next()  # its snapshot: connected
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
                written = await stub.SetFlag(
                    m.SetFlagRequest(
                        scope="checkout",
                        name="mode",
                        value=flag_value_to_proto("lite"),
                        options=opts(),
                    )
                )
            revision = int(written.result.revision)
            await rejecting.until_revision(revision)
            await rejecting.ack(revision, rejected="mode 'lite' is not a mode this build knows")
            await rejecting.ack(revision, rejected="again, after a reconnect")  # audited once
            told = await webhook.wait_for(3)
            by_kind = {r.json["kind"]: r.json for r in told}
            assert set(by_kind) == {"change", "nack", "incomplete"}, [r.json for r in told]
            nack = by_kind["nack"]
            assert nack["title"] == (
                f"checkout: vm-1 rejected revision {revision}: mode 'lite' is not a mode this "
                "build knows"
            )
            # The change's message says how many instances had applied it when it was sent.
            assert by_kind["change"]["applied"] == "applied by 1/3 instances", by_kind["change"]
            incomplete = by_kind["incomplete"]
            assert incomplete["title"] == (
                f"checkout: flag mode unset -> lite (revision {revision}, by alice) not applied "
                "by 2 of 3 instance(s) 1s after it was written: vm-1, vm-2"
            ), incomplete["title"]
            assert incomplete["incident"] == "INC-42"
            history = await cpctl("history", "--service", "checkout")
            assert history.stdout.count("agent.nack") == 1, history.stdout
            assert "notify.incomplete" in history.stdout
            assert len(webhook.received) == 3
    finally:
        await server.stop(grace=0)


async def test_a_mitigation_left_in_force_is_told_once_per_threshold(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path, sinks: tuple[Sink, Sink, Sink]
) -> None:
    _, _, webhook = sinks
    notify = write_notify(
        tmp_path / "notify.yaml",
        {
            "destinations": [
                {"name": "siem", "kind": "webhook", "url": webhook.url, "events": ["stale"]}
            ],
            "group_window": "100ms",
        },
    )
    server = await start_server(etcd, prefix, notify, stale_after=timedelta(seconds=1))
    try:
        await until_sending(server)
        await set_flag(server.address, "checkout", "new-ui", False)
        await set_flag(server.address, "checkout", "boxed", True, ttl={"seconds": 3600})
        [told] = await webhook.wait_for(1)
        body = told.json
        assert body["kind"] == "stale" and body["services"] == ["checkout"], body
        assert re.fullmatch(
            r"checkout: flag new-ui in force for \S+ with no expiry \(stale after 1s\): "
            r"clear it once its incident is over \(cpctl flag clear checkout new-ui "
            r"--reason \.\.\.\)",
            body["title"],
        ), body["title"]
        # Once per threshold: the second reminder comes a threshold later, not before.
        [_, second] = await webhook.wait_for(2)
        assert second.json["title"].startswith("checkout: flag new-ui in force for ")
        assert "boxed" not in json.dumps([r.json for r in webhook.received])
    finally:
        await server.stop(grace=0)
