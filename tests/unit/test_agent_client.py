"""The agent's client without etcd: backoff, configuration, the cache file, and the
protocol paths a real server never takes.

For the last, a scripted Sync server on loopback stands in for the control
server (our own protocol, hand-written): it sends what a test tells it to
(malformed records, stale revisions, an older snapshot, a dropped stream) and
records the hellos and acks it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import random
import re
import socket
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

import agents._agent
import agents._client
import controlplane
from agents import Agent, AgentConfigError, AgentState, AsyncAgent, Backoff, StateChange
from agents._agent import _after_fork_plan, _AfterFork, _StopRequest
from agents._atomic import write_atomic
from agents._cache import CacheWriter, lock_path, read_cache, snapshot_to_cache
from agents._codec import snapshot_from_proto
from agents._config import default_instance_id, forked_config, resolve_config
from agents._state import Snapshot
from controlplane.api.v1 import agent_pb2, agent_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from tests.helpers.certs import TestCA

# ---------------------------------------------------------------- backoff


def test_backoff_bounds_grow_from_50_ms_and_are_capped_at_1_s() -> None:
    highest = Backoff(rand=lambda: 0.999999)
    delays = [highest.next() for _ in range(10)]
    bounds = [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0]
    for delay, bound in zip(delays, bounds, strict=True):
        assert bound * 0.9999 < delay < bound
    lowest = Backoff(rand=lambda: 0.0)
    assert [lowest.next() for _ in range(10)] == [0.0] * 10


def test_backoff_is_full_jitter_within_its_bounds_and_resets() -> None:
    rng = random.Random(7)
    backoff = Backoff(rand=rng.random)
    delays = [backoff.next() for _ in range(2000)]
    assert all(0 <= d < min(1.0, 0.05 * 2 ** min(i, 10)) for i, d in enumerate(delays))
    capped = delays[10:]
    # Full jitter: spread over the whole range, not clustered near the bound.
    assert min(capped) < 0.05 and max(capped) > 0.95
    assert 0.45 < sum(capped) / len(capped) < 0.55
    backoff.reset()
    assert backoff.bound() == 0.05
    assert backoff.next() < 0.05
    assert Backoff(rand=rng.random).bound() == 0.05
    assert huge_attempt_bound() == 1.0


def huge_attempt_bound() -> float:
    backoff = Backoff()
    backoff.attempt = 10_000
    return backoff.bound()


# ---------------------------------------------------------------- configuration

ENV = {
    "CONTROLPLANE_SERVICE": "from-env",
    "CONTROLPLANE_SERVERS": "10.0.0.5:50051, 10.0.0.6:50051",
    "CONTROLPLANE_VERSION": "v-env",
    "CONTROLPLANE_INSTANCE_ID": "env-instance",
    "CONTROLPLANE_CACHE_PATH": "/var/cache/env.json",
    "CONTROLPLANE_INSECURE": "true",
}


def test_configuration_comes_from_arguments_before_the_environment() -> None:
    config = resolve_config(
        service="checkout",
        servers=["127.0.0.1:1"],
        version="v-arg",
        instance_id="arg-instance",
        cache_path="/tmp/arg.json",
        environ=ENV,
    )
    assert config.service == "checkout"
    assert config.servers == ("127.0.0.1:1",)
    assert config.version == "v-arg"
    assert config.instance_id == "arg-instance"
    assert config.cache_path == Path("/tmp/arg.json")
    assert config.instance_id_generated is False


def test_configuration_falls_back_to_the_environment_then_defaults() -> None:
    config = resolve_config(environ=ENV)
    assert config.service == "from-env"
    assert config.servers == ("10.0.0.5:50051", "10.0.0.6:50051")
    assert config.version == "v-env"
    assert config.instance_id == "env-instance"
    assert config.cache_path == Path("/var/cache/env.json")
    assert config.security.insecure is True  # plaintext to 10.0.0.5 asked for

    minimal = {"CONTROLPLANE_SERVICE": "checkout", "CONTROLPLANE_SERVERS": "localhost:1"}
    config = resolve_config(environ={**minimal, "CONTROLPLANE_VERSION": "  "})
    assert config.version == ""  # an empty variable is unset: the default
    assert config.cache_path is None
    assert config.instance_id_generated is True
    assert f"-{os.getpid()}-" in config.instance_id


def test_the_agent_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    agent = Agent(version="v-arg")
    assert (agent.service, agent.instance_id) == ("from-env", "env-instance")
    assert agent._client.config.version == "v-arg"
    assert agent.state is AgentState.CONNECTING
    assert agent.value("anything", 3) == 3
    # Reads never raise, whatever they are given.
    assert agent.should_shed(["x"]) is False  # type: ignore[arg-type]
    assert agent.should_shed({"a": 1}, key=object()) is False  # type: ignore[arg-type]
    assert agent.enabled(["x"], default=True) is True  # type: ignore[arg-type]
    assert agent.value({"x": 1}, "d") == "d"  # type: ignore[call-overload]
    agent.close()  # never started: harmless


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"servers": ["h:1"]}, "no service: pass service=... or set CONTROLPLANE_SERVICE"),
        ({"service": "checkout"}, "no servers: pass servers=[...] or set CONTROLPLANE_SERVERS"),
        ({"service": "checkout", "servers": [" ", ""]}, "servers is empty"),
        ({"service": "Check_out", "servers": ["h:1"]}, "is not a DNS label"),
        ({"service": "checkout", "servers": ["h"]}, "'h' is not host:port"),
        ({"service": "checkout", "servers": ["h:99999"]}, "is not host:port"),
        ({"service": "c", "servers": ["h:1"], "instance_id": "-x"}, "instance_id '-x' is invalid"),
    ],
)
def test_a_missing_or_invalid_setting_is_a_clear_error(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(AgentConfigError, match=re.escape(message)):
        resolve_config(environ={}, **kwargs)


def test_server_targets_may_be_grpc_uris() -> None:
    config = resolve_config(
        service="c", servers="dns:///cp.internal:50051,unix:/run/cp.sock", insecure=True
    )
    assert config.servers == ("dns:///cp.internal:50051", "unix:/run/cp.sock")


# ---------------------------------------------------------------- connection security

SECRET = "agent-secret-token-0123456789"


@pytest.fixture
def pki(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


def test_connection_settings_come_from_arguments_before_the_environment(
    pki: TestCA, tmp_path: Path
) -> None:
    client = pki.issue("client")
    other = pki.issue("other")
    token_file = tmp_path / "token"
    token_file.write_text(SECRET)
    env = {
        "CONTROLPLANE_SERVICE": "checkout",
        "CONTROLPLANE_SERVERS": "cp.internal:443",
        "CONTROLPLANE_TOKEN_FILE": str(token_file),
        "CONTROLPLANE_TLS": "1",
        "CONTROLPLANE_TLS_CA": str(pki.cert),
        "CONTROLPLANE_TLS_CLIENT_CERT": str(client.cert),
        "CONTROLPLANE_TLS_CLIENT_KEY": str(client.key),
        "CONTROLPLANE_TLS_SERVER_NAME": "cp.example",
    }
    from_env = resolve_config(environ=env).security
    assert from_env.token is None and from_env.token_file == token_file
    assert (from_env.tls, from_env.ca, from_env.cert, from_env.key) == (
        True,
        pki.cert,
        client.cert,
        client.key,
    )
    assert from_env.server_name == "cp.example"
    assert from_env.insecure is False
    assert from_env.metadata() == (("authorization", f"Bearer {SECRET}"),)

    from_arguments = resolve_config(
        environ=env,
        token="Bearer other-token-42",  # an argument for the token leaves the file aside
        tls=False,
        tls_cert=other.cert,
        tls_key=other.key,
        tls_server_name="cp.other",
    ).security
    assert from_arguments.token == "other-token-42" and from_arguments.token_file is None
    assert (from_arguments.cert, from_arguments.key) == (other.cert, other.key)
    assert from_arguments.tls is False and from_arguments.uses_tls  # the CA still asks for it
    assert from_arguments.server_name == "cp.other"
    assert from_arguments.metadata() == (("authorization", "Bearer other-token-42"),)


def test_without_connection_settings_plaintext_to_loopback_and_no_token() -> None:
    config = resolve_config(service="checkout", servers="127.0.0.1:1,[::1]:2", environ={})
    assert config.security.uses_tls is False
    assert config.security.metadata() == ()


@pytest.mark.parametrize(
    ("servers", "bad"),
    [
        ("10.0.0.5:50051", "10.0.0.5:50051"),
        ("127.0.0.1:1,cp.internal:50051", "cp.internal:50051"),
        # One target of several addresses (a list: a string is split at commas).
        (["ipv4:127.0.0.1:1,10.0.0.1:1"], "ipv4:127.0.0.1:1,10.0.0.1:1"),
    ],
)
def test_plaintext_to_a_server_off_loopback_needs_insecure(
    servers: str | list[str], bad: str
) -> None:
    with pytest.raises(AgentConfigError) as refused:
        resolve_config(service="checkout", servers=servers, environ={})
    message = str(refused.value)
    assert message.startswith(f"server {bad} is not on loopback")
    for named in ("tls_ca/CONTROLPLANE_TLS_CA", "tls/CONTROLPLANE_TLS", "insecure/"):
        assert named in message
    assert "CONTROLPLANE_INSECURE" in message
    # Told: argument or variable.
    insecure = resolve_config(service="checkout", servers=servers, insecure=True, environ={})
    assert insecure.security.insecure
    env = {"CONTROLPLANE_INSECURE": "yes"}
    assert resolve_config(service="checkout", servers=servers, environ=env).security.insecure
    # TLS needs no permission.
    assert resolve_config(service="checkout", servers=servers, tls=True, environ={}).security


@pytest.mark.parametrize(
    ("settings", "env", "message"),
    [
        (
            {"token": SECRET},
            {"CONTROLPLANE_TOKEN_FILE": "/x"},
            None,  # the argument wins: no conflict
        ),
        (
            {},
            {"CONTROLPLANE_TOKEN": SECRET, "CONTROLPLANE_TOKEN_FILE": "/x"},
            "give token/CONTROLPLANE_TOKEN or token_file/CONTROLPLANE_TOKEN_FILE, not both",
        ),
        ({"token": "two words"}, {}, "token/CONTROLPLANE_TOKEN must be visible ASCII"),
        ({}, {"CONTROLPLANE_TOKEN": "a\x01b"}, "token/CONTROLPLANE_TOKEN must be visible"),
        (
            {"tls_ca": "/nonexistent/ca.pem"},
            {},
            "cannot read tls_ca/CONTROLPLANE_TLS_CA /nonexistent/ca.pem (CA certificates): "
            "No such file or directory",
        ),
        (
            {"token_file": "/nonexistent/token"},
            {},
            "cannot read token_file/CONTROLPLANE_TOKEN_FILE /nonexistent/token",
        ),
        ({}, {"CONTROLPLANE_TLS": "maybe"}, "CONTROLPLANE_TLS must be 1/true/yes/on"),
        ({}, {"CONTROLPLANE_INSECURE": "2"}, "CONTROLPLANE_INSECURE must be 1/true/yes/on"),
        (
            {"insecure": True, "tls": True},
            {},
            "insecure/CONTROLPLANE_INSECURE (plaintext) contradicts tls/CONTROLPLANE_TLS",
        ),
        (
            {"tls_server_name": "cp.internal"},
            {},
            "tls_server_name/CONTROLPLANE_TLS_SERVER_NAME applies to TLS only",
        ),
    ],
)
def test_connection_settings_are_checked_at_construction_naming_the_setting(
    settings: dict[str, Any], env: dict[str, str], message: str | None
) -> None:
    def resolve() -> Any:
        return resolve_config(service="checkout", servers="127.0.0.1:1", environ=env, **settings)

    if message is None:
        assert resolve().security.token == SECRET
        return
    with pytest.raises(AgentConfigError, match=re.escape(message)) as refused:
        resolve()
    assert SECRET not in str(refused.value)


def test_a_client_certificate_needs_its_key(pki: TestCA) -> None:
    client = pki.issue("client")
    with pytest.raises(AgentConfigError, match=re.escape("tls_cert/CONTROLPLANE_TLS_CLIENT_CERT")):
        resolve_config(service="c", servers="127.0.0.1:1", tls_cert=client.cert, environ={})
    env = {"CONTROLPLANE_TLS_CLIENT_KEY": str(client.key)}
    with pytest.raises(AgentConfigError, match="needs its certificate"):
        resolve_config(service="c", servers="127.0.0.1:1", environ=env)
    both = resolve_config(service="c", servers="cp.internal:443", tls_cert=client.cert, environ=env)
    assert both.security.uses_tls and both.security.key == client.key


def test_the_config_and_the_agent_never_show_the_token() -> None:
    config = resolve_config(service="c", servers="127.0.0.1:1", token=SECRET, environ={})
    assert SECRET not in repr(config)
    agent = AsyncAgent("c", ["127.0.0.1:1"], token=SECRET)
    assert SECRET not in repr(agent._client.config)
    assert agent._client.config.security.token == SECRET


def test_the_agents_take_the_connection_settings(pki: TestCA, tmp_path: Path) -> None:
    client = pki.issue("client")
    token_file = tmp_path / "token"
    token_file.write_text(SECRET)
    settings: dict[str, Any] = {
        "token_file": token_file,
        "tls_ca": pki.cert,
        "tls_cert": client.cert,
        "tls_key": client.key,
        "tls_server_name": "cp.internal",
    }
    threaded = Agent("checkout", ["10.0.0.5:443"], **settings)
    asynchronous = AsyncAgent("checkout", ["10.0.0.5:443"], **settings)
    for agent in (threaded, asynchronous):
        security = agent._client.config.security
        assert (security.token_file, security.ca, security.cert, security.key) == (
            token_file,
            pki.cert,
            client.cert,
            client.key,
        )
        assert security.server_name == "cp.internal"
    threaded.close()
    with pytest.raises(AgentConfigError, match="is not on loopback"):
        Agent("checkout", ["10.0.0.5:50051"])
    with pytest.raises(AgentConfigError, match="is not on loopback"):
        AsyncAgent("checkout", ["10.0.0.5:50051"])
    assert Agent("checkout", ["10.0.0.5:50051"], insecure=True)._client.config.security.insecure


INSTANCE_RE = r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}"


def test_default_instance_ids_are_valid_and_distinct() -> None:
    ids = {default_instance_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(INSTANCE_RE, i) for i in ids)


def test_a_forked_child_appends_its_pid_to_a_given_instance_id() -> None:
    from_argument = resolve_config(
        service="checkout", servers="127.0.0.1:1", instance_id="web-1", environ={}
    )
    env = {"CONTROLPLANE_INSTANCE_ID": "web-1"}
    from_env = resolve_config(service="checkout", servers="127.0.0.1:1", environ=env)
    for parent in (from_argument, from_env):
        # The process that made the agent uses the id as given.
        assert (parent.instance_id, parent.instance_id_given) == ("web-1", "web-1")
        child = forked_config(parent, 4242)
        assert (child.instance_id, child.instance_id_given) == ("web-1-4242", "web-1")
        assert not child.instance_id_generated
        assert parent.instance_id == "web-1"  # the parent's own is left as it is
        # A grandchild: the given id and its own pid, not its parent's id extended.
        assert forked_config(child, 77).instance_id == "web-1-77"
        assert (child.service, child.servers, child.cache_path) == (
            parent.service,
            parent.servers,
            parent.cache_path,
        )


def test_a_forked_child_id_stays_valid_at_the_longest_given_id() -> None:
    longest = "a" * 127 + "Z"
    parent = resolve_config(service="c", servers="[::1]:1", instance_id=longest, environ={})
    child = forked_config(parent, 4194304)
    assert len(child.instance_id) == 128
    assert child.instance_id == "a" * 120 + "-4194304"
    assert re.fullmatch(INSTANCE_RE, child.instance_id)
    assert forked_config(child, 5).instance_id == longest[:126] + "-5"


def test_a_forked_child_makes_a_default_id_anew() -> None:
    parent = resolve_config(service="c", servers="localhost:1", environ={})
    child = forked_config(parent, 4242)
    assert child.instance_id_generated and child.instance_id_given == ""
    assert "-4242-" in child.instance_id and child.instance_id != parent.instance_id
    assert re.fullmatch(INSTANCE_RE, child.instance_id)


# ---------------------------------------------------------------- cache


def now() -> datetime:
    return datetime.now(UTC)


def meta(expires_in: float | None = None, **kw: Any) -> t.Meta:
    msg = t.Meta(actor="oncall", reason="test", **kw)
    msg.set_at.FromDatetime(now())
    if expires_in is not None:
        msg.expires_at.FromDatetime(now() + timedelta(seconds=expires_in))
    return msg


def flag(name: str, value: Any, *, scope: str = "checkout", **kw: Any) -> t.Flag:
    if isinstance(value, bool):
        v = t.FlagValue(bool_value=value)
    else:
        v = t.FlagValue(string_value=value)
    return t.Flag(scope=scope, name=name, value=v, meta=meta(**kw))


def snapshot_msg(revision: int, *flags: t.Flag) -> agent_pb2.SyncResponse:
    return agent_pb2.SyncResponse(snapshot=agent_pb2.Snapshot(revision=revision, flags=flags))


def change_msg(revision: int, *flags: t.Flag) -> agent_pb2.SyncResponse:
    return agent_pb2.SyncResponse(change=agent_pb2.Change(revision=revision, flags_set=flags))


def test_a_cache_write_replaces_the_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "cache.json"
    write_atomic(path, b"first")
    assert path.read_bytes() == b"first"
    inode = path.stat().st_ino
    with path.open("rb") as reader:
        write_atomic(path, b"second, longer")
        # A reader of the old file still sees all of it: a new file was renamed over it.
        assert reader.read() == b"first"
    assert path.read_bytes() == b"second, longer"
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache.json"]


def test_a_failed_cache_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "cache.json"
    target.mkdir()  # os.replace of a file over a directory fails after the write
    with pytest.raises(IsADirectoryError):
        write_atomic(target, b"data")
    assert target.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]


def state(revision: int, *flags: t.Flag, service: str = "checkout") -> Snapshot:
    msg = agent_pb2.Snapshot(revision=revision, flags=flags)
    return snapshot_from_proto(service, msg, now())


def cached_revision(path: Path) -> int:
    revision: int = json.loads(path.read_bytes())["revision"]
    return revision


def test_the_cache_writer_never_goes_back_and_logs_failures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.json"
    writer = CacheWriter(path)
    older = state(5, flag("a", True))
    newer = state(3, flag("a", False))
    assert writer.write(older, 1)
    # A lower revision applied later (the server's store went back): written.
    assert writer.write(newer, 2, replace_newer=True)
    assert not writer.write(older, 1)  # a write that lost the race: skipped
    cached = read_cache(path, "checkout", now())
    assert cached is not None and cached.revision == 3 and cached.flags == {"a": False}

    caplog.set_level(logging.WARNING, logger="agents")
    directory = tmp_path / "a-directory"
    directory.mkdir()
    broken = CacheWriter(directory)  # cannot be replaced by a file
    assert not broken.write(newer, 1)
    assert any("agent_cache_write_failed" in r.getMessage() for r in caplog.records)


def test_processes_sharing_a_cache_path_never_replace_a_newer_revision(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    # Two workers' writers: each has its own sequence, the file is shared.
    first, second = CacheWriter(path), CacheWriter(path)
    assert first.write(state(7, flag("mode", "lite")), 1)
    assert not second.write(state(5, flag("mode", "full")), 1)  # behind: skipped
    assert cached_revision(path) == 7
    assert second.write(state(9, flag("mode", "off")), 2)
    assert not first.write(state(8), 2)
    assert cached_revision(path) == 9
    # An equal revision is the same state: written (harmless).
    assert first.write(state(9, flag("mode", "off")), 3)
    # The server's store went back (an older snapshot): it replaces the file.
    assert second.write(state(4, flag("mode", "restored")), 3, replace_newer=True)
    assert cached_revision(path) == 4
    # Another service's (a misconfigured shared path) or a corrupt file protects nothing.
    write_atomic(path, snapshot_to_cache(state(99, service="payments")))
    assert first.write(state(10), 4)
    path.write_bytes(b'{"format": 1, "revision": 1000')
    assert second.write(state(11), 4)
    assert cached_revision(path) == 11
    # Nor does a file no agent would boot from, whatever revision it claims.
    doc = json.loads(snapshot_to_cache(state(12)))
    path.write_text(json.dumps({**doc, "revision": 2**63}))
    assert first.write(state(12), 5)
    path.write_text(json.dumps({**doc, "revision": 500, "records": {"flags": "nope"}}))
    assert second.write(state(13), 5)
    assert cached_revision(path) == 13
    assert lock_path(path) == tmp_path / "cache.json.lock" and lock_path(path).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json", "cache.json.lock"]


def test_a_cache_write_waits_for_the_lock_and_checks_the_file_under_it(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    writer = CacheWriter(path)
    assert writer.write(state(3), 1)
    result: list[bool] = []
    fd = os.open(lock_path(path), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process writing
        thread = threading.Thread(target=lambda: result.append(writer.write(state(7), 2)))
        thread.start()
        thread.join(0.3)
        assert thread.is_alive() and result == []  # blocked on the lock
        # What the other process writes while holding the lock...
        write_atomic(path, snapshot_to_cache(state(9)))
    finally:
        os.close(fd)
    thread.join(10)
    # ... is what the waiting writer finds once it has the lock: newer, kept.
    assert result == [False]
    assert cached_revision(path) == 9


def test_reading_a_cache_missing_corrupt_or_for_another_service(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agents")
    path = tmp_path / "cache.json"
    assert read_cache(path, "checkout", now()) is None
    assert caplog.records == []  # no cache yet is normal: no warning

    path.write_bytes(b'{"format": 1, "serv')
    assert read_cache(path, "checkout", now()) is None
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "agent_cache_corrupt" in record.getMessage() and "not JSON" in record.getMessage()

    snap = snapshot_from_proto(
        "checkout",
        snapshot_msg(9, flag("mode", "lite"), flag("new-ui", True, scope="global")).snapshot,
        now(),
    )
    path.write_bytes(snapshot_to_cache(snap))
    assert read_cache(path, "payments", now()) is None
    assert "for service 'checkout'" in caplog.records[-1].getMessage()
    loaded = read_cache(path, "checkout", now())
    assert loaded is not None
    assert (loaded.revision, dict(loaded.flags)) == (9, {"mode": "lite", "new-ui": True})


def test_a_cache_with_a_revision_beyond_int64_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agents")
    path = tmp_path / "cache.json"
    doc = json.loads(snapshot_to_cache(state(9, flag("mode", "lite"))))
    doc["revision"] = 2**63
    path.write_text(json.dumps(doc))
    assert read_cache(path, "checkout", now()) is None
    [warning] = [r.getMessage() for r in caplog.records]
    assert "agent_cache_corrupt" in warning and "9223372036854775808" in warning
    agent = Agent("checkout", ["127.0.0.1:1"], cache_path=path)
    agent.start()  # no exception: the file is ignored
    try:
        assert agent.state is AgentState.CONNECTING
        assert agent.revision == 0
    finally:
        agent.close()


def test_a_cached_time_boxed_change_expires_when_the_cache_is_read(tmp_path: Path) -> None:
    boxed = flag("mode", "degraded", expires_in=0.2)
    boxed.replaced.CopyFrom(flag("mode", "full"))
    snap = snapshot_from_proto("checkout", snapshot_msg(4, boxed).snapshot, now())
    path = tmp_path / "cache.json"
    path.write_bytes(snapshot_to_cache(snap))
    early = read_cache(path, "checkout", now())
    late = read_cache(path, "checkout", now() + timedelta(seconds=1))
    assert early is not None and early.flags["mode"] == "degraded"
    assert late is not None and late.flags["mode"] == "full"


# ---------------------------------------------------------------- the protocol, scripted


class WaitAck:
    """A script step: wait until the agent acked (or nacked) ``revision`` on this
    connection."""

    def __init__(self, revision: int) -> None:
        self.revision = revision


class Gate:
    """A script step: wait until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    def open(self) -> None:
        self.opened.set()


