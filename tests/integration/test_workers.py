"""`controlplane serve --workers N`: N server processes on one port under a supervisor."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from agents import AsyncAgent
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server.auth import hash_token
from tests.helpers.agent_process import ROOT
from tests.helpers.server_process import ServerProcess

SERVICE = "checkout"
AGENTS = 12


def worker_pids(server: ServerProcess) -> list[int]:
    match = server.wait_output(r"listening on .*\((\d+) workers, pids ([\d, ]+);")
    pids = [int(p) for p in match.group(2).split(", ")]
    assert len(pids) == int(match.group(1))
    return pids


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (a zombie waiting for its parent counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def wait_gone(pids: list[int], within: float = 20.0) -> None:
    """Until every one of ``pids`` has ended: a process descriptor becomes readable
    when its process ends (also one that is not our child)."""
    deadline = time.monotonic() + within
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            ended, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0.0))
        finally:
            os.close(fd)
        assert ended, f"process {pid} still runs after {within} s"


def logged(server: ServerProcess, event: str, start: int = 0) -> dict[str, Any]:
    """The first JSON log line of ``event`` from ``output[start:]`` on, as it arrives."""
    line: dict[str, Any] = json.loads(
        server.wait_output(rf'^\{{.*"event": "{event}".*$', start=start).string
    )
    return line


def metrics_text(server: ServerProcess) -> str:
    port = server.wait_output(r'"metrics": "127\.0\.0\.1:(\d+)"').group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    return text


def sample(text: str, name: str, labels: str = "") -> float | None:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{\})?")
    match = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


async def poll_metric(
    server: ServerProcess, name: str, labels: str, *, present: bool, within: float = 10.0
) -> float:
    """The sample once it is there (``present``) or gone: the metric is refreshed by the
    workers every second, in processes of their own (nothing to wait on but the scrape)."""
    deadline = time.monotonic() + within
    while True:
        value = sample(await asyncio.to_thread(metrics_text, server), name, labels)
        if (value is not None) == present:
            return value if value is not None else 0.0
        assert time.monotonic() < deadline, f"{name}{{{labels}}} still {value} after {within} s"
        await asyncio.sleep(0.1)


@pytest.fixture
def workers(etcd: EmbeddedEtcd, prefix: str) -> Iterator[ServerProcess]:
    server = ServerProcess(
        etcd.endpoint, prefix, extra_args=["--workers", "2", "--metrics", "127.0.0.1:0"]
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def fleet(workers: ServerProcess) -> AsyncIterator[list[AsyncAgent]]:
    """AGENTS agents, READY, on both workers. The kernel spreads connections over the
    workers' sockets at random (SO_REUSEPORT): all on one is 1 chance in 2,048, and
    then the fleet connects again, as new agents (new connections, new draws)."""
    agents: list[AsyncAgent] = []
    try:
        for attempt in range(5):
            agents[:] = [
                AsyncAgent(SERVICE, [workers.address], instance_id=f"w{attempt}-{i}")
                for i in range(AGENTS)
            ]
            for agent in agents:
                await agent.start()
            assert all(await asyncio.gather(*(a.wait_ready(15) for a in agents)))
            listed = await instances(workers.address, AGENTS, prefix=f"w{attempt}-")
            if len({i.server_id for i in listed}) == 2:
                break
            await asyncio.gather(*(a.close() for a in agents))
        else:
            pytest.fail("five fleets in a row all on one worker: the spread is broken")
        await instances(workers.address, AGENTS)  # the others' departures seen
        yield agents
    finally:
        await asyncio.gather(*(a.close() for a in agents))


async def flip(address: str, value: bool) -> m.WaitAppliedResponse:
    """Set the flag through any worker and wait until every agent applied it."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        written = await stub.SetFlag(
            m.SetFlagRequest(
                scope=SERVICE,
                name="kill",
                value=t.FlagValue(bool_value=value),
                options=t.WriteOptions(reason="drill", actor="oncall"),
            )
        )
        waited: m.WaitAppliedResponse = await stub.WaitApplied(
            m.WaitAppliedRequest(
                service=SERVICE,
                revision=written.result.revision,
                timeout=duration_pb2.Duration(seconds=10),
            )
        )
        return waited


