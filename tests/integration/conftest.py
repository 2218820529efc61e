"""Fixtures that run a real control server (port 0) on the session etcd."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import CollectorRegistry

from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server import ControlServer, ServerConfig
from tests.helpers.cpctl import CPCTL, Run, clean_env


def server_config(endpoint: str, prefix: str, **overrides: object) -> ServerConfig:
    """A config for tests: port 0, no metrics endpoint, quiet maintenance."""
    config = ServerConfig(
        listen="127.0.0.1:0",
        etcd=[endpoint],
        prefix=prefix,
        metrics=None,
        maintenance_interval=3600.0,
        health_interval=0.2,
    )
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


@pytest.fixture
async def server(etcd: EmbeddedEtcd, prefix: str) -> AsyncIterator[ControlServer]:
    """A control server on the session etcd, under the test's own prefix."""
    srv = ControlServer(server_config(etcd.endpoint, prefix), registry=CollectorRegistry())
    await srv.start()
    yield srv
    await srv.stop(grace=0)


@pytest.fixture
async def channel(server: ControlServer) -> AsyncIterator[grpc.aio.Channel]:
    """An asyncio channel to the test's server."""
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> mitigation_pb2_grpc.MitigationServiceStub:
    """A MitigationService client for the test's server."""
    return mitigation_pb2_grpc.MitigationServiceStub(channel)


@pytest.fixture
def cpctl(server: ControlServer) -> Run:
    """Run the installed cpctl console script against the test's server."""
    if not CPCTL.exists():
        pytest.fail(f"{CPCTL} is missing: install the project (make install)")

    async def run(*args: str, server_list: str | None = None) -> subprocess.CompletedProcess[str]:
        # A subprocess of the event loop: the server runs on the same loop and must keep serving.
        argv = [str(CPCTL), "--server", server_list or server.address, "--actor", "oncall", *args]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env()
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return subprocess.CompletedProcess(argv, proc.returncode, stdout.decode(), stderr.decode())

    return run
