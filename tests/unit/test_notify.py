"""The notifications file, grouping changes into messages, and each destination's payload."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from controlplane.model import AuditEntry
from controlplane.server.notify import (
    Change,
    NotifyConfigError,
    change_of,
    event_of,
    load_notify_file,
    next_group,
    parse_notify,
    request_of,
)
from controlplane.server.notify._events import MAX_GROUP

T0 = datetime(2026, 12, 6, 14, 30, tzinfo=UTC)
HOOK = "https://hooks.example/T000/B000/hook-secret-path"


def hook(**extra: Any) -> dict[str, Any]:
    return {"name": "siem", "kind": "webhook", "url": HOOK, **extra}


@pytest.mark.parametrize(
    ("document", "text"),
    [
        ([], "must be a mapping with a 'destinations' list"),
        ({}, "'destinations' must be a non-empty list"),
        ({"destinations": [hook()], "colour": 1}, "unknown field 'colour'; the fields are"),
        ({"destinations": [{"name": "Bad Name", "kind": "slack"}]}, "name must be 1-63"),
        ({"destinations": [hook(kind="email")]}, "kind must be one of slack, pagerduty, webhook"),
        ({"destinations": [hook(), hook()]}, "destination siem: the name is used twice"),
        (
            {"destinations": [{"name": "pd", "kind": "pagerduty"}]},
            "a pagerduty destination needs routing_key_file (or routing_key_env, or routing_key)",
        ),
        ({"destinations": [{"name": "s", "kind": "slack"}]}, "a slack destination needs url_file"),
        ({"destinations": [hook(routing_key="x")]}, "unknown field 'routing_key' for a webhook"),
        ({"destinations": [hook(url_env="X")]}, "give one of url, url_env, not several"),
        ({"destinations": [hook(events=["changes"])]}, "'changes' is not an event; the events"),
        ({"destinations": [hook(url="https://h.example:44x/a")]}, "url is not an http(s) URL"),
        ({"destinations": [hook(services=["Checkout"])]}, "'Checkout' is not a service name"),
        ({"destinations": [hook()], "group_window": "soon"}, "group_window 'soon'"),
        ({"destinations": [hook()], "give_up_after": "0s"}, "give_up_after must be positive"),
        (
            {"destinations": [{**hook(url_env="CP_TEST_NOT_SET_ANYWHERE"), "url": None}]},
            "the environment variable CP_TEST_NOT_SET_ANYWHERE is not set",
        ),
    ],
)
def test_a_bad_file_names_the_entry_the_field_and_the_fix(document: Any, text: str) -> None:
    with pytest.raises(NotifyConfigError) as refused:
        parse_notify(document, "notify.yaml")
    assert text in str(refused.value), str(refused.value)


def test_a_url_is_never_shown_in_an_error() -> None:
    with pytest.raises(NotifyConfigError) as refused:
        parse_notify({"destinations": [hook(url="ftp://x/SECRET-PART")]})
    assert "not an http(s) URL (the value is not shown" in str(refused.value)
    assert "SECRET" not in str(refused.value)
    config = parse_notify({"destinations": [hook(secret="s3cr3t")]})
    assert "hook-secret-path" not in repr(config) and "s3cr3t" not in repr(config)


def test_secrets_come_from_files_checked_like_the_auth_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = tmp_path / "slack-url"
    url.write_text(HOOK + "\n")
    url.chmod(0o600)
    key = tmp_path / "pd-key"
    key.write_text("routing-key-0123\n")
    key.chmod(0o644)  # others can read it: works, with a warning
    monkeypatch.setenv("CP_TEST_SIEM_SECRET", "from-the-environment")
    notify = tmp_path / "notify.yaml"
    notify.write_text(
        "destinations:\n"
        "  - {name: oncall, kind: slack, url_file: slack-url, services: [checkout]}\n"
        "  - {name: pd, kind: pagerduty, routing_key_file: pd-key, events: [change]}\n"
        f"  - {{name: siem, kind: webhook, url: {HOOK}, secret_env: CP_TEST_SIEM_SECRET}}\n"
        "give_up_after: 2h\n"
    )
    config = load_notify_file(notify)
    oncall, pd, siem = config.destinations
    assert (oncall.url, oncall.services) == (HOOK, frozenset({"checkout"}))
    assert pd.url == "https://events.pagerduty.com/v2/change/enqueue"
    assert pd.routing_key == "routing-key-0123" and pd.events == frozenset({"change"})
    assert siem.secret == "from-the-environment"
    assert config.give_up_after == timedelta(hours=2)
    assert len(config.warnings) == 1 and "pd-key" in config.warnings[0]
    # A secret file others can change is refused, naming the file and the fix.
    url.chmod(0o666)
    with pytest.raises(NotifyConfigError) as refused:
        load_notify_file(notify)
    assert "slack-url" in str(refused.value) and "chmod" in str(refused.value)


def test_destinations_filter_by_kind_and_service() -> None:
    config = parse_notify(
        {"destinations": [hook(services=["checkout"], events=["change", "expiry"])]}
    )
    [siem] = config.destinations
    assert siem.wants("change", ["checkout"]) and siem.wants("expiry", ["global"])
    assert not siem.wants("change", ["payments"]) and not siem.wants("nack", ["checkout"])


def entry(n: int, **extra: Any) -> AuditEntry:
    fields: dict[str, Any] = {
        "id": f"{n:020d}-0000000{n % 10}",
        "time": T0 + timedelta(milliseconds=100 * n),
        "actor": "alice",
        "action": "flag.set",
        "kind": "flag",
        "scope": "checkout",
        "name": f"f{n}",
        "key": f"/cp/flags/checkout/f{n}",
        "reason": "errors on /pay",
        "incident": "INC-42",
        "before": None,
        "after": {"kind": "flag", "value": False},
        "revision": 100 + n,
    }
    fields.update(extra)
    return AuditEntry(**fields)


def changes(*entries: AuditEntry) -> list[Change]:
    return [change_of(e) for e in entries]


def test_a_burst_to_one_service_by_one_actor_is_one_group() -> None:
    window = timedelta(seconds=2)
    burst = changes(*(entry(n) for n in range(10)))
    group, complete = next_group(burst, window, T0 + timedelta(seconds=1))
    assert (len(group), complete) == (10, False)  # the window is still open
    group, complete = next_group(burst, window, T0 + timedelta(seconds=3))
    assert (len(group), complete) == (10, True)
    # Another service, another actor or a time past the window each start a group.
    for other in (
        entry(3, scope="payments"),
        entry(3, actor="bob"),
        entry(30),  # 3 s after the first
    ):
        mixed = changes(entry(0), entry(1), other, entry(4))
        group, complete = next_group(mixed, window, T0)
        assert ([c.name for c in group], complete) == (["f0", "f1"], True)
    full = changes(*(entry(n % 10) for n in range(MAX_GROUP + 5)))
    group, complete = next_group(full, timedelta(hours=1), T0)
    assert (len(group), complete) == (MAX_GROUP, True)


def test_a_bundle_across_services_is_one_group_and_expiries_are_their_own() -> None:
    bundle = [entry(n, scope=s, bundle_id="b1") for n, s in enumerate(("a", "b", "c"))]
    expiry = entry(5, actor="controlplane:expiry")
    group, complete = next_group(changes(*bundle, expiry), timedelta(seconds=2), T0)
    assert ([c.scope for c in group], complete) == (["a", "b", "c"], True)
    event = event_of("siem", group)
    assert event.title == "bundle b1: 3 changes on a, b, c"
    assert event.lines[0] == "a: flag f0 unset -> false"
    assert change_of(expiry).event_kind == "expiry"
    expired = event_of("siem", changes(expiry))
    assert expired.title == "checkout: flag f5 expired: unset -> false again"


def test_event_ids_are_stable_per_destination_and_group() -> None:
    group = changes(entry(1), entry(2))
    assert event_of("siem", group).id == event_of("siem", changes(entry(1), entry(2))).id
    assert event_of("siem", group).id != event_of("oncall", group).id
    assert event_of("siem", group).id != event_of("siem", group[:1]).id


def test_payloads_escape_sign_and_stay_within_limits() -> None:
    config = parse_notify(
        {
            "destinations": [
                {"name": "oncall", "kind": "slack", "url": HOOK},
                {"name": "pd", "kind": "pagerduty", "routing_key": "k"},
                hook(secret="s3cr3t"),
            ]
        }
    )
    oncall, pd, siem = config.destinations
    event = event_of("x", changes(entry(1, reason="<!channel> & more", name="a" * 2000)))
    body, headers = request_of(oncall, event)
    text = json.dumps(json.loads(body))
    assert "&lt;!channel&gt; &amp; more" in text and "<!channel>" not in text
    body, headers = request_of(pd, event)
    assert len(json.loads(body)["payload"]["summary"]) == 1024
    body, headers = request_of(siem, event)
    expected = hmac.new(b"s3cr3t", body, hashlib.sha256).hexdigest()
    assert headers["X-Controlplane-Signature"] == f"sha256={expected}"
    assert headers["X-Controlplane-Event-Id"] == json.loads(body)["id"] == event.id
    many = event_of("x", changes(*(entry(n % 10, name=f"n{n}") for n in range(MAX_GROUP))))
    body, _ = request_of(oncall, many)
    blocks = json.loads(body)["blocks"]
    assert len(blocks) <= 50 and all(len(b.get("text", {}).get("text", "")) <= 3000 for b in blocks)
    assert "… and 10 more" in blocks[-1]["text"]["text"]


def test_an_override_a_nack_and_a_trigger_are_told_in_their_words() -> None:
    override = entry(1, action="override.applied", kind="override", name="vm-3", actor="alice@vm-3")
    event = event_of("x", changes(override))
    assert (event.kind, event.title) == (
        "override",
        "checkout: break-glass override applied on vm-3",
    )
    nack = entry(2, action="agent.nack", kind="nack", name="vm-4", reason="bad value",
                 after={"revision": 812, "instance": "vm-4"}, actor="agent:checkout")  # fmt: skip
    event = event_of("x", changes(nack))
    assert (event.kind, event.title) == (
        "nack",
        "checkout: vm-4 rejected revision 812: bad value",
    )
    fired = entry(3, action="trigger.fired", kind="trigger", scope="global", name="t",
                  reason="trigger t applied bundle b for alert x", actor="trigger:t")  # fmt: skip
    event = event_of("x", changes(fired))
    assert (event.kind, event.title) == ("trigger", "trigger t applied bundle b for alert x")
