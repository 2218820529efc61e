"""The real `cpctl` entry point against a real server and etcd."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from controlplane.embedded_etcd import EmbeddedEtcd, free_port
from controlplane.server import ControlServer
from tests.helpers.raw_etcd import RawEtcd
from tests.integration.conftest import server_config

CPCTL = Path(sys.executable).parent / "cpctl"

Run = Callable[..., Awaitable[subprocess.CompletedProcess[str]]]


@pytest.fixture
def cpctl(server: ControlServer) -> Run:
    """Run the installed cpctl console script against the test's server."""
    if not CPCTL.exists():
        pytest.fail(f"{CPCTL} is missing: install the project (make install)")

    async def run(*args: str, server_list: str | None = None) -> subprocess.CompletedProcess[str]:
        # A subprocess of the event loop: the server runs on the same loop and must keep serving.
        argv = [str(CPCTL), "--server", server_list or server.address, "--actor", "oncall", *args]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return subprocess.CompletedProcess(argv, proc.returncode, stdout.decode(), stderr.decode())

    return run


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
