"""Shared fixtures: a real etcd per session (and per test where needed), key prefixes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controlplane.embedded_etcd import (
    EmbeddedEtcd,
    EmbeddedEtcdError,
    etcd_version,
    find_etcd_binary,
)
from tests.helpers.agent_log import AgentLog, attached
from tests.helpers.raw_etcd import RawEtcd, delete_prefix_blocking

TEST_KEY_ROOT = "/cp-test/"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the etcd the tests started: the suite runs on 3.4 and 3.5, told apart here."""
    try:
        binary = find_etcd_binary()
        terminalreporter.write_line("etcd: {} ({}.{}.{})".format(binary, *etcd_version(binary)))
    except EmbeddedEtcdError as exc:
        terminalreporter.write_line(f"etcd: {exc}")


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedEtcd]:
    """One real etcd for the whole session, on free loopback ports."""
    server = EmbeddedEtcd(tmp_path_factory.mktemp("etcd-session") / "data", name="cp-test")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fresh_etcd(tmp_path: Path) -> Iterator[EmbeddedEtcd]:
    """A real etcd of the test's own, for tests that stop, kill, pause or fill it."""
    server = EmbeddedEtcd(tmp_path / "etcd-data", name="cp-fresh")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix(etcd: EmbeddedEtcd) -> Iterator[str]:
    """A unique key prefix in the session etcd; everything under it is deleted afterwards."""
    key_prefix = f"{TEST_KEY_ROOT}{uuid.uuid4().hex}/"
    yield key_prefix
    # Blocking gRPC works the same after sync and async tests and needs no event loop.
    delete_prefix_blocking(etcd.endpoint, key_prefix)
    # The servers' presence records live beside the prefix (agents do not watch them).
    delete_prefix_blocking(etcd.endpoint, key_prefix.rstrip("/") + "-presence/")


@pytest.fixture
async def raw_etcd(etcd: EmbeddedEtcd) -> AsyncIterator[RawEtcd]:
    """A raw etcd client connected to the session etcd, to check writes independently."""
    async with RawEtcd(etcd.endpoint) as client:
        yield client


@pytest.fixture
async def agent_log() -> AsyncIterator[AgentLog]:
    """The agent SDK's log records while the test runs, to wait on."""
    with attached() as handler:
        yield handler