async def instances(
    address: str, count: int, within: float = 10.0, dead: int | None = None, prefix: str = ""
) -> list[t.Instance]:
    """The service's instances once ``count`` are listed (presence is flushed to etcd);
    with ``dead``, once ``count`` are on workers other than that pid; with ``prefix``,
    counting only the instances whose id starts with it."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        deadline = time.monotonic() + within
        while True:
            status = await stub.GetStatus(m.GetStatusRequest(service=SERVICE))
            listed = [
                i
                for i in status.instances
                if (dead is None or f"-{dead}-" not in i.server_id)
                and i.instance_id.startswith(prefix)
            ]
            if len(listed) == count:
                return listed
            assert time.monotonic() < deadline, f"{len(listed)} instances listed"
            await asyncio.sleep(0.05)


async def test_agents_spread_over_the_workers_and_every_one_applies_a_change(
    workers: ServerProcess, fleet: list[AsyncAgent]
) -> None:
    listed = await instances(workers.address, AGENTS)
    # On both workers (the fixture saw to it; five draws in a row all on one worker is
    # 1 chance in 2**55 unless the spread is broken).
    assert len({i.server_id for i in listed}) == 2
    waited = await flip(workers.address, True)
    assert waited.all_applied and (waited.connected, waited.applied) == (AGENTS, AGENTS)
    assert all(agent.enabled("kill") for agent in fleet)
    # One metrics endpoint for all workers: the gauges and counters of both, summed.
    text = metrics_text(workers)
    assert sample(text, "controlplane_agents_connected", f'service="{SERVICE}"') == AGENTS
    assert sample(text, "controlplane_rpcs_total", 'code="OK",method="SetFlag"') == 1
    assert sample(text, "controlplane_etcd_up") == 1
    # The age of the flag, from what the workers leave for the supervisor (each second).
    age = 'kind="flag",name="kill",service="checkout"'
    assert await poll_metric(workers, "controlplane_mitigation_age_seconds", age, present=True) >= 0
    async with grpc.aio.insecure_channel(workers.address) as channel:
        await mitigation_pb2_grpc.MitigationServiceStub(channel).ClearFlag(
            m.ClearFlagRequest(
                scope=SERVICE, name="kill", options=t.WriteOptions(reason="over", actor="oncall")
            )
        )
    await poll_metric(workers, "controlplane_mitigation_age_seconds", age, present=False)


async def test_a_killed_worker_is_restarted_and_its_agents_come_back(
    workers: ServerProcess, fleet: list[AsyncAgent]
) -> None:
    first, second = worker_pids(workers)
    mark = len(workers.output)
    os.kill(first, signal.SIGKILL)
    exited = logged(workers, "worker_exited", mark)
    assert (exited["pid"], exited["code"], exited["level"]) == (first, -signal.SIGKILL, "error")
    new = logged(workers, "worker_restarted", mark)["pid"]
    assert new not in (first, second) and not gone(new)
    assert all(await asyncio.gather(*(a.wait_ready(15) for a in fleet)))
    # An agent is READY until it notices its connection died: wait until every one is
    # connected to a live worker again.
    await instances(workers.address, AGENTS, within=15.0, dead=first)
    waited = await flip(workers.address, True)
    assert waited.all_applied and waited.applied == AGENTS
    assert all(agent.enabled("kill") for agent in fleet)
    # The dead worker's connections are not counted any more.
    await instances(workers.address, AGENTS)
    assert sample(
        metrics_text(workers), "controlplane_agents_connected", f'service="{SERVICE}"'
    ) == (AGENTS)


def test_sighup_reaches_every_worker_and_sigterm_stops_them_all(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    auth = tmp_path / "auth.json"
    auth.write_text(
        json.dumps(
            {"identities": [{"name": "oncall", "role": "operator",
                             "token_sha256": hash_token("a-token-for-the-test")}]}
        )
    )  # fmt: skip
    server = ServerProcess(
        etcd.endpoint, prefix, extra_args=["--workers", "2", "--auth-file", str(auth)]
    )
    try:
        pids = worker_pids(server)
        mark = len(server.output)
        server.proc.send_signal(signal.SIGHUP)
        for worker in (0, 1):  # each worker reloads its own file
            server.wait_output(rf'"event": "auth_reloaded", "worker": {worker}\b', start=mark)
        server.stop()
        assert server.proc.returncode == 0
        wait_gone(pids, within=1.0)
    finally:
        server.stop()


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(workers: ServerProcess) -> None:
    pids = worker_pids(workers)
    workers.kill()
    wait_gone(pids)


def test_a_worker_that_cannot_listen_fails_the_start_naming_the_address(
    etcd: EmbeddedEtcd, prefix: str
) -> None:
    with socket.socket() as taken:  # listening without SO_REUSEPORT: no one may share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "controlplane.server", "serve", "--workers", "2",
             "--listen", f"127.0.0.1:{port}", "--etcd", etcd.endpoint, "--prefix", prefix,
             "--metrics", "off"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"127.0.0.1:{port} (gRPC) is in use by pid {os.getpid()} (" in result.stderr


def test_workers_never_share_their_port_with_another_server(
    workers: ServerProcess, etcd: EmbeddedEtcd, prefix: str
) -> None:
    """The workers share their port among themselves (SO_REUSEPORT), and with nobody else:
    a second ``--workers`` server on it is refused, not let in to take agents."""
    result = subprocess.run(
        [sys.executable, "-m", "controlplane.server", "serve", "--workers", "2",
         "--listen", workers.address, "--etcd", etcd.endpoint, "--prefix", prefix,
         "--metrics", "off"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    # The workers listen on it, not the supervisor.
    pids = ", ".join(map(str, sorted(worker_pids(workers))))
    assert f"{workers.address} (gRPC) is in use by pids {pids} (" in result.stderr
    assert "worker_started" not in result.stderr  # refused before any worker


def test_a_single_server_never_shares_its_port_with_another(
    etcd: EmbeddedEtcd, prefix: str
) -> None:
    first = ServerProcess(etcd.endpoint, prefix)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "controlplane.server", "serve", "--listen", first.address,
             "--etcd", etcd.endpoint, "--prefix", prefix, "--metrics", "off"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1
        assert f"{first.address} (gRPC) is in use by pid {first.proc.pid} (" in result.stderr
    finally:
        first.stop()


def test_workers_with_the_embedded_etcd(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTROLPLANE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.server", "serve", "--workers", "2",
         "--listen", "127.0.0.1:0", "--embedded-etcd-port", "0", "--data-dir", str(tmp_path),
         "--metrics", "off"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = ""
        for line in proc.stderr:
            if "listening on" in line:
                break
        match = re.search(r"listening on (\S+) \(2 workers.*etcd (\S+), embedded", line)
        assert match, line
        address, etcd_endpoint = match.groups()
        with grpc.insecure_channel(address) as channel:
            stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
            written = stub.SetFlag(
                m.SetFlagRequest(
                    scope=SERVICE, name="kill", value=t.FlagValue(bool_value=True),
                    options=t.WriteOptions(reason="drill", actor="oncall"),
                ),
                timeout=10,
            )  # fmt: skip
            assert written.result.changed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    with socket.socket() as sock:  # the supervisor stopped its etcd too
        host, _, port = etcd_endpoint.rpartition(":")
        assert sock.connect_ex((host, int(port))) != 0
