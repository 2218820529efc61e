"""Break-glass overrides without etcd: the file format, precedence over the server's
state, the file watcher, expiry, and what the agent reports to a server.

The agent-level tests run an :class:`agents.AsyncAgent` in the test's loop, either
with nothing listening at its server address (the control plane is down) or with
a small recording Sync server on loopback that sends an empty snapshot and keeps
every request it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

import agents._client_state
import agents._filewatch
from agents import Agent, AsyncAgent, Criticality, Override, OverrideError, StateChange
from agents._codec import apply_change, snapshot_from_proto
from agents._config import resolve_config
from agents._override import (
    MAX_FILE_BYTES,
    OverrideExpiredError,
    OverrideFile,
    parse_override,
)
from agents._shed import should_shed, should_shed_key
from agents._state import OVERRIDE_SCOPE, Snapshot, apply_override, diff
from controlplane.api.v1 import agent_pb2, agent_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import free_port
from tests.helpers.agent_log import AgentLog

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
"""The parsing tests' clock; the agent tests' is the real one (see :func:`live`)."""
IN_SIX_DAYS = (datetime.now(UTC) + timedelta(days=6)).isoformat()
SERVICE = "checkout"

GOOD: dict[str, Any] = {
    "reason": "control plane down, errors on /pay",
    "actor": "sre@host-7",
    "expires_at": "2026-11-26T18:00:00Z",
    "flags": {"new-ui": False, "checkout.mode": "read-only"},
    "shedding": {"tier": "SHEDDABLE_PLUS", "percent": 50},
    "pin": "v1.4.2",
}


def parse(doc: Any, now: datetime = NOW) -> Override:
    return parse_override(json.dumps(doc).encode(), now)


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in GOOD.items() if k != key}


def but(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


# ---------------------------------------------------------------- the file format


def test_a_good_file_parses_with_canonical_content_and_its_digest() -> None:
    override = parse(GOOD)
    assert override.reason == "control plane down, errors on /pay"
    assert override.actor == "sre@host-7"
    assert override.expires_at == datetime(2026, 11, 26, 18, 0, tzinfo=UTC)
    assert dict(override.flags) == {"new-ui": False, "checkout.mode": "read-only"}
    assert override.shedding is not None
    assert (override.shedding.tier, override.shedding.percent) == (
        Criticality.SHEDDABLE_PLUS,
        50.0,
    )
    assert override.pin == "v1.4.2"
    assert override.content_json == (
        '{"flags":{"checkout.mode":"read-only","new-ui":false},"pin":"v1.4.2",'
        '"shedding":{"percent":50,"tier":"SHEDDABLE_PLUS"}}'
    )
    assert override.digest == hashlib.sha256(override.content_json.encode()).hexdigest()


def test_the_digest_depends_on_what_is_set_only() -> None:
    digest = parse(GOOD).digest
    # Key order, 50 or 50.0, the tier's spelling, reason, actor and expiry: same content.
    same = {
        "pin": "v1.4.2",
        "shedding": {"percent": 50.0, "tier": "sheddable-plus"},
        "flags": {"checkout.mode": "read-only", "new-ui": False},
        "expires_at": "2026-11-26T19:00:00+01:00",
        "reason": "another reason",
    }
    assert parse(same).digest == digest
    assert parse(but(pin="v1.4.3")).digest != digest
    assert parse(but(flags={"new-ui": True, "checkout.mode": "read-only"})).digest != digest
    # A kill switch is no number: false and 0 differ.
    assert parse(but(flags={"new-ui": 0, "checkout.mode": "read-only"})).digest != digest


def test_only_one_of_flags_shedding_and_pin_is_needed() -> None:
    base = {"reason": "r", "expires_at": "2026-11-27T00:00:00Z"}
    only_flag = parse({**base, "flags": {"kill": True, "ratio": 3, "cfg": {"a": [1, None]}}})
    assert dict(only_flag.flags) == {"kill": True, "ratio": 3.0, "cfg": {"a": [1, None]}}
    assert (only_flag.shedding, only_flag.pin, only_flag.actor) == (None, None, "")
    shed = parse({**base, "shedding": {"percent": 30}})
    assert shed.shedding is not None and shed.shedding.tier is Criticality.SHEDDABLE
    assert parse({**base, "pin": "v2+build.7"}).pin == "v2+build.7"
    # null counts as absent
    assert parse({**base, "pin": "v2", "flags": None, "shedding": None}).flags == {}


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        (without("reason"), "reason: missing"),
        (but(reason="   "), "reason: is empty"),
        (but(reason="x" * 1025), "reason: is 1025 characters, over 1024"),
        (but(reason="line\nbreak"), "reason: must not contain control characters"),
        (but(reason=7), "reason: must be a string, not a number"),
        (but(actor="a" * 257), "actor: is 257 characters, over 256"),
        (without("expires_at"), "expires_at: missing (an override must expire"),
        (but(expires_at="tomorrow"), "expires_at: 'tomorrow' is not an RFC 3339 time"),
        (but(expires_at="2026-11-26T18:00:00"), "has no time zone"),
        (but(expires_at=1795000000), "expires_at: must be an RFC 3339 time string, not a number"),
        (but(expires_at="2026-12-03T12:00:01Z"), "is more than 7 days ahead"),
        ({"reason": "r", "expires_at": "2026-11-27T00:00:00Z"}, "nothing to override"),
        (but(flags={}, shedding=None, pin=None), "nothing to override"),
        (but(flags={"New_UI": True}), "flags: 'New_UI' is not a flag name"),
        (but(flags={"-x": True}), "flags: '-x' is not a flag name"),
        (but(flags={"new-ui": None}), "flags['new-ui']: null is not a flag value"),
        (but(flags={"new-ui": [1, 2]}), "flags['new-ui']: a list is not a flag value"),
        (but(flags=["new-ui"]), "flags: must be an object of flag name to value, not a list"),
        (but(shedding={"tier": "LOW", "percent": 5}), "shedding.tier: 'LOW' is not a tier"),
        (but(shedding={"tier": 3, "percent": 5}), "shedding.tier: a number is not a tier"),
        (but(shedding={"tier": "SHEDDABLE"}), "shedding.percent: missing"),
        (but(shedding={"percent": 101}), "shedding.percent: 101 is out of range"),
        (but(shedding={"percent": -1}), "shedding.percent: -1 is out of range"),
        (but(shedding={"percent": True}), "shedding.percent: must be a number, not a bool"),
        (but(shedding={"percent": 5, "tiers": "x"}), "shedding: unknown field 'tiers'"),
        (but(shedding=50), "shedding: must be an object"),
        (but(pin="v 1"), "pin: 'v 1' is not a version"),
        (but(pin=142), "pin: must be a version string, not a number"),
        (but(flag={"new-ui": False}), "unknown field 'flag'"),
        ([GOOD], "not a JSON object"),
    ],
)
def test_each_kind_of_malformed_file_is_rejected_naming_the_problem(doc: Any, problem: str) -> None:
    with pytest.raises(OverrideError) as raised:
        parse(doc)
    assert problem in str(raised.value)
    assert not isinstance(raised.value, OverrideExpiredError)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "the file is empty"),
        (b'{"reason": "r",', "not valid JSON"),
        (b'{"reason": "r", "flags": {"a": NaN}}', "not valid JSON: NaN is not a JSON number"),
        (b"\xff\xfe{}", "not UTF-8"),
        (
            b'{"reason": "r", "expires_at": "2026-11-27T00:00:00Z", "flags": {"a": 1, "a": 2}}',
            "key 'a' appears twice",
        ),
        (b"{" + b" " * MAX_FILE_BYTES + b"}", f"over {MAX_FILE_BYTES}"),
        (b"[" * 60_000, "not valid JSON"),
        (
            b'{"reason": "r", "expires_at": "2026-11-27T00:00:00Z", "flags": {"ratio": 1e999}}',
            "flags['ratio']: a number value must be finite",
        ),
        (
            b'{"reason": "r", "expires_at": "2026-11-27T00:00:00Z", "flags": {"o": {"a": 1e999}}}',
            "flags['o']: JSON numbers must be finite",
        ),
    ],
)
def test_unreadable_content_is_rejected_naming_the_problem(data: bytes, problem: str) -> None:
    with pytest.raises(OverrideError) as raised:
        parse_override(data, NOW)
    assert problem in str(raised.value)


def test_an_override_must_expire_in_the_future_and_within_7_days() -> None:
    with pytest.raises(OverrideExpiredError, match="has passed"):
        parse(GOOD, now=datetime(2026, 11, 26, 18, 0, tzinfo=UTC))
    with pytest.raises(OverrideExpiredError):
        parse(but(expires_at="2026-11-26T11:59:59Z"))
    assert parse(but(expires_at="2026-12-03T12:00:00Z")).expires_at == NOW + timedelta(days=7)
    with pytest.raises(OverrideError, match="more than 7 days ahead"):
        parse(but(expires_at="2026-12-03T12:00:00.001Z"))


# ---------------------------------------------------------------- precedence


def meta(expires_at: datetime | None = None) -> t.Meta:
    m = t.Meta(actor="oncall", reason="server side")
    if expires_at is not None:
        m.expires_at.FromDatetime(expires_at)
    return m


def flag(name: str, value: bool | str, *, scope: str = SERVICE, **kw: Any) -> t.Flag:
    v = (
        t.FlagValue(bool_value=value)
        if isinstance(value, bool)
        else t.FlagValue(string_value=value)
    )
    return t.Flag(scope=scope, name=name, value=v, meta=meta(**kw))


def server_state(revision: int = 7, **kw: Any) -> Snapshot:
    msg = agent_pb2.Snapshot(
        revision=revision,
        flags=[
            flag("new-ui", True),
            flag("checkout.mode", "normal"),
            flag("banner", True, scope="global"),
        ],
        shedding=t.Shedding(service=SERVICE, tier="SHEDDABLE", percent=10, meta=meta()),
        pin=t.Pin(service=SERVICE, version="v1.5.0", meta=meta()),
    )
    for f in kw.get("extra", []):
        msg.flags.append(f)
    return snapshot_from_proto(SERVICE, msg, NOW)


def test_the_override_wins_over_the_server_for_what_it_names_only() -> None:
    base = server_state()
    override = parse({**without("flags"), "flags": {"new-ui": False}})
    effective = apply_override(base, override)

    assert effective.flags["new-ui"] is False
    assert effective.flag_scopes["new-ui"] == OVERRIDE_SCOPE
    assert effective.flags["checkout.mode"] == "normal"  # not named: the server's
    assert effective.flags["banner"] is True
    assert effective.shedding is not None
    assert effective.shedding.tier is Criticality.SHEDDABLE_PLUS
    assert should_shed(effective, "SHEDDABLE") is True
    assert should_shed(effective, "SHEDDABLE_PLUS", rand=lambda: 0.49) is True
    assert should_shed(effective, "SHEDDABLE_PLUS", rand=lambda: 0.5) is False
    assert should_shed(effective, "CRITICAL") is False
    shed = sum(should_shed_key(effective, "SHEDDABLE_PLUS", f"user-{i}") for i in range(4000))
    assert 1800 < shed < 2200
    assert effective.pin is not None
    assert (effective.pin.version, effective.pin.reason, effective.pin.expires_at) == (
        "v1.4.2",
        override.reason,
        override.expires_at,
    )
    assert effective.override is override
    assert effective.next_expiry == override.expires_at
    assert effective.revision == base.revision
    # The server's state is untouched, records included (they are what is cached).
    assert base.flags["new-ui"] is True and base.override is None
    assert should_shed(base, "SHEDDABLE_PLUS") is False
    assert effective.flag_records is base.flag_records
    assert apply_override(base, None) is base


def test_an_override_of_flags_only_keeps_the_servers_shedding_and_pin() -> None:
    base = server_state()
    effective = apply_override(base, parse(but(shedding=None, pin=None)))
    assert effective.shedding == base.shedding
    assert (effective.shed_tier, effective.shed_threshold) == (base.shed_tier, base.shed_threshold)
    assert effective.pin == base.pin
    assert effective.flags["checkout.mode"] == "read-only"


def test_the_server_state_keeps_changing_underneath_the_override() -> None:
    override = parse(but(shedding=None, pin=None))
    base = server_state()
    change = agent_pb2.Change(
        revision=8, flags_set=[flag("checkout.mode", "degraded"), flag("beta", True)]
    )
    changed = apply_change(base, change, NOW)
    effective = apply_override(changed, override)
    assert effective.revision == 8
    assert effective.flags["checkout.mode"] == "read-only"  # overridden: not the server's
    assert effective.flags["beta"] is True  # not overridden: the server's, at once
    # The override goes: the server's latest applies.
    assert diff(effective, changed).flags == {
        "checkout.mode": ("read-only", "degraded"),
        "new-ui": (False, True),
    }


def test_the_change_callbacks_hear_of_the_override_coming_and_going() -> None:
    base = server_state()
    override = parse(GOOD)
    effective = apply_override(base, override)
    applied = diff(base, effective)
    assert applied.flags == {
        "new-ui": (True, False),
        "checkout.mode": ("normal", "read-only"),
    }
    assert applied.shedding is not None and applied.pin is not None
    assert applied.override == (None, override)
    assert diff(effective, base).override == (override, None)
    # An override that sets what the server already has still is a change to hear of.
    same = parse({**without("flags"), "flags": {"new-ui": True}, "shedding": None, "pin": None})
    quiet = diff(base, apply_override(base, same))
    assert quiet.flags == {} and quiet.shedding is None and quiet.pin is None
    assert not quiet.empty
    assert diff(effective, apply_override(base, parse(GOOD))).empty  # read anew: equal


def test_the_next_expiry_is_the_earlier_of_the_servers_and_the_overrides() -> None:
    soon = NOW + timedelta(minutes=5)
    base = server_state(extra=[flag("boxed", True, expires_at=soon)])
    override = parse(GOOD)
    assert apply_override(base, override).next_expiry == soon
    late = parse(but(expires_at="2026-11-26T12:01:00Z"))
    assert apply_override(base, late).next_expiry == late.expires_at


# ---------------------------------------------------------------- the path


def test_the_override_path_is_the_argument_else_the_environment_else_beside_the_cache() -> None:
    minimal = {"CONTROLPLANE_SERVICE": "checkout", "CONTROLPLANE_SERVERS": "127.0.0.1:1"}
    env = {**minimal, "CONTROLPLANE_OVERRIDE_PATH": "/etc/cp/override.json"}
    assert resolve_config(override_path="/arg.json", environ=env).override_path == Path("/arg.json")
    assert resolve_config(environ=env).override_path == Path("/etc/cp/override.json")
    cached = resolve_config(cache_path="/var/cache/cp/state.json", environ=minimal)
    assert cached.override_path == Path("/var/cache/cp/state.json.override.json")
    assert resolve_config(environ=minimal).override_path is None
    off = resolve_config(cache_path="/var/cache/cp/state.json", override_path="", environ=minimal)
    assert off.override_path is None


# ---------------------------------------------------------------- the watcher


def write(path: Path, content: Any) -> None:
    """Write the override file as documented: a temporary file, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content if isinstance(content, str) else json.dumps(content))
    os.replace(tmp, path)


