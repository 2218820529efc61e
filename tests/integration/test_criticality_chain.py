"""A request keeps its criticality through three services, and is shed where the level is.

A (``grpc.server``, requests) -> B (ASGI under uvicorn, ``grpc.aio`` client) -> C
(``grpc.aio.server``), each in a process of its own (tests.helpers.criticality_chain)
with a real agent of the test's control server. Shedding is set on C's service
only, SHEDDABLE 100 %, through the API: of the calls entering A, exactly the
SHEDDABLE ones are shed, at C, and fail back to A's caller as
``RESOURCE_EXHAUSTED`` with C's message; the others go through, each service
running them under the criticality they entered A with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
from google.protobuf import duration_pb2

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.server import ControlServer

Stub = mitigation_pb2_grpc.MitigationServiceStub
ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"a": "chain-a", "b": "chain-b", "c": "chain-c"}
SHED_AT_C = "load shedding: SHEDDABLE 100% for chain-c; request criticality SHEDDABLE"

CALLS = ["SHEDDABLE", "SHEDDABLE_PLUS", "CRITICAL", None, "sheddable", "CRITICAL_PLUS", "bogus"]
"""The ``x-criticality`` of the calls entering A (None: none), and what each becomes:"""
BECOMES = {
    "SHEDDABLE": "SHEDDABLE",
    "sheddable": "SHEDDABLE",
    "SHEDDABLE_PLUS": "SHEDDABLE_PLUS",
    "CRITICAL_PLUS": "CRITICAL_PLUS",
    "CRITICAL": "CRITICAL",
    None: "CRITICAL",
    "bogus": "CRITICAL",
}
ROUNDS = 5


class ChainProcess:
    """One service of the chain in its own process; its port is read from stdout."""

    def __init__(self, role: str, servers: str, next_address: str, log: IO[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTROLPLANE_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.role = role
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.helpers.criticality_chain",
                role,
                "--service",
                SERVICES[role],
                "--servers",
                servers,
                "--next",
                next_address,
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )

    def port(self) -> int:
        """The port it reports once its agent is READY and it listens (blocks)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"service {self.role} ended before it listened")
        port: int = json.loads(line)["port"]
        return port

    def stop(self) -> None:
        """Close its stdin (it stops serving and ends); kill it if it does not."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.asynccontextmanager
async def chain(servers: str, tmp_path: Path) -> AsyncIterator[str]:
    """C, then B calling C, then A calling B; A's address."""
    log_path = tmp_path / "chain.log"
    with log_path.open("w") as log:
        started: list[ChainProcess] = []
        try:
            next_address = ""
            for role in ("c", "b", "a"):
                service = ChainProcess(role, servers, next_address, log)
                started.append(service)
                port = await asyncio.to_thread(service.port)
                next_address = f"127.0.0.1:{port}"
            yield next_address
        except BaseException:
            log.flush()
            print(log_path.read_text()[-5000:])
            raise
        finally:
            for service in reversed(started):
                await asyncio.to_thread(service.stop)


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    answer: dict[str, Any]


def call_a(address: str, calls: list[str | None]) -> list[Outcome]:
    """One call to A per entry of ``calls``, with that ``x-criticality``."""
    outcomes = []
    with grpc.insecure_channel(address) as channel:
        stub: Any = channel.unary_unary(
            "/chain.A/Call", request_serializer=None, response_deserializer=None
        )
        for header in calls:
            metadata = () if header is None else (("x-criticality", header),)
            try:
                answer = stub(b"hello", metadata=metadata, timeout=30)
                outcomes.append(Outcome(grpc.StatusCode.OK, "", json.loads(answer)))
            except grpc.RpcError as exc:
                failed: Any = exc
                outcomes.append(Outcome(failed.code(), failed.details() or "", {}))
    return outcomes


def went_through(header: str | None) -> Outcome:
    """What a call that is not shed answers: every service saw its criticality."""
    name = BECOMES[header]
    return Outcome(
        grpc.StatusCode.OK,
        "",
        {"a": name, "b": name, "b_header": [name], "c": name, "c_metadata": [name]},
    )


async def test_sheddable_calls_are_shed_at_c_and_only_they(
    server: ControlServer, stub: Stub, tmp_path: Path
) -> None:
    async with chain(server.address, tmp_path) as address:
        # No level anywhere: everything goes through.
        before = await asyncio.to_thread(call_a, address, CALLS)
        assert before == [went_through(header) for header in CALLS]

        response = await stub.SetShedding(
            m.SetSheddingRequest(
                service=SERVICES["c"],
                tier="SHEDDABLE",
                percent=100,
                options=t.WriteOptions(reason="criticality chain test", actor="oncall"),
            )
        )
        waited = await stub.WaitApplied(
            m.WaitAppliedRequest(
                service=SERVICES["c"],
                revision=response.result.revision,
                timeout=duration_pb2.Duration(seconds=10),
            )
        )
        assert waited.all_applied
        assert (waited.connected, waited.applied) == (1, 1)

        order = CALLS * ROUNDS
        after = await asyncio.to_thread(call_a, address, order)

    for header, outcome in zip(order, after, strict=True):
        if BECOMES[header] == "SHEDDABLE":
            # C's shedder, named in its message, through B's 503 and A's abort.
            assert outcome == Outcome(grpc.StatusCode.RESOURCE_EXHAUSTED, SHED_AT_C, {}), header
        else:
            assert outcome == went_through(header), header
    shed = sum(outcome.code is grpc.StatusCode.RESOURCE_EXHAUSTED for outcome in after)
    assert shed == 2 * ROUNDS
