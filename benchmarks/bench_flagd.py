"""Propagation to OpenFeature clients: from just before the write RPC to each client's value.

The same method as ``bench_propagation`` for agents, for the OpenFeature clients that
read through the flagd sync protocol or OFREP: for each size, a fresh server (with its
embedded etcd) and N clients of service ``bench``, each on its own connection, spread
over several processes. The driver flips a bool flag ``--flips`` times; before each flip
it notes the wall time and calls ``SetFlag``, then asks every process for the time each
of its clients first had a value at or after the write's revision (these clients confirm
nothing, so the processes are asked), and starts the next flip only then.

- ``--protocol flagd``: a client is a ``SyncFlags`` stream; its value is the
  configuration message.
- ``--protocol ofrep``: a client is what OFREP's static-context providers do, an event
  stream (``GET /ofrep/v1/events``) and, on each ``refetchEvaluation``, a bulk
  evaluation with the event's etag (on a keep-alive connection of its own); its value is
  the bulk answer (the revision is the stamp of its ETag).

Reported per size: p50/p99/max of (value time - time before SetFlag) over all clients
and flips, and the server's CPU per client per change. Writes
``benchmarks/results/flagd.json`` (``ofrep.json``).

    python -m benchmarks.bench_flagd [--protocol flagd|ofrep] [--streams 100,1000]
        [--flips 30] [--processes 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import httpx

from benchmarks._harness import (
    RESULTS_DIR,
    control_server,
    machine,
    percentile,
    print_table,
    server_cpu_seconds,
    write_results,
)
from controlplane.api.flagd.sync.v1 import sync_pb2, sync_pb2_grpc
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t

SERVICE = "bench"
FLAG = "bench-flag"
ASK_TIMEOUT = 60.0


class _Stream:
    """One SyncFlags stream: the revisions it received and when (wall time)."""

    def __init__(self) -> None:
        self.revisions: list[int] = []
        self.times: list[float] = []
        self.changed = asyncio.Event()

    def first_at_or_after(self, revision: int) -> float | None:
        for seen, when in zip(self.revisions, self.times, strict=True):
            if seen >= revision:
                return when
        return None


async def _follow(address: str, stream: _Stream) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = sync_pb2_grpc.FlagSyncServiceStub(channel)
        call = stub.SyncFlags(sync_pb2.SyncFlagsRequest(), metadata=(("flagd-selector", SERVICE),))
        async for response in call:
            when = time.time()
            document = json.loads(response.flag_configuration)
            stream.revisions.append(int(document["metadata"]["revision"]))
            stream.times.append(when)
            stream.changed.set()


async def _follow_ofrep(base: str, stream: _Stream) -> None:
    """An OFREP static-context provider: the event stream, and a refetch per event."""
    context = {"context": {"targetingKey": "bench", "service": SERVICE}}
    bulk = "/ofrep/v1/evaluate/flags"
    limits = httpx.Limits(max_connections=1)
    async with (
        httpx.AsyncClient(base_url=base, timeout=ASK_TIMEOUT) as events_client,
        httpx.AsyncClient(base_url=base, timeout=ASK_TIMEOUT, limits=limits) as client,
    ):
        etag = ""
        async with events_client.stream("GET", f"/ofrep/v1/events?service={SERVICE}") as events:
            async for line in events.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line.removeprefix("data: "))
                answer = await client.post(
                    bulk,
                    json=context,
                    params={"flagConfigEtag": event["etag"]},
                    headers={"If-None-Match": etag} if etag else {},
                )
                when = time.time()
                if answer.status_code == 200:
                    etag = answer.headers["etag"]
                    answer.json()  # what the provider does with it
                stream.revisions.append(int(etag.strip('"').partition("-")[0]))
                stream.times.append(when)
                stream.changed.set()


async def _worker_main(address: str, protocol: str, count: int, conn: Connection) -> None:
    streams = [_Stream() for _ in range(count)]
    follow = _follow_ofrep if protocol == "ofrep" else _follow
    tasks = [asyncio.create_task(follow(address, s)) for s in streams]
    for stream in streams:
        await stream.changed.wait()
    conn.send(("ready", count))
    while True:
        command = await asyncio.to_thread(conn.recv)
        if command[0] == "stop":
            break
        revision = int(command[1])
        times: list[float] = []
        for stream in streams:
            while stream.first_at_or_after(revision) is None:
                stream.changed.clear()
                await stream.changed.wait()
            when = stream.first_at_or_after(revision)
            assert when is not None
            times.append(when)
        conn.send(("seen", times))
    for task in tasks:
        task.cancel()


def _worker(address: str, protocol: str, count: int, conn: Connection) -> None:
    asyncio.run(_worker_main(address, protocol, count, conn))


def _set_flag(stub: Any, value: bool) -> int:
    response = stub.SetFlag(
        m.SetFlagRequest(
            scope=SERVICE,
            name=FLAG,
            value=t.FlagValue(bool_value=value),
            options=t.WriteOptions(reason="bench", actor="bench"),
        )
    )
    return int(response.result.revision)


def _run_case(
    protocol: str, streams: int, flips: int, processes: int, warmup: int
) -> dict[str, Any]:
    extra = ["--http", "127.0.0.1:0"] if protocol == "ofrep" else []
    with control_server(extra) as server:
        address = server.address
        target = server.http if protocol == "ofrep" else address
        assert target is not None
        with grpc.insecure_channel(address) as channel:
            stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
            _set_flag(stub, False)
            context = multiprocessing.get_context("spawn")
            shares = [streams // processes + (i < streams % processes) for i in range(processes)]
            pipes = []
            workers = []
            for share in shares:
                if share == 0:
                    continue
                ours, theirs = context.Pipe()
                proc = context.Process(
                    target=_worker, args=(target, protocol, share, theirs), daemon=True
                )
                proc.start()
                pipes.append(ours)
                workers.append(proc)
            try:
                for pipe in pipes:
                    if not pipe.poll(ASK_TIMEOUT):
                        raise RuntimeError("a stream process did not get its first configuration")
                    pipe.recv()
                latencies: list[float] = []
                cpu_before = 0.0
                value = False
                for flip in range(warmup + flips):
                    if flip == warmup:
                        cpu_before = server_cpu_seconds(server)
                    value = not value
                    started = time.time()
                    revision = _set_flag(stub, value)
                    for pipe in pipes:
                        pipe.send(("ask", revision))
                    for pipe in pipes:
                        if not pipe.poll(ASK_TIMEOUT):
                            raise RuntimeError(f"streams did not receive revision {revision}")
                        _, times = pipe.recv()
                        if flip >= warmup:
                            latencies += [when - started for when in times]
                cpu = server_cpu_seconds(server) - cpu_before
            finally:
                for pipe in pipes:
                    pipe.send(("stop",))
                for proc in workers:
                    proc.join(10)
                    if proc.is_alive():
                        proc.kill()
    return {
        "protocol": protocol,
        "streams": streams,
        "processes": len(workers),
        "flips": flips,
        "messages": len(latencies),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
        "server_cpu_us_per_stream_change": round(cpu / max(streams * flips, 1) * 1e6, 1),
    }


def run(
    sizes: list[int],
    *,
    protocol: str = "flagd",
    flips: int = 30,
    processes: int = 4,
    warmup: int = 3,
    out_dir: Path = RESULTS_DIR,
) -> dict[str, Any]:
    """Measure each size; print a table and write ``flagd.json`` (``ofrep.json``)."""
    cases = [_run_case(protocol, size, flips, processes, warmup) for size in sizes]
    results = {"machine": machine(), "cases": cases}
    print_table(
        ["streams", "processes", "flips", "p50 ms", "p99 ms", "max ms", "srv cpu us/stream/change"],
        [
            [c["streams"], c["processes"], c["flips"], c["p50_ms"], c["p99_ms"], c["max_ms"],
             c["server_cpu_us_per_stream_change"]]
            for c in cases
        ],
    )  # fmt: skip
    print(f"results: {write_results(protocol, results, out_dir)}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--protocol", choices=["flagd", "ofrep"], default="flagd")
    parser.add_argument("--streams", default="100,1000", help="comma-separated sizes")
    parser.add_argument("--flips", type=int, default=30, help="measured flips per size")
    parser.add_argument("--processes", type=int, default=4, help="stream processes")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured flips first")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.streams.split(",") if s.strip()]
    run(
        sizes,
        protocol=args.protocol,
        flips=args.flips,
        processes=args.processes,
        warmup=args.warmup,
        out_dir=args.out,
    )


if __name__ == "__main__":
    main()