def test_the_watcher_reads_the_file_only_when_it_changed(tmp_path: Path) -> None:
    path = tmp_path / "override.json"
    watcher = OverrideFile(path)
    assert watcher.check(NOW) is None  # no file, never was: nothing to say
    write(path, GOOD)
    first = watcher.check(NOW)
    assert first is not None and first.error is None
    assert first.override is not None and first.override.pin == "v1.4.2"
    assert watcher.check(NOW) is None  # unchanged: not read again
    write(path, but(pin="v1.4.3"))
    second = watcher.check(NOW)
    assert second is not None and second.override is not None
    assert second.override.pin == "v1.4.3"
    write(path, "{not json")
    bad = watcher.check(NOW)
    assert bad is not None and bad.override is None
    assert bad.error is not None and "not valid JSON" in str(bad.error)
    assert watcher.check(NOW) is None  # rejected once per change, not at every check
    path.unlink()
    gone = watcher.check(NOW)
    assert gone is not None and (gone.override, gone.error) == (None, None)
    assert watcher.check(NOW) is None
    # Rewritten in place (no rename): the size and time tell.
    path.write_text(json.dumps(GOOD))
    assert watcher.check(NOW) is not None
    with path.open("a") as f:
        f.write("\n\n")
    again = watcher.check(NOW)
    assert again is not None and again.override is not None


