"""A bare grpc.aio AgentService (no etcd, no hub, no presence): the floor for
``bench_memory --floor``.

Each Sync stream reads the Hello, answers one empty Snapshot (revision 1) so that
an SDK agent becomes READY, then reads acks until the agent goes. One handler
coroutine per stream and nothing else: what grpc.aio itself costs per connected
agent. Prints ``listening on 127.0.0.1:<port>`` on stderr once it serves.

    python -m benchmarks._bare_sync
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from controlplane.api.v1 import agent_pb2, agent_pb2_grpc
from controlplane.server import run_event_loop, tune_gc

SNAPSHOT = agent_pb2.SyncResponse(snapshot=agent_pb2.Snapshot(revision=1))


class BareAgentService(agent_pb2_grpc.AgentServiceServicer):
    async def Sync(
        self, request_iterator: AsyncIterator[agent_pb2.SyncRequest], context: Any
    ) -> None:
        await anext(request_iterator)
        await context.write(SNAPSHOT)
        async for _ack in request_iterator:
            pass


async def _serve() -> None:
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(BareAgentService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tune_gc()  # as controlplane serve does
    print(f"listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    run_event_loop(_serve())