Step = agent_pb2.SyncResponse | WaitAck | Gate | str  # "abort": drop the stream (UNAVAILABLE)
Ack = tuple[int, str]


class ScriptedSync(agent_pb2_grpc.AgentServiceServicer):
    """Plays one script per connection, then holds the stream open until the agent
    closes its side (as the real server does) or goes."""

    def __init__(self, *scripts: list[Step]) -> None:
        self.scripts = list(scripts)
        self.hellos: list[agent_pb2.Hello] = []
        self.acks: list[Ack] = []
        self.connection_acks: list[list[Ack]] = []
        """The acks of each connection, in the order of ``hellos``."""
        self._changed = asyncio.Condition()

    async def Sync(self, request_iterator: Any, context: Any) -> None:
        first = await anext(request_iterator)
        acks: list[Ack] = []
        async with self._changed:
            self.hellos.append(first.hello)
            self.connection_acks.append(acks)
            self._changed.notify_all()
        script = self.scripts.pop(0) if self.scripts else []
        reader = asyncio.create_task(self._read(request_iterator, acks))
        try:
            for step in script:
                if isinstance(step, WaitAck):
                    await self._wait(functools.partial(_find, acks, step.revision))
                elif isinstance(step, Gate):
                    await step.opened.wait()
                elif step == "abort":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted drop")
                elif isinstance(step, agent_pb2.SyncResponse):
                    await context.write(step)
            await reader  # the agent closed its side: the stream ends
        finally:
            reader.cancel()

    async def _read(self, request_iterator: Any, acks: list[Ack]) -> None:
        async for request in request_iterator:
            if request.WhichOneof("message") == "ack":
                async with self._changed:
                    ack = (request.ack.revision, request.ack.rejected_reason)
                    acks.append(ack)
                    self.acks.append(ack)
                    self._changed.notify_all()

    async def _wait(self, found: Callable[[], Any], within: float = 10.0) -> Any:
        async with asyncio.timeout(within), self._changed:
            while True:
                result = found()
                if result is not None:
                    return result
                await self._changed.wait()

    async def wait_ack(self, revision: int, within: float = 10.0) -> Ack:
        """The first ack (or nack) of ``revision`` on any connection."""
        ack: Ack = await self._wait(lambda: _find(self.acks, revision), within)
        return ack

    async def wait_hellos(self, count: int, within: float = 10.0) -> None:
        """Until ``count`` connections said hello."""
        await self._wait(lambda: True if len(self.hellos) >= count else None, within)


