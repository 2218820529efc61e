"""Mitigation writes per second through the real RPC and etcd, each with its audit record.

Every write is a ``SetFlag`` that changes the value (so each one is a real etcd
transaction: the record and its audit record), from 1 and from 50 concurrent
callers, each caller on its own flags. Prints writes/s and p50/p99 latency and
writes ``benchmarks/results/writes.json``.

    python -m benchmarks.bench_writes [--writes 2000] [--concurrency 1,50] [--profile w.txt]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import grpc

from benchmarks import _profile
from benchmarks._harness import (
    RESULTS_DIR,
    control_server,
    cpu_seconds,
    machine,
    percentile,
    print_table,
    py_spy,
    write_results,
)
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t


async def _run_case(address: str, writes: int, concurrency: int, pid: int) -> dict[str, Any]:
    latencies: list[float] = []
    failures = 0
    per_caller = max(1, writes // concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)

        async def caller(index: int) -> None:
            nonlocal failures
            options = t.WriteOptions(reason="benchmark", incident="BENCH-1", actor="bench")
            for i in range(per_caller):
                request = m.SetFlagRequest(
                    scope="bench",
                    name=f"c{concurrency}-caller{index}",
                    value=t.FlagValue(number_value=i),
                    options=options,
                )
                start = time.perf_counter()
                try:
                    resp = await stub.SetFlag(request, timeout=10)
                except grpc.aio.AioRpcError:
                    failures += 1
                    continue
                latencies.append(time.perf_counter() - start)
                if not resp.result.changed:
                    failures += 1

        cpu_before = cpu_seconds(pid)
        start = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(pid) - cpu_before
    done = len(latencies)
    return {
        "concurrency": concurrency,
        "writes": done,
        "failures": failures,
        "seconds": round(elapsed, 3),
        "writes_per_second": round(done / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "max_ms": round(max(latencies, default=0.0) * 1000, 2),
        "server_cpu_ms_per_write": round(cpu * 1000 / done, 3) if done else 0.0,
    }


def run(
    writes: int,
    concurrency: list[int],
    out_dir: Path = RESULTS_DIR,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Run every case on one fresh server and etcd; return and write the results.

    With ``profile``, py-spy samples the server during each case (collapsed
    stacks to ``<profile stem>-<callers><suffix>``).
    """
    host = machine()
    cases = []
    profiles = []
    with control_server() as server:
        for c in concurrency:
            path = profile.with_name(f"{profile.stem}-{c}{profile.suffix}") if profile else None
            with py_spy(server.pid, path):
                cases.append(asyncio.run(_run_case(server.address, writes, c, server.pid)))
            if path is not None:
                profiles.append(path)
    results = {
        "benchmark": "writes",
        "machine": host,
        "writes_per_case": writes,
        "cases": cases,
    }
    print_table(
        ["callers", "writes", "failed", "writes/s", "p50 ms", "p99 ms", "max ms", "srv cpu ms/w"],
        [
            [
                c["concurrency"], c["writes"], c["failures"], c["writes_per_second"],
                c["p50_ms"], c["p99_ms"], c["max_ms"], c["server_cpu_ms_per_write"],
            ]
            for c in cases
        ],
    )  # fmt: skip
    path = write_results("writes", results, out_dir)
    print(f"results: {path}")
    for profile_path in profiles:
        print(_profile.report(profile_path, top=15))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--writes", type=int, default=2000, help="writes per case")
    parser.add_argument("--concurrency", default="1,50", help="comma-separated caller counts")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument(
        "--profile", type=Path, help="py-spy the server: collapsed stacks to PROFILE-<callers>.txt"
    )
    args = parser.parse_args(argv)
    run(args.writes, [int(c) for c in args.concurrency.split(",")], args.out, args.profile)


if __name__ == "__main__":
    main()
