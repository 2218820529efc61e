"""Three services in a chain, A -> B -> C, each in a process of its own.

Run as ``python -m tests.helpers.criticality_chain {a,b,c} --service NAME
--servers ADDRESS [--next ADDRESS]``. Each has a real agent of the control server at
``--servers`` for ``--service``, waits until it is READY, listens on a port of the
kernel's choice and prints it as one JSON line on stdout (``{"port": 12345}``); it
serves until its stdin closes.

- **A**: a ``grpc.server`` (thread pool) with :class:`ShedInterceptor`; its one
  method ``/chain.A/Call`` POSTs to B with a ``requests`` session carrying the
  criticality (:class:`CriticalityAdapter`).
- **B**: an ASGI app under uvicorn with :class:`ASGIShedder`; ``POST /call`` calls C
  through a ``grpc.aio`` channel carrying the criticality (``aio_interceptors``).
- **C**: a ``grpc.aio.server`` with :class:`AioShedInterceptor`; ``/chain.C/Call``.

Each answers with what it saw, merged into the answer of the one it called (JSON):
``a``, ``b``, ``c`` the criticality its handler ran under, ``b_header`` and
``c_metadata`` the values the call to it brought. A call shed anywhere fails back
up the chain with the shedder's message: gRPC ``RESOURCE_EXHAUSTED`` from C, an
HTTP 503 from B with the message as its body, ``RESOURCE_EXHAUSTED`` from A.
Methods use bytes as they are (no .proto).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio
import requests
import uvicorn
from prometheus_client import CollectorRegistry

from agents import Agent, AsyncAgent
from agents.criticality import CriticalityAdapter, aio_interceptors, current
from agents.shedding import (
    AioShedInterceptor,
    ASGIReceive,
    ASGIScope,
    ASGISend,
    ASGIShedder,
    ShedInterceptor,
)
from tests.helpers.shed_apps import listening_socket

VERSION = "v-chain"
READY_WITHIN = 30.0


def _report(port: int) -> None:
    sys.stdout.write(json.dumps({"port": port}) + "\n")
    sys.stdout.flush()


def _name() -> str:
    criticality = current()
    return "-" if criticality is None else criticality.name


def _handler(service: str, behaviour: Any) -> grpc.GenericRpcHandler[bytes, bytes]:
    return grpc.method_handlers_generic_handler(
        service, {"Call": grpc.unary_unary_rpc_method_handler(behaviour)}
    )


# ---------------------------------------------------------------- A


def serve_a(service: str, servers: str, next_address: str) -> None:
    agent = Agent(service, [servers], version=VERSION)
    agent.start()
    if not agent.wait_ready(READY_WITHIN):
        raise SystemExit(f"agent of {service} not READY within {READY_WITHIN} s")
    session = requests.Session()
    session.mount("http://", CriticalityAdapter(max_retries=0))

    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        reply = session.post(f"http://{next_address}/call", data=request, timeout=30)
        if reply.status_code == 503:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reply.text.strip())
        if reply.status_code != 200:
            context.abort(grpc.StatusCode.INTERNAL, f"B answered {reply.status_code}")
        return json.dumps({"a": _name(), **reply.json()}).encode()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        server = grpc.server(
            pool, interceptors=[ShedInterceptor(agent, registry=CollectorRegistry())]
        )
        server.add_generic_rpc_handlers((_handler("chain.A", call),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        _report(port)
        sys.stdin.read()
        server.stop(None).wait()
    session.close()
    agent.close()


# ---------------------------------------------------------------- B


async def serve_b(service: str, servers: str, next_address: str) -> None:
    async with AsyncAgent(service, [servers], version=VERSION) as agent:
        if not await agent.wait_ready(READY_WITHIN):
            raise SystemExit(f"agent of {service} not READY within {READY_WITHIN} s")
        channel = grpc.aio.insecure_channel(next_address, interceptors=aio_interceptors())
        call_c: Any = channel.unary_unary(
            "/chain.C/Call", request_serializer=None, response_deserializer=None
        )

        async def app(scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
            assert scope["type"] == "http"
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            header = [v.decode("latin-1") for k, v in scope["headers"] if k == b"x-criticality"]
            try:
                answer = json.loads(await call_c(body, timeout=30))
                status = 200
                out = json.dumps({"b": _name(), "b_header": header, **answer}).encode()
            except grpc.aio.AioRpcError as exc:
                shed = exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                status, out = (503 if shed else 502), (exc.details() or "").encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-length", str(len(out)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": out})

        sock = listening_socket()
        config = uvicorn.Config(
            ASGIShedder(app, agent, registry=CollectorRegistry()),
            lifespan="off",
            log_level="warning",
            access_log=False,
        )
        server = uvicorn.Server(config)
        # Listening already: requests wait in the backlog until uvicorn serves them.
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        _report(sock.getsockname()[1])
        await asyncio.to_thread(sys.stdin.read)
        server.should_exit = True
        await serving
        await channel.close(None)
        sock.close()


# ---------------------------------------------------------------- C


async def serve_c(service: str, servers: str) -> None:
    async with AsyncAgent(service, [servers], version=VERSION) as agent:
        if not await agent.wait_ready(READY_WITHIN):
            raise SystemExit(f"agent of {service} not READY within {READY_WITHIN} s")

        async def call(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            metadata = [v for k, v in context.invocation_metadata() or () if k == "x-criticality"]
            return json.dumps({"c": _name(), "c_metadata": metadata}).encode()

        server = grpc.aio.server(
            interceptors=[AioShedInterceptor(agent, registry=CollectorRegistry())]
        )
        server.add_generic_rpc_handlers((_handler("chain.C", call),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        _report(port)
        await asyncio.to_thread(sys.stdin.read)
        await server.stop(None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["a", "b", "c"])
    parser.add_argument("--service", required=True)
    parser.add_argument("--servers", required=True)
    parser.add_argument("--next", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.role == "a":
        serve_a(args.service, args.servers, args.next)
    elif args.role == "b":
        asyncio.run(serve_b(args.service, args.servers, args.next))
    else:
        asyncio.run(serve_c(args.service, args.servers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