def _find(acks: list[Ack], revision: int) -> Ack | None:
    return next((ack for ack in acks if ack[0] == revision), None)


async def serve(
    servicer: ScriptedSync, address: str = "127.0.0.1:0"
) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, f"127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def running(
    servicer: ScriptedSync,
    setup: Callable[[AsyncAgent], object] = lambda agent: None,
    **kwargs: Any,
) -> AsyncIterator[AsyncAgent]:
    """An AsyncAgent (``setup`` called before its start) on a scripted server."""
    server, address = await serve(servicer)
    agent = AsyncAgent("checkout", [address], version="v9", instance_id="i-1", **kwargs)
    setup(agent)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.close()
        await server.stop(0)


class LogEvents(logging.Handler):
    """Lets a test wait for the agent's log events (from any thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.DEBUG)
        self.loop = loop
        self.messages: list[str] = []
        self._arrived = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.loop.call_soon_threadsafe(self._add, record.getMessage())

    def _add(self, message: str) -> None:
        self.messages.append(message)
        self._arrived.set()

    async def wait_for(self, event: str, within: float = 10.0) -> str:
        async with asyncio.timeout(within):
            while True:
                for message in self.messages:
                    if message.startswith(event):
                        return message
                self._arrived.clear()
                await self._arrived.wait()

    async def wait_count(self, event: str, count: int, within: float = 10.0) -> None:
        """Until ``count`` messages have started with ``event``."""
        async with asyncio.timeout(within):
            while sum(message.startswith(event) for message in self.messages) < count:
                self._arrived.clear()
                await self._arrived.wait()


@pytest.fixture
async def log_events() -> AsyncIterator[LogEvents]:
    handler = LogEvents(asyncio.get_running_loop())
    logger = logging.getLogger("agents")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def record_states(states: list[AgentState]) -> Callable[[AsyncAgent | Agent], None]:
    """A ``setup`` that records each state the agent goes to, in order."""

    def setup(agent: AsyncAgent | Agent) -> None:
        client = agent._client
        inner = client._on_state

        def on_state(state: AgentState) -> None:
            states.append(state)
            inner(state)

        client._on_state = on_state

    return setup


async def test_a_malformed_change_is_nacked_and_the_agent_resyncs_from_a_snapshot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="agents")
    first_connection: list[Step] = [
        snapshot_msg(10, flag("a", True)),
        # Revision 11 sets "d" and carries another service's record: rejected whole.
        change_msg(11, flag("d", "valid part"), flag("a", False, scope="payments")),
        # Sent before the server read the nack: never applied on top of 10.
        change_msg(12, flag("b", "x")),
    ]
    second_connection: list[Step] = [
        snapshot_msg(12, flag("a", True), flag("d", "valid part"), flag("b", "x")),
        change_msg(9, flag("a", False)),  # older than the state: dropped, no ack
        change_msg(13, flag("c", "y")),
    ]
    servicer = ScriptedSync(first_connection, second_connection)
    states: list[AgentState] = []
    changes: list[StateChange] = []
    at_13 = asyncio.Event()

    def on_change(change: StateChange) -> None:
        changes.append(change)
        if change.revision == 13:
            at_13.set()

    async with running(servicer, record_states(states), on_change=on_change) as agent:
        await asyncio.wait_for(at_13.wait(), 10)
        await servicer.wait_ack(13)
        assert (agent.value("d"), agent.value("b"), agent.value("c")) == ("valid part", "x", "y")
        assert agent.enabled("a") is True
        assert agent.revision == 13
    (ack10, nack11), second = servicer.connection_acks
    assert ack10 == (10, "")
    assert nack11[0] == 11 and "scope 'payments'" in nack11[1]
    assert second == [(12, ""), (13, "")]
    # The second stream asked for a full snapshot, not a resume from 10.
    assert [hello.last_applied_revision for hello in servicer.hellos] == [0, 0]
    # Served: 10, then (no state without revision 11's valid parts) 12 and 13.
    assert [c.revision for c in changes] == [10, 12, 13]
    assert changes[1].flags == {"d": (None, "valid part"), "b": (None, "x")}
    # READY, lost, READY again on the snapshot, STALE once closed.
    assert states == [AgentState.READY, AgentState.STALE, AgentState.READY, AgentState.STALE]
    assert any("agent_change_rejected" in r.getMessage() for r in caplog.records)


async def test_a_malformed_snapshot_is_nacked_the_state_kept_and_the_agent_resyncs() -> None:
    gate = Gate()
    servicer = ScriptedSync(
        [
            snapshot_msg(10, flag("a", True)),
            WaitAck(10),
            snapshot_msg(11, flag("a", False), flag("z", "x", scope="payments")),
        ],
        [gate, snapshot_msg(12, flag("a", False))],
    )
    async with running(servicer) as agent:
        _, reason = await servicer.wait_ack(11)
        assert "scope 'payments'" in reason
        await servicer.wait_hellos(2)
        # Reconnected (the old state served meanwhile), asking for a snapshot.
        assert (agent.revision, agent.enabled("a")) == (10, True)
        assert agent.state is AgentState.STALE
        assert servicer.hellos[1].last_applied_revision == 0
        gate.open()
        assert await agent.wait_ready(10)
        await servicer.wait_ack(12)
        assert (agent.revision, agent.enabled("a", default=True)) == (12, False)
    assert servicer.connection_acks[0] == [(10, ""), (11, reason)]


@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
async def test_an_agent_whose_first_snapshot_is_rejected_is_not_ready(
    tmp_path: Path, cached: bool
) -> None:
    kwargs: dict[str, Any] = {}
    if cached:
        kwargs["cache_path"] = tmp_path / "cache.json"
        write_atomic(kwargs["cache_path"], snapshot_to_cache(state(3, flag("mode", "cached"))))
    gate = Gate()
    servicer = ScriptedSync(
        [snapshot_msg(5, flag("mode", "x", scope="payments"))],
        [gate, snapshot_msg(6, flag("mode", "server"))],
    )
    states: list[AgentState] = []
    async with running(servicer, record_states(states), **kwargs) as agent:
        await servicer.wait_ack(5)
        await servicer.wait_hellos(2)
        # Never READY on a rejected snapshot: the defaults (or the cache) are served.
        waiting = AgentState.STALE if cached else AgentState.CONNECTING
        assert agent.state is waiting
        assert not agent._ready.is_set()
        assert states == ([AgentState.STALE] if cached else [])
        assert agent.value("mode") == ("cached" if cached else None)
        assert [h.last_applied_revision for h in servicer.hellos] == [3 if cached else 0, 0]
        gate.open()
        assert await agent.wait_ready(10)
        assert (agent.value("mode"), agent.revision) == ("server", 6)
    assert states[-2:] == [AgentState.READY, AgentState.STALE]  # STALE: closed
    assert AgentState.READY not in states[:-2]


async def test_a_change_before_the_first_snapshot_or_a_wrong_resume_is_not_ready() -> None:
    gate = Gate()
    servicer = ScriptedSync(
        [change_msg(4, flag("a", True))],
        [agent_pb2.SyncResponse(resume=agent_pb2.Resume(revision=3, server_revision=4))],
        [gate, snapshot_msg(5, flag("a", True))],
    )
    states: list[AgentState] = []
    async with running(servicer, record_states(states)) as agent:
        await servicer.wait_hellos(3)
        assert states == [] and agent.revision == 0
        assert [h.last_applied_revision for h in servicer.hellos] == [0, 0, 0]
        gate.open()
        assert await agent.wait_ready(10)
        assert agent.enabled("a") is True
        await servicer.wait_ack(5)
    assert [rev for rev, _ in servicer.acks] == [5]  # nothing acked before the snapshot


async def test_an_older_snapshot_replaces_the_cache_too(tmp_path: Path) -> None:
    cache = tmp_path / "cache.json"
    servicer = ScriptedSync(
        [snapshot_msg(20, flag("a", True)), WaitAck(20), "abort"],
        [snapshot_msg(15, flag("b", "x"))],
    )
    async with running(servicer, cache_path=cache):
        await servicer.wait_ack(15)
    # Closed: the last applied state is written, though the file held 20.
    assert cached_revision(cache) == 15


@pytest.mark.parametrize(("stable", "attempts"), [(None, 5), (0.0, 1)], ids=["default", "0s"])
async def test_the_backoff_restarts_only_after_a_session_that_stayed_up(
    monkeypatch: pytest.MonkeyPatch, stable: float | None, attempts: int
) -> None:
    if stable is None:
        assert agents._client.STABLE_SESSION == 5.0
    else:
        monkeypatch.setattr(agents._client, "STABLE_SESSION", stable)
    # A server that accepts each stream, answers, and drops it.
    drops: list[list[Step]] = [
        [snapshot_msg(5 + i, flag("a", True)), WaitAck(5 + i), "abort"] for i in range(5)
    ]
    servicer = ScriptedSync(*drops)
    backoff = Backoff(rand=lambda: 0.0)  # the delays: 0, so that the test is quick

    def setup(agent: AsyncAgent) -> None:
        agent._client.backoff = backoff

    async with running(servicer, setup):
        await servicer.wait_hellos(6)
        # Five sessions that answered and dropped at once: the bound kept growing
        # (0.05, 0.1, ... 1.6 s), unless a session counts as stable at once.
        assert backoff.attempt == attempts
    assert [rev for rev, _ in servicer.acks] == [5, 6, 7, 8, 9]


async def test_an_older_snapshot_replaces_the_state_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="agents")
    servicer = ScriptedSync([snapshot_msg(20, flag("a", True)), snapshot_msg(15, flag("b", "x"))])
    async with running(servicer) as agent:
        await servicer.wait_ack(15)
        assert agent.revision == 15
        assert (agent.value("a"), agent.value("b")) == (None, "x")
    [warning] = [r for r in caplog.records if "agent_snapshot_older" in r.getMessage()]
    assert "revision=15 applied=20" in warning.getMessage()


async def test_callbacks_run_after_the_swap_and_a_failing_one_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    servicer = ScriptedSync(
        [snapshot_msg(3, flag("a", True)), WaitAck(3), change_msg(4, flag("a", False))]
    )
    seen: list[tuple[StateChange, object]] = []
    awaited: list[int] = []
    done = asyncio.Event()

    async def later(change: StateChange) -> None:
        awaited.append(change.revision)
        if change.revision == 4:
            done.set()

    removers = []

    def setup(agent: AsyncAgent) -> None:
        agent.on_change(lambda c: seen.append((c, agent.value("a"))))
        removers.append(agent.on_change(later))

    async with running(servicer, setup, on_change=lambda c: 1 / 0):
        await servicer.wait_ack(4)
        await asyncio.wait_for(done.wait(), 10)
        assert awaited == [3, 4]
        removers[0]()
        removers[0]()  # twice: harmless
    (first, a_then), (second, a_later) = seen
    assert (first.revision, first.flags) == (3, {"a": (None, True)})
    assert (second.revision, second.flags) == (4, {"a": (True, False)})
    # The new state is served by the time callbacks run.
    assert (a_then, a_later) == (True, False)
    assert any("agent_callback_failed" in r.getMessage() for r in caplog.records)


async def test_a_dropped_stream_keeps_the_state_and_resumes_from_the_last_revision() -> None:
    first_connection: list[Step] = [
        snapshot_msg(5, flag("mode", "degraded")),
        change_msg(6, flag("x", True)),
        WaitAck(6),
        "abort",
    ]
    servicer = ScriptedSync(
        first_connection,
        [
            agent_pb2.SyncResponse(resume=agent_pb2.Resume(revision=6, server_revision=7)),
            change_msg(7, flag("mode", "read-only")),
        ],
    )
    async with running(servicer) as agent:
        await servicer.wait_ack(7)
        assert agent.state is AgentState.READY
        assert agent.revision == 7
    first, second = servicer.hellos
    assert (first.service, first.instance_id, first.running_version) == ("checkout", "i-1", "v9")
    assert first.agent_version == controlplane.__version__
    assert first.last_applied_revision == 0
    assert second.last_applied_revision == 6
    assert [ack for ack, _ in servicer.acks] == [5, 6, 7]  # a Resume is not acked
    assert agent.value("mode") == "read-only" and agent.enabled("x") is True


async def test_a_lost_server_leaves_the_agent_stale_with_its_state(
    log_events: LogEvents,
) -> None:
    servicer = ScriptedSync([snapshot_msg(5, flag("mode", "degraded"))])
    server, address = await serve(servicer)
    agent = AsyncAgent("checkout", [address])
    await agent.start()
    try:
        await servicer.wait_ack(5)
        states = [agent.state]
        await server.stop(0)
        await log_events.wait_for("agent_disconnected")
        states.append(agent.state)
        assert states == [AgentState.READY, AgentState.STALE]
        assert agent.value("mode") == "degraded"
        assert agent.revision == 5
        assert not await agent.wait_ready(0.2)
    finally:
        await agent.close()


@contextlib.asynccontextmanager
async def agent_of_a_down_server(
    log_events: LogEvents,
) -> AsyncIterator[tuple[AsyncAgent, str, socket.socket]]:
    """An agent whose one server is a loopback port bound but not listening
    (connections refused, and no one else takes the port until the socket closes),
    once its first attempt failed. Closed at the end."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{holder.getsockname()[1]}"
        agent = AsyncAgent("checkout", [target])
        await agent.start()
        try:
            await log_events.wait_count("agent_connect_failed", 1)
            yield agent, target, holder
        finally:
            await agent.close()


