"""Fixtures that run a real control server (port 0) on the session etcd."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import CollectorRegistry

from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server import ControlServer, ServerConfig


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