# ---------------------------------------------------------------- in the agent


def live(**changes: Any) -> dict[str, Any]:
    """:data:`GOOD` for an agent, which reads the real clock: expiring in six days."""
    return {**GOOD, "expires_at": IN_SIX_DAYS, **changes}


def parse_live(doc: Any) -> Override:
    return parse(doc, now=datetime.now(UTC))


class Changes:
    """The agent's on_change callback, for a test to wait on."""

    def __init__(self) -> None:
        self.seen: list[tuple[datetime, StateChange]] = []
        self._arrived = asyncio.Event()

    def __call__(self, change: StateChange) -> None:
        self.seen.append((datetime.now(UTC), change))
        self._arrived.set()

    async def wait(
        self, check: Callable[[StateChange], bool], within: float, what: str
    ) -> tuple[datetime, StateChange]:
        try:
            async with asyncio.timeout(within):
                while True:
                    for at, change in self.seen:
                        if check(change):
                            return at, change
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(f"no change {what} within {within}s: {self.seen}") from None


def nowhere() -> str:
    """A server address nothing listens on: the control plane is down."""
    return f"127.0.0.1:{free_port()}"


async def test_an_override_applies_without_a_server_and_drops_at_its_expiry(
    tmp_path: Path,
) -> None:
    path = tmp_path / "override.json"
    changes = Changes()
    agent = AsyncAgent(SERVICE, [nowhere()], override_path=path, on_change=changes)
    await agent.start()
    try:
        assert agent.override_active is False
        expires_at = datetime.now(UTC) + timedelta(seconds=2)
        write(path, live(expires_at=expires_at.isoformat()))
        written = datetime.now(UTC)
        at, applied = await changes.wait(lambda c: c.override is not None, 1.5, "applying it")
        assert at - written < timedelta(seconds=1)
        assert agent.override_active is True
        assert agent.state == "CONNECTING"  # no server ever answered
        assert agent.enabled("new-ui", default=True) is False
        assert agent.value("checkout.mode") == "read-only"
        assert agent.should_shed("SHEDDABLE") is True
        assert agent.pinned_version is not None and agent.pinned_version.version == "v1.4.2"
        assert applied.flags == {"new-ui": (None, False), "checkout.mode": (None, "read-only")}

        at, dropped = await changes.wait(
            lambda c: c.override is not None and c.override[1] is None, 5, "expiring it"
        )
        assert expires_at <= at < expires_at + timedelta(seconds=1.5)
        assert dropped.flags == {"new-ui": (False, None), "checkout.mode": ("read-only", None)}
        assert agent.override_active is False and agent.override is None
        assert agent.enabled("new-ui", default=True) is True
        assert agent.should_shed("SHEDDABLE") is False
        assert agent.pinned_version is None
    finally:
        await agent.close()