async def test_a_server_that_is_down_is_retried_on_one_kept_channel(
    log_events: LogEvents,
) -> None:
    async with agent_of_a_down_server(log_events) as (agent, target, holder):
        client = agent._client
        kept = client._spares[target].channel
        await log_events.wait_count("agent_connect_failed", 4)
        # gRPC retried it in the background; no channel was made anew.
        assert client._spares[target].channel is kept
        failures = [m for m in log_events.messages if m.startswith("agent_connect_failed")]
        assert all("Connection refused" in message for message in failures), failures
        assert agent.state is AgentState.CONNECTING
        holder.close()  # the server comes up on that port
        servicer = ScriptedSync([snapshot_msg(5, flag("mode", "degraded"))])
        server, _ = await serve(servicer, target)
        try:
            await servicer.wait_ack(5)
            # The stream went over the kept channel, which is no spare any more.
            assert client._spares == {}
            assert kept.get_state() is grpc.ChannelConnectivity.READY
            assert agent.value("mode") == "degraded"
        finally:
            await server.stop(0)


async def test_a_kept_channel_is_made_anew_after_spare_max_age_and_closed_at_the_end(
    log_events: LogEvents, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agents._client, "SPARE_MAX_AGE", 0.0)
    async with agent_of_a_down_server(log_events) as (agent, target, _holder):
        client = agent._client
        first = client._spares[target].channel
        await log_events.wait_count("agent_connect_failed", 3)
        assert client._spares[target].channel is not first
        assert first.get_state() is grpc.ChannelConnectivity.SHUTDOWN
        last = client._spares[target].channel
    assert client._spares == {} and client.closing_channels == []
    assert last.get_state() is grpc.ChannelConnectivity.SHUTDOWN


