"""The Alertmanager harness against a real Alertmanager, and the webhook payload it sends.

This is what the control server's Alertmanager receiver gets: Alertmanager's webhook
payload version "4", one POST per notification of a group, e.g. (0.25):

    {"receiver": "controlplane", "status": "firing",
     "alerts": [{"status": "firing", "labels": {...}, "annotations": {...},
                 "startsAt": "2026-12-06T11:27:39.371391Z",
                 "endsAt": "0001-01-01T00:00:00Z",
                 "generatorURL": "http://prometheus.test:9090/graph?...",
                 "fingerprint": "6e890fd1d2e6636f"}],
     "groupLabels": {"alertname": "HighErrorRate", "service": "checkout"},
     "commonLabels": {...}, "commonAnnotations": {...},
     "externalURL": "http://127.0.0.1:40303", "version": "4",
     "groupKey": "{}:{alertname=\\"HighErrorRate\\", service=\\"checkout\\"}",
     "truncatedAlerts": 0}
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest

from tests.helpers.alertmanager import Alertmanager, AlertmanagerError
from tests.helpers.http_sink import Received, Sink

TOKEN = "am-webhook-bearer-0123"
LABELS = {"alertname": "HighErrorRate", "service": "checkout", "severity": "page"}
ANNOTATIONS = {"summary": "checkout: 5xx above 5 % for 2 minutes"}
GENERATOR = "http://prometheus.test:9090/graph?g0.expr=job%3Acheckout_errors%3Arate5m"
# Go's zero time: the endsAt of a firing alert in the payload.
ZERO_TIME = "0001-01-01T00:00:00Z"


def parse_time(value: str) -> datetime:
    # Go writes up to nanoseconds; fromisoformat takes up to microseconds.
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", value))


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    receiver = Sink()
    await receiver.start("/alertmanager")
    yield receiver
    await receiver.stop()


def check_payload(got: Received, am: Alertmanager, status: str) -> dict[str, Any]:
    """The body of one notification of the test's group, checked; its single alert's
    ``status``, ``labels``, ``annotations``, ``generatorURL`` and ``fingerprint`` too."""
    assert got.path == "/alertmanager"
    assert got.headers["authorization"] == f"Bearer {TOKEN}"
    assert got.headers["content-type"] == "application/json"
    body: dict[str, Any] = got.json
    assert body["version"] == "4"
    assert body["status"] == status
    assert body["receiver"] == "controlplane"
    assert body["externalURL"] == am.url
    # The group: the route's (the root route's matchers: none) and its group_by values.
    assert body["groupLabels"] == {"alertname": "HighErrorRate", "service": "checkout"}
    assert body["groupKey"] == '{}:{alertname="HighErrorRate", service="checkout"}'
    assert body["commonLabels"] == LABELS
    assert body["commonAnnotations"] == ANNOTATIONS
    assert body["truncatedAlerts"] == 0
    [alert] = body["alerts"]
    assert alert["status"] == status
    assert alert["labels"] == LABELS
    assert alert["annotations"] == ANNOTATIONS
    assert alert["generatorURL"] == GENERATOR
    assert re.fullmatch(r"[0-9a-f]{16}", alert["fingerprint"])
    return body


async def test_fire_repeat_then_resolve_reach_the_webhook(sink: Sink) -> None:
    # A short group_interval: the check for no duplicate waits for three flushes.
    async with Alertmanager(sink.url, bearer=TOKEN, group_interval="500ms") as am:
        await am.fire(LABELS, ANNOTATIONS, generator_url=GENERATOR)
        [fired] = await sink.wait_for(1)
        firing = check_payload(fired, am, "firing")
        [alert] = firing["alerts"]
        assert alert["endsAt"] == ZERO_TIME
        parse_time(alert["startsAt"])

        # Prometheus sends a firing alert again every evaluation: Alertmanager tells the
        # receiver once, and again only after repeat_interval (1h here). A flush of the
        # group takes its alerts, then asks the notification log whether to send, then
        # sends; a group's flushes run one after the other. Of the flushes asking after
        # the repeat was stored, the first may have taken its alerts before; the second
        # took the repeat, and is done, its notification (if any) sent, once a third asks.
        await am.fire(LABELS, ANNOTATIONS, generator_url=GENERATOR)
        flushes = await am.flushes()
        await am.wait_metric("alertmanager_nflog_queries_total", flushes + 3)
        assert [r.json for r in sink.received[1:]] == []

        await am.resolve(LABELS, ANNOTATIONS, generator_url=GENERATOR)
        [_, got] = await sink.wait_for(2)
        resolved = check_payload(got, am, "resolved")
        assert resolved["groupKey"] == firing["groupKey"]
        [ended] = resolved["alerts"]
        assert ended["fingerprint"] == alert["fingerprint"]
        assert ended["startsAt"] == alert["startsAt"]
        assert parse_time(ended["endsAt"]) >= parse_time(alert["startsAt"])


async def test_without_bearer_no_authorization_header(sink: Sink) -> None:
    async with Alertmanager(sink.url) as am:
        await am.fire({"alertname": "Probe", "service": "checkout"})
        [got] = await sink.wait_for(1)
    assert "authorization" not in got.headers
    assert got.json["status"] == "firing"
    # Without annotations or a generator URL, Alertmanager sends them empty.
    [alert] = got.json["alerts"]
    assert alert["annotations"] == {}
    assert alert["generatorURL"] == ""


async def test_an_early_exit_shows_alertmanagers_log() -> None:
    # Alertmanager refuses a webhook URL that is not http(s) and exits.
    with pytest.raises(AlertmanagerError, match="exited with code 1 during start-up") as info:
        async with Alertmanager("ftp://127.0.0.1/hook"):
            pass
    assert "Loading configuration file failed" in str(info.value)