async def test_a_malformed_file_is_logged_and_never_half_applied(
    tmp_path: Path, agent_log: AgentLog
) -> None:
    path = tmp_path / "override.json"
    write(path, live(flags={"new-ui": False}, shedding=None, pin=None))
    changes = Changes()
    agent = AsyncAgent(SERVICE, [nowhere()], override_path=path, on_change=changes)
    await agent.start()  # a valid file at start: the first reads see it
    try:
        assert agent.override_active is True
        assert agent.enabled("new-ui", default=True) is False
        in_force = agent.override
        # Valid flags, then one bad percentage: nothing of it applies.
        write(path, live(flags={"new-ui": True, "beta": True}, shedding={"percent": 250}))
        record = await agent_log.wait("agent_override_rejected", str(path))
        assert record.levelno == logging.ERROR
        assert "shedding.percent: 250 is out of range" in record.getMessage()
        assert agent.override is in_force
        assert agent.enabled("new-ui", default=True) is False
        assert agent.value("beta") is None
        assert agent.should_shed("SHEDDABLE") is False
        # A file that has expired is refused with a warning (left behind after an incident).
        write(path, live(expires_at="2020-01-01T00:00:00Z"))
        record = await agent_log.wait("agent_override_rejected", "has passed")
        assert record.levelno == logging.WARNING
        assert agent.override is in_force
        # Removing the file drops the override in force.
        path.unlink()
        await changes.wait(lambda c: c.override == (in_force, None), 2, "removing it")
        assert agent.enabled("new-ui", default=True) is True
        overrides = [c.override for _, c in changes.seen if c.override is not None]
        assert overrides == [(None, in_force), (in_force, None)]
    finally:
        await agent.close()