async def test_a_time_boxed_flag_expires_in_the_agent_on_time() -> None:
    boxed = flag("mode", "degraded", expires_in=3.0)
    boxed.replaced.CopyFrom(flag("mode", "full"))
    expires_at = boxed.meta.expires_at.ToDatetime(tzinfo=UTC)
    servicer = ScriptedSync([snapshot_msg(8, boxed)])
    switched: list[tuple[datetime, StateChange]] = []
    expired_event = asyncio.Event()

    def on_change(change: StateChange) -> None:
        switched.append((now(), change))
        if change.flags.get("mode", (None, None))[1] == "full":
            expired_event.set()

    async with running(servicer, on_change=on_change) as agent:
        await servicer.wait_ack(8)
        assert now() < expires_at, "the snapshot arrived after its expiry: nothing tested"
        assert agent.value("mode") == "degraded"
        await asyncio.wait_for(expired_event.wait(), 15)
        assert agent.value("mode") == "full"
        assert agent.revision == 8  # the agent's own switch: no new revision
    (_, loaded), (at, expired) = switched
    assert loaded.flags == {"mode": (None, "degraded")}
    assert expired.flags == {"mode": ("degraded", "full")}
    # The agent switches by itself at expires_at; the slack is the loop's, on a busy machine.
    assert expires_at <= at < expires_at + timedelta(seconds=1.5)


