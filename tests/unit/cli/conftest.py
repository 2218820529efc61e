"""Fixtures of the cpctl unit tests: real in-process servers (see ``support``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from controlplane.api.v1 import mitigation_pb2_grpc, types_pb2
from tests.unit.cli.support import FakeMitigation, Server


@pytest.fixture
def start_server() -> Iterator[Callable[[], Server]]:
    """Start real gRPC servers on 127.0.0.1:0; all are stopped after the test."""
    servers: list[grpc.Server] = []
    servicers: list[FakeMitigation] = []

    def start() -> Server:
        servicer = FakeMitigation()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        add_servicer: Any = mitigation_pb2_grpc.add_MitigationServiceServicer_to_server
        add_servicer(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        servicers.append(servicer)
        return Server(f"127.0.0.1:{port}", servicer, server)

    yield start
    for servicer in servicers:
        servicer.release.set()
    for server in servers:
        server.stop(grace=None)


@pytest.fixture
def server(start_server: Callable[[], Server]) -> Server:
    started = start_server()
    started.servicer.flags[("checkout", "new-ui")] = types_pb2.Flag(
        scope="checkout",
        name="new-ui",
        value=types_pb2.FlagValue(bool_value=False),
        meta=types_pb2.Meta(actor="sre-1", reason="errors after deploy", mod_revision=812),
    )
    return started