async def test_the_threaded_agent_watches_the_file_in_its_own_thread(tmp_path: Path) -> None:
    path = tmp_path / "override.json"
    arrived = threading.Event()
    seen: list[tuple[str, StateChange]] = []

    def on_change(change: StateChange) -> None:
        seen.append((threading.current_thread().name, change))
        arrived.set()

    agent = Agent(SERVICE, [nowhere()], override_path=path, on_change=on_change)
    await asyncio.to_thread(agent.start)
    try:
        write(path, live(flags={"new-ui": False}, shedding=None, pin=None))
        assert await asyncio.to_thread(arrived.wait, 2), "not applied within 2 s"
        assert agent.override_active is True
        assert agent.enabled("new-ui", default=True) is False
        [(thread, change)] = seen
        assert thread == "controlplane-agents"  # the thread every Agent shares
        assert change.flags == {"new-ui": (None, False)}
    finally:
        await asyncio.to_thread(agent.close)


def inotify_fds() -> set[int]:
    """This process's open inotify instances (the agent's file watch is one)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, gone
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:inotify":
                found.add(int(name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify: Linux only")
async def test_a_file_written_after_start_applies_at_once_even_in_a_directory_made_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A look every minute where it cannot watch: only the watch can be in time here.
    monkeypatch.setattr(agents._filewatch, "FALLBACK_INTERVAL", 60.0)
    path = tmp_path / "run" / "override.json"  # no such directory yet
    before = inotify_fds()
    changes = Changes()
    agent = AsyncAgent(SERVICE, [nowhere()], override_path=path, on_change=changes)
    await agent.start()
    try:
        path.parent.mkdir(mode=0o700)
        write(path, live(flags={"new-ui": False}, shedding=None, pin=None))
        written = datetime.now(UTC)
        at, _ = await changes.wait(lambda c: c.override is not None, 5, "applying it")
        # Woken by the file's directory, not by a poll (which would wait a minute).
        assert at - written < timedelta(seconds=5)
        assert agent.enabled("new-ui", default=True) is False
        assert len(inotify_fds() - before) == 1  # the agent's one watch
    finally:
        await agent.close()
    assert inotify_fds() == before  # closed with the agent


async def test_a_file_caught_half_written_is_rejected_then_applied_when_complete(
    tmp_path: Path, agent_log: AgentLog
) -> None:
    path = tmp_path / "override.json"
    changes = Changes()
    agent = AsyncAgent(SERVICE, [nowhere()], override_path=path, on_change=changes)
    await agent.start()
    try:
        data = json.dumps(live(flags={"new-ui": False}, shedding=None, pin=None)).encode()
        with path.open("wb") as f:  # in place, not as documented
            f.write(data[:20])
            f.flush()
            await agent_log.wait("agent_override_rejected", "not valid JSON")
            assert agent.override_active is False
            f.write(data[20:])
        await changes.wait(lambda c: c.override is not None, 5, "applying it complete")
        assert agent.enabled("new-ui", default=True) is False
    finally:
        await agent.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify: Linux only")
async def test_a_configmap_volume_update_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its files are links (override.json -> ..data/override.json, ..data -> ..<time>):
    # read only with insecure permissions allowed. An update swaps ..data.
    monkeypatch.setenv("CONTROLPLANE_OVERRIDE_INSECURE_PERMISSIONS", "1")
    volume = tmp_path / "volume"
    (volume / "..v1").mkdir(parents=True)
    (volume / "..v1" / "override.json").write_text(
        json.dumps(live(flags={"new-ui": False}, shedding=None, pin=None))
    )
    (volume / "..data").symlink_to("..v1")
    path = volume / "override.json"
    path.symlink_to("..data/override.json")
    changes = Changes()
    agent = AsyncAgent(SERVICE, [nowhere()], override_path=path, on_change=changes)
    await agent.start()
    try:
        assert agent.enabled("new-ui", default=True) is False
        (volume / "..v2").mkdir()
        (volume / "..v2" / "override.json").write_text(
            json.dumps(live(flags={"new-ui": True}, shedding=None, pin=None))
        )
        (volume / "..data_tmp").symlink_to("..v2")
        os.replace(volume / "..data_tmp", volume / "..data")
        shutil.rmtree(volume / "..v1")
        await changes.wait(
            lambda c: c.flags.get("new-ui") == (False, True), 5, "applying the update"
        )
        assert agent.enabled("new-ui", default=False) is True
    finally:
        await agent.close()


# ---------------------------------------------------------------- reporting


class Recorder(agent_pb2_grpc.AgentServiceServicer):
    """A Sync server that answers every Hello with an empty snapshot and records
    what each connection sends."""

    def __init__(self) -> None:
        self.hellos: list[agent_pb2.Hello] = []
        self.overrides: list[agent_pb2.Override] = []
        self._arrived = asyncio.Event()

    async def Sync(self, request_iterator: Any, context: Any) -> None:
        first = await anext(request_iterator)
        self.hellos.append(first.hello)
        self._arrived.set()
        await context.write(agent_pb2.SyncResponse(snapshot=agent_pb2.Snapshot(revision=1)))
        async for request in request_iterator:
            if request.WhichOneof("message") == "override":
                self.overrides.append(request.override)
                self._arrived.set()

    async def wait(self, check: Callable[[], bool], what: str, within: float = 10.0) -> None:
        try:
            async with asyncio.timeout(within):
                while not check():
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(
                f"no {what} within {within}s: hellos {self.hellos}, overrides {self.overrides}"
            ) from None


async def serve(recorder: Recorder, address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_the_override_goes_in_the_hello_and_each_change_is_reported(
    tmp_path: Path,
) -> None:
    path = tmp_path / "override.json"
    write(path, live())
    recorder = Recorder()
    server, address = await serve(recorder)
    agent = AsyncAgent(SERVICE, [address], override_path=path, instance_id="host-7")
    await agent.start()
    try:
        assert await agent.wait_ready(10)
        await recorder.wait(lambda: bool(recorder.hellos), "hello")
        [hello] = recorder.hellos
        first = parse_live(live())
        assert hello.HasField("override")
        assert hello.override.active is True
        assert (hello.override.actor, hello.override.reason) == (first.actor, first.reason)
        assert hello.override.expires_at.ToDatetime(tzinfo=UTC) == first.expires_at
        assert (hello.override.content_json, hello.override.digest) == (
            first.content_json,
            first.digest,
        )
        write(path, live(pin="v1.4.3"))
        await recorder.wait(lambda: len(recorder.overrides) >= 1, "replacement report")
        path.unlink()
        await recorder.wait(lambda: len(recorder.overrides) >= 2, "removal report")
        replaced, removed = recorder.overrides
        second = parse_live(live(pin="v1.4.3"))
        assert (replaced.active, replaced.digest) == (True, second.digest)
        assert (removed.active, removed.digest) == (False, second.digest)
        assert "the override file was removed" in removed.reason
    finally:
        await agent.close()
        await server.stop(0)


async def test_an_override_that_came_and_went_while_no_server_answered_is_reported_after(
    tmp_path: Path,
) -> None:
    path = tmp_path / "override.json"
    port = free_port()
    changes = Changes()
    agent = AsyncAgent(
        SERVICE, [f"127.0.0.1:{port}"], override_path=path, instance_id="host-7", on_change=changes
    )
    await agent.start()
    recorder = Recorder()
    server: grpc.aio.Server | None = None
    try:
        write(path, live(pin=None, shedding=None))
        gone = parse_live(live(pin=None, shedding=None))
        await changes.wait(lambda c: c.override == (None, gone), 2, "applying the first")
        path.unlink()
        await changes.wait(lambda c: c.override == (gone, None), 2, "removing it")
        write(path, live(flags=None, shedding=None))
        current = parse_live(live(flags=None, shedding=None))
        await changes.wait(lambda c: c.override == (None, current), 2, "applying the second")
        assert not recorder.hellos  # nothing listened yet
        server, _ = await serve(recorder, f"127.0.0.1:{port}")
        assert await agent.wait_ready(15)
        await recorder.wait(lambda: len(recorder.overrides) >= 3, "the queued reports")
        # Not in the Hello: the server hears of them in the order they happened.
        assert not recorder.hellos[0].HasField("override")
        assert [(o.active, o.digest) for o in recorder.overrides] == [
            (True, gone.digest),
            (False, gone.digest),
            (True, current.digest),
        ]
    finally:
        await agent.close()
        if server is not None:
            await server.stop(0)


async def test_a_change_the_folder_watch_cannot_see_is_applied_at_the_next_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file rewritten in place through a hard link in another folder: no event in
    the folder watched (as a write on another NFS client), yet applied within
    OVERRIDE_RECHECK."""
    monkeypatch.setattr(agents._client_state, "OVERRIDE_RECHECK", 0.3)
    watched, elsewhere = tmp_path / "watched", tmp_path / "elsewhere"
    watched.mkdir()
    elsewhere.mkdir()
    path = watched / "override.json"
    changes = Changes()
    agent = AsyncAgent(SERVICE, [nowhere()], override_path=path, on_change=changes)
    await agent.start()
    try:
        # Written as documented, after start: applied, so the watch is in place.
        write(path, live(flags={"new-ui": False}, shedding=None, pin=None))
        await changes.wait(lambda c: "new-ui" in c.flags, 5, "from the file")
        os.link(path, elsewhere / "same-file.json")
        # In place, through the other name: same inode, new size and time.
        with (elsewhere / "same-file.json").open("r+") as f:
            f.truncate(0)
            f.write(
                json.dumps(live(flags={"new-ui": False, "mode": "lite"}, shedding=None, pin=None))
            )
        await changes.wait(lambda c: "mode" in c.flags, 5, "from the rewritten file")
        assert agent.value("mode") == "lite"
    finally:
        await agent.close()