async def test_the_threaded_agent_applies_and_closes_from_a_callback() -> None:
    servicer = ScriptedSync([snapshot_msg(3, flag("a", True)), change_msg(4, flag("a", False))])
    server, address = await serve(servicer)
    closed = asyncio.Event()
    acked = threading.Event()
    loop = asyncio.get_running_loop()
    agent = Agent("checkout", [address])

    def close_at_4(change: StateChange) -> None:
        if change.revision == 4:
            # Callbacks run after the ack: the server reads it while this one waits
            # (a close cancels the stream, which could drop an ack still unread).
            acked.wait(10)
            agent.close()  # from the agent's own thread: must not deadlock
            loop.call_soon_threadsafe(closed.set)

    agent.on_change(close_at_4)
    try:
        agent.start()
        await servicer.wait_ack(4)
        acked.set()
        await asyncio.wait_for(closed.wait(), 10)
        assert agent.enabled("a", default=True) is False
        with pytest.raises(RuntimeError, match="closed"):
            agent.start()
    finally:
        await asyncio.to_thread(agent.close)
        await server.stop(0)
    assert [rev for rev, _ in servicer.acks] == [3, 4]


# ---------------------------------------------------------------- fork


@pytest.mark.parametrize(
    ("stopped", "kept", "child", "plan"),
    [
        (True, False, False, _AfterFork.RESTART),
        (True, False, True, _AfterFork.RESTART),
        (False, False, False, _AfterFork.NOTHING),
        (False, False, True, _AfterFork.NOTHING),
        # The thread did not stop in time: never a second thread on the same client.
        (False, True, False, _AfterFork.KEEP),
        (False, True, True, _AfterFork.ABANDON),
    ],
)
def test_after_a_fork_the_agent_restarts_only_a_thread_that_stopped(
    stopped: bool, kept: bool, child: bool, plan: _AfterFork
) -> None:
    assert _after_fork_plan(stopped=stopped, kept=kept, child=child) is plan


async def forever() -> None:
    await asyncio.Event().wait()


async def test_a_stop_request_can_be_called_off_until_it_ran() -> None:
    task = asyncio.ensure_future(forever())
    try:
        stop = _StopRequest(task)
        assert stop.revoke() is task
        stop.run()  # called off: no cancel
        assert stop.revoke() is None
        await asyncio.sleep(0)
        assert not task.done()

        ran = _StopRequest(task)
        ran.run()
        assert ran.revoke() is None  # too late: cancelled
        with pytest.raises(asyncio.CancelledError):
            await task

        other = asyncio.ensure_future(forever())
        forgotten = _StopRequest(other)
        forgotten.forget()  # the loop was gone: nothing to call off
        assert forgotten.revoke() is None
        assert not other.cancelled()
        other.cancel()
    finally:
        task.cancel()


class BlockingCallback:
    """A change callback that blocks the agent thread at ``revision`` until released."""

    def __init__(self, revision: int) -> None:
        self.revision = revision
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, change: StateChange) -> None:
        if change.revision == self.revision:
            self.entered.set()
            self.release.wait(30)


@pytest.mark.parametrize("child", [False, True], ids=["parent", "child"])
async def test_a_fork_while_a_callback_holds_the_agent_thread_never_runs_two_threads(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, child: bool
) -> None:
    """The fork hooks, called as os.fork() calls them, around a thread that does
    not stop in time (in this process: the child's side is simulated)."""
    monkeypatch.setattr(agents._agent, "STOP_TIMEOUT", 0.2)
    caplog.set_level(logging.WARNING, logger="agents")
    gate = Gate()
    servicer = ScriptedSync(
        [
            snapshot_msg(3, flag("a", True)),
            WaitAck(3),
            change_msg(4, flag("a", False)),
            gate,
            change_msg(5, flag("a", True)),
        ]
    )
    server, address = await serve(servicer)
    blocking = BlockingCallback(4)
    before = set(threading.enumerate())
    agent = Agent("checkout", [address], instance_id="web-1", on_change=blocking)
    agent.start()
    try:
        await servicer.wait_ack(4)
        assert await asyncio.to_thread(blocking.entered.wait, 10)
        old = agent._thread
        assert old is not None

        def fork() -> None:
            agent._before_fork()
            agent._after_fork(child=child)

        await asyncio.to_thread(fork)
        agent_threads = [
            t
            for t in set(threading.enumerate()) - before
            if t.name.startswith("controlplane-agent") and t.is_alive()
        ]
        assert agent_threads == [old]  # no second thread on the same client
        messages = [r.getMessage() for r in caplog.records]
        assert any("agent_thread_not_stopped" in m for m in messages)
        if child:
            # No thread: the parent's state, STALE, said loudly; an id of its own.
            assert agent._thread is None
            assert agent.state is AgentState.STALE
            assert (agent.revision, agent.enabled("a", default=True)) == (4, False)
            assert agent.instance_id == f"web-1-{os.getpid()}"
            assert any("agent_fork_without_agent" in m for m in messages)
            blocking.release.set()
            # (Here the old thread exists only because this is no real child.)
            await asyncio.to_thread(old.join, 10)
            assert not old.is_alive()
        else:
            # The parent's thread goes on with its client, connected.
            assert agent._thread is old
            assert agent.state is AgentState.READY
            assert agent.instance_id == "web-1"
            blocking.release.set()
            gate.open()
            await servicer.wait_ack(5)
            assert agent.enabled("a") is True
            assert agent._thread is old and old.is_alive()
    finally:
        blocking.release.set()
        await asyncio.to_thread(agent.close)
        await server.stop(0)
    assert not old.is_alive()


async def test_callbacks_run_for_a_change_whose_ack_could_not_be_sent() -> None:
    """The stream ends right behind a change (the server went, or dropped a paused
    agent): the change is served, and its callbacks run, though its ack is lost."""
    servicer = ScriptedSync(
        [snapshot_msg(3, flag("a", True)), change_msg(4, flag("a", False)), "abort"],
        # Reconnected, the agent gets revision 4 again (a state it may already serve).
        [snapshot_msg(4, flag("a", False))],
    )
    server, address = await serve(servicer)
    seen: list[int] = []
    changed = asyncio.Event()

    def record(change: StateChange) -> None:
        seen.append(change.revision)
        changed.set()

    agent = AsyncAgent("checkout", [address], on_change=record)
    try:
        await agent.start()
        async with asyncio.timeout(10):
            while 4 not in seen:
                changed.clear()
                await changed.wait()
        assert agent.enabled("a", default=True) is False
    finally:
        await agent.close()
        await server.stop(None)
